from threengan_cli.cli.app import main

main()
