from mvit.cli import main

main()
