"""The command line of a check that runs in two venvs: `--export-only` (lpc's venv writes the exports) or
`--check` (the engine's venv reads them). Standard library only, so every venv can import it."""
from __future__ import annotations

import argparse
from typing import Callable


def two_venv_main(doc: str, export_help: str, check_help: str, export_only: Callable[..., None],
                  check: Callable[..., None], only_help: str | None = None) -> None:
    """Parse the mode (and `--only a,b` when `only_help` is given) and run it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--export-only", action="store_true", help=export_help)
    mode.add_argument("--check", action="store_true", help=check_help)
    if only_help is not None:
        ap.add_argument("--only", default="", help=only_help)
    args = ap.parse_args()
    extra = () if only_help is None else ([s for s in args.only.split(",") if s] or None,)
    export_only(*extra) if args.export_only else check(*extra)
