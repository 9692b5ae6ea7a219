from threengan_cli.cli import main

main()
