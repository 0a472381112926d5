from mvit.cli.app import main

main()
