"""The command line: the app and one module per command group."""
