"""The typer app and what every command shares: option types, the error guard, recipe loading, output."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from lpc.cli import render
from lpc.formats.errors import LpcError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="lpc: compress Hugging Face causal LMs (calibrate, allocate, quantize, compensate, "
                       "export, eval).")
log = logging.getLogger("lpc")

Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks (also LPC_DEBUG=1)")]
Json = Annotated[bool, typer.Option("--json", help="print the machine-readable result on stdout")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: key.sub=value (repeatable)")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda")]
Out = Annotated[Path, typer.Option("-o", "--out", help="output directory")]


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map LpcError (and anything unexpected) to one red line and an exit code, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("LPC_DEBUG", "") not in ("", "0")
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        _quiet_libraries(debug)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LpcError as err:
            if debug:
                raise
            render.error(str(err.args[0]) if err.args else type(err).__name__, err.hint)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            render.error("interrupted; outputs of unfinished stages were not written")
            raise typer.Exit(130) from None
        except Exception as err:  # a bug or an environment problem: say so briefly
            if debug:
                raise
            render.error(f"unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                         "run again with --debug for the traceback")
            raise typer.Exit(1) from None

    return wrapper


def _quiet_libraries(debug: bool) -> None:
    """lpc draws its own progress; the libraries' tqdm bars and info chatter would interleave."""
    if debug:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; this only guards odd environments
        pass
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_recipe_arg(recipe: str, sets: list[str] | None):
    """A validated recipe whose method, policy and exporter names are all registered."""
    from lpc.pipeline.stages import check_recipe_names
    from lpc.recipes import load_recipe

    r = load_recipe(recipe, sets or [])
    check_recipe_names(r)
    return r


def emit(result: Any, as_json: bool, title: str, rows: list[list[Any]], columns: list[str]) -> None:
    if as_json:
        render.print_json(result)
    else:
        render.out_console.print(render.table(title, columns, rows))


def stage_rows(summary: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in summary.items() if not isinstance(v, (dict, list))]
