"""The typer app and what every command shares: option types, the error guard, recipe loading, output."""
from __future__ import annotations

import errno
import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
import typer.core

from lpc.cli import render
from lpc.formats.errors import LpcError

EXAMPLES = """Examples:

  lpc compress MODEL --recipe nvfp4 --data calib.jsonl --ppl heldout.jsonl -o run/

  lpc eval run/model --ppl heldout.jsonl --baseline MODEL --fail-under-recovery 0.99

  lpc inspect run/quant --plot map.png

Exit codes: 0 ok, 1 bad input, 2 usage, 3 evaluation gate failed, 130 interrupted (Ctrl-C)."""

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="lpc: compress Hugging Face causal LMs (calibrate, allocate, quantize, compensate, "
                       "export, eval).", epilog=EXAMPLES)
log = logging.getLogger("lpc")


def _flag_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """Boolean flags show no `<bool>` placeholder in --help: they take no value."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

# One definition per option shared by several commands.
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks (also LPC_DEBUG=1)")]
Json = Annotated[bool, typer.Option("--json", help="print the machine-readable result on stdout")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output directory")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: key.sub=value (repeatable)")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda")]
Out = Annotated[Path, typer.Option("-o", "--out", help="output directory")]
ModelArg = Annotated[str, typer.Argument(help="model directory or hub id")]
Data = Annotated[str, typer.Option("--data", help="calibration text: .txt, .jsonl (a 'text' field per line), "
                                                  "saved datasets dir, hub dataset id, or 'self' (sampled from the model)")]
Samples = Annotated[Optional[int], typer.Option("--samples", min=1, help="calibration sequences (calibrate.samples)")]
SeqLen = Annotated[Optional[int], typer.Option("--seq-len", min=2, help="tokens per calibration sequence (calibrate.seq_len)")]
Ppl = Annotated[Optional[list[str]], typer.Option("--ppl", help="text file (.txt or .jsonl) for perplexity (repeatable)")]
Tasks = Annotated[Optional[str], typer.Option("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy_local,piqa_local "
                                                              "(built-in local tasks) or arc_easy (hub)")]
TasksDir = Annotated[Optional[str], typer.Option("--tasks-dir", help="folder of extra lm-eval task YAMLs")]
TasksData = Annotated[Optional[str], typer.Option("--tasks-data", help="folder holding the built-in local tasks' JSON "
                                                                       "(default: env LPC_TASKS_DATA)")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="documents per lm-eval task (default: all)")]
Gate = Annotated[Optional[float], typer.Option("--fail-under-recovery",
                                               help="exit 3 when recovery against the baseline is lower, e.g. 0.99")]


def version_callback(value: bool) -> None:
    if value:
        from lpc.pipeline.artifact.store import lpc_version

        render.out_console.print(f"lpc {lpc_version()}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                         help="print the version and exit")] = None) -> None:
    """lpc: compress Hugging Face causal LMs (calibrate, allocate, quantize, compensate, export, eval)."""


def split_tasks(tasks: str | None) -> list[str] | None:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map LpcError (and anything unexpected) to one red line and an exit code, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("LPC_DEBUG", "") not in ("", "0")
        try:
            render.setup_logging(debug)
            _quiet_libraries(debug)
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
        except OSError as err:
            if debug:
                raise
            render.error(*_os_error_text(err))
            raise typer.Exit(1) from None
        except Exception as err:  # a bug or an environment problem: say so briefly
            if debug:
                raise
            if "No space left on device" in str(err):  # e.g. safetensors' own error type
                render.error(*_os_error_text(OSError(errno.ENOSPC, "No space left on device")))
                raise typer.Exit(1) from None
            render.error(f"unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                         "run again with --debug for the traceback")
            raise typer.Exit(1) from None

    return wrapper


def _os_error_text(err: OSError) -> tuple[str, str]:
    """An operating-system error as (message, hint): disk full, permissions, a file where a folder goes."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"the disk is full{where}", "free space on that disk or write the output elsewhere; nothing was kept"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}", "choose a path you can write to"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a path is a file where a directory is needed{where}", "choose another -o directory"
    return f"{err.strerror or type(err).__name__}{where}", "run again with --debug for the traceback"


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
        render.print_table(title, columns, rows)


def stage_rows(summary: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in summary.items() if not isinstance(v, (dict, list))]
