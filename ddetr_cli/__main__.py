from ddetr_cli.cli.main import main

main()
