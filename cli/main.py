"""The `lpc` command line: parse options, build a config, call the pipeline, render the result."""
from __future__ import annotations

import sys


def main() -> None:
    """Entry point of `lpc` and `python -m lpc`: Ctrl-C at any moment, imports included, exits 130
    with one line instead of a traceback."""
    try:
        from lpc.cli import commands  # noqa: F401  (registers the subcommands on `app`)
        from lpc.cli.app import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)


def __getattr__(name: str):
    """`lpc.cli.main.app`: the typer app with every command registered (tests drive it with CliRunner)."""
    if name == "app":
        from lpc.cli import commands  # noqa: F401
        from lpc.cli.app import app

        return app
    raise AttributeError(name)
