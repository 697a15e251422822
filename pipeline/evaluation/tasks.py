"""lm-evaluation-harness tasks on a loaded (model, tokenizer), as `lpc eval --tasks` runs them.

Built-in local tasks (`recipes/tasks/*_local.yaml`, shipped with the package: arc_easy_local,
arc_challenge_local, openbookqa_local, piqa_local, winogrande_local; tag `lpc_local`) read their
multiple-choice JSON from the folder `tasks_data_dir()` names: env LPC_TASKS_DATA (`--tasks-data`),
else $LPC_ASSETS/data/mc, else ../shared/assets/data/mc beside a source checkout.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lpc.recipes.tasks as builtin_tasks
from lpc.pipeline.errors import InputError
from lpc.pipeline.evaluation.perplexity import check_int
from lpc.pipeline.modes import eval_mode

BUILTIN_TASKS_DIR = Path(builtin_tasks.__file__).resolve().parent
TASKS_DATA_ENV = "LPC_TASKS_DATA"
ASSETS_ENV = "LPC_ASSETS"
PLACEHOLDER = "${LPC_TASKS_DATA}"


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str],
              tasks_dir: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
              num_fewshot: int | None = 0, max_length: int | None = None) -> dict:
    """Run lm-evaluation-harness `tasks` on the loaded model; returns {task: {metric: value}}.

    Names are looked up in `tasks_dir` (the user's YAMLs win a name clash), then in the built-in
    lpc/recipes/tasks (`*_local` tasks over local multiple-choice JSON in `tasks_data_dir()`; tag
    `lpc_local` is all of them), then among lm-eval's own tasks
    (hub datasets: network or a filled cache). With only local tasks the hub is switched off.
    A row holds lm-eval's numeric metrics (acc, acc_norm, *_stderr; a filter other than "none"
    is appended as "metric[filter]") and `samples`, the documents scored. `max_length` overrides
    the longest request lm-eval allows (default: the model's context).
    """
    from lm_eval.models.huggingface import HFLM

    names = _check_task_args(tasks, limit, batch_size, num_fewshot, max_length)
    user_dir = _check_tasks_dir(tasks_dir)
    with _resolved_builtin_dir() as builtin_dir:
        include = [builtin_dir] + ([user_dir] if user_dir else [])
        manager, local = _task_manager(include, names)
        # HFLM switches the model to eval mode; eval_mode restores the caller's flag afterwards.
        with _hub_offline(local), eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            results = _simple_evaluate(lm, manager, names, limit, num_fewshot)
    return _compact(results)


def tasks_data_dir() -> Path:
    """The folder of the built-in tasks' JSON: env LPC_TASKS_DATA, else $LPC_ASSETS/data/mc, else
    ../shared/assets/data/mc beside the source tree (only a checkout has one)."""
    if os.environ.get(TASKS_DATA_ENV):
        return Path(os.environ[TASKS_DATA_ENV]).expanduser().resolve()
    if os.environ.get(ASSETS_ENV):
        return (Path(os.environ[ASSETS_ENV]).expanduser() / "data" / "mc").resolve()
    return (BUILTIN_TASKS_DIR.parents[2] / "shared" / "assets" / "data" / "mc").resolve()


def builtin_task_names() -> list[str]:
    """The built-in local tasks: the YAML file names (each file defines the task of its name)."""
    return sorted(p.stem for p in BUILTIN_TASKS_DIR.glob("*.yaml"))


def local_tasks(tasks_dir: str | Path | None = None) -> list[str]:
    """Names of the built-in local tasks and of the tasks (and tags, groups) in `tasks_dir`."""
    from lm_eval.tasks import TaskManager

    paths = [BUILTIN_TASKS_DIR] + ([_check_tasks_dir(tasks_dir)] if tasks_dir else [])
    return sorted(TaskManager(include_path=[str(p) for p in paths], include_defaults=False).all_tasks)


def _check_task_args(tasks: Sequence[str], limit: Any, batch_size: Any, num_fewshot: Any,
                     max_length: Any) -> list[str]:
    """The stripped task names; a bad argument raises InputError."""
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise InputError(f"tasks must be a non-empty list of task names, got {tasks!r}",
                         "e.g. ['arc_easy_local']")
    check_int("batch_size", batch_size, 1, "use 1 or more")
    for name, value, least in (("limit", limit, 1), ("num_fewshot", num_fewshot, 0),
                               ("max_length", max_length, 2)):
        if value is not None:
            check_int(name, value, least, "or None for the default")
    return [t.strip() for t in tasks]


def _check_tasks_dir(tasks_dir: str | Path | None) -> Path | None:
    path = None if tasks_dir is None else Path(tasks_dir).expanduser().resolve()
    if path is not None and not path.is_dir():
        raise InputError(f"tasks dir {tasks_dir} is not a directory", "pass a folder of lm-eval task YAMLs")
    return path


@contextmanager
def _resolved_builtin_dir() -> Iterator[Path]:
    """A temporary copy of the built-in task YAMLs with ${LPC_TASKS_DATA} replaced by `tasks_data_dir()`."""
    # JSON escaping suits the double-quoted YAML strings that hold the placeholder.
    data = json.dumps(str(tasks_data_dir()))[1:-1]
    with tempfile.TemporaryDirectory(prefix="lpc-tasks-") as tmp:
        for src in sorted(BUILTIN_TASKS_DIR.glob("*.yaml")):
            text = src.read_text(encoding="utf-8").replace(PLACEHOLDER, data)
            (Path(tmp) / src.name).write_text(text, encoding="utf-8")
        yield Path(tmp)


def _task_manager(include: list[Path], names: list[str]) -> tuple[Any, bool]:
    """(TaskManager knowing every name, whether all names are local). Unknown name -> InputError."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    # Indexing lm-eval's ~15k built-in tasks takes seconds: only done when a name is not local.
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(n in manager.all_tasks for n in names):
        return manager, True
    local_names = manager.all_tasks
    manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise InputError(f"unknown task(s) {unknown}; local tasks are {local_names}",
                         "add task YAMLs with --tasks-dir, or use an lm-eval task such as arc_easy")
    return manager, False


def _offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Keep `datasets` off the network while local tasks load (their data is local JSON)."""
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE
    # datasets reads HF_DATASETS_OFFLINE once, at import; this flag is what it consults later.
    datasets.config.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _simple_evaluate(lm: Any, manager: Any, names: list[str], limit: int | None,
                     num_fewshot: int | None) -> dict:
    import lm_eval

    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, batch_size=lm.batch_size,
            task_manager=manager, log_samples=False, bootstrap_iters=1000)
    except AssertionError as err:  # lm-eval checks request lengths with `assert`
        raise InputError(f"lm-eval refused a request of {names} ({err!r}), most likely one longer than "
                         f"max_length {lm.max_length}", "pass a larger max_length") from err
    except FileNotFoundError as err:
        raise InputError(f"a task's data file is missing ({err})", f"the built-in local tasks read "
                         f"{tasks_data_dir()}: pass --tasks-data DIR or set {TASKS_DATA_ENV} to the folder "
                         "holding arc_easy_test.jsonl and the others") from err
    except ConnectionError as err:
        offline = " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _offline() else ""
        raise InputError(f"tasks {names} need a hub dataset that could not be reached{offline}: {err}",
                         f"run with network or a filled datasets cache, or use the built-in local tasks: "
                         f"{', '.join(builtin_task_names())} (data from --tasks-data or {TASKS_DATA_ENV})") from err
    if not results or not results.get("results"):
        raise InputError(f"lm-eval returned no results for tasks {names}")
    return results


def _compact(results: Mapping) -> dict:
    """lm-eval's results -> {task: {metric: float, ..., "samples": int}}."""
    out: dict[str, dict] = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "sample_len":
                continue  # alias, "N/A" stderr; sample_len repeats `samples`
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
        if task in n_samples:
            row["samples"] = int(n_samples[task]["effective"])
        out[task] = row
    return out


