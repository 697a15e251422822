"""The `lpc` command line: parse options, build a config, call the pipeline, render the result."""
from __future__ import annotations

import sys


def main() -> None:
    """Entry point of `lpc` and `python -m lpc`: Ctrl-C at any moment, imports included, exits 130
    with one line instead of a traceback."""
    from lpc.cli import interrupt

    interrupt.install()
    code: object = 0
    try:
        from lpc.cli import commands  # noqa: F401  (registers the subcommands on `app`)
        from lpc.cli.app import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = 130
    except SystemExit as exc:  # typer always ends this way
        code = exc.code
    if interrupt.finish() and code != 130:  # an interrupt still pending: the command ran out of imports
        sys.stderr.write("error: interrupted\n")
        code = 130
    sys.exit(code)


def __getattr__(name: str):
    """`lpc.cli.main.app`: the typer app with every command registered (tests drive it with CliRunner)."""
    if name == "app":
        from lpc.cli import commands  # noqa: F401
        from lpc.cli.app import app

        return app
    raise AttributeError(name)
