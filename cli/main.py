"""The `lpc` command line: parse options, build a config, call the pipeline, render the result."""
from __future__ import annotations

import sys


def main() -> None:
    """Entry point of `lpc` and `python -m lpc`: Ctrl-C at any moment, imports included, exits 130
    with one line instead of a traceback."""
    from lpc.cli import interrupt

    code: object = 0
    try:
        interrupt.install()
        try:
            from lpc.cli import commands  # noqa: F401  (registers the subcommands on `app`)
            from lpc.cli.app import app

            app()
        except SystemExit as exc:  # typer always ends this way
            code = exc.code
        if interrupt.finish():  # an interrupt still pending: the command ran out of imports
            raise KeyboardInterrupt
    except KeyboardInterrupt:  # also one delivered (deferred past an import) while the lines above unwind
        interrupt.finish()
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
