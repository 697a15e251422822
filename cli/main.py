"""The `lpc` command line: parse options, build a config, call the pipeline, render the result."""
from __future__ import annotations

from lpc.cli import commands  # noqa: F401  (registers the subcommands on `app`)
from lpc.cli.app import app


def main() -> None:
    app()
