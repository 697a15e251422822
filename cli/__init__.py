"""lpc.cli: the typer application."""
