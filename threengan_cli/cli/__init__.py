"""The command line: the typer app, one module per command, and everything rich (views)."""
