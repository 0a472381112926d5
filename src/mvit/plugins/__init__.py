"""The built-in dataset plugins. Each is registered through the `mvit` entry-point group."""
