"""Evaluation of a loaded (model, tokenizer), as `lpc eval` runs it.

`perplexity` over a .jsonl or text file; `run_tasks` runs lm-evaluation-harness tasks (hub or
local YAMLs) through `lm_eval.simple_evaluate` with an `HFLM` on the model; `compare` turns two
evaluation reports into deltas and recoveries; `check_gate` is the CI gate (GateFailed, exit 3).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

import lpc.recipes.tasks as _builtin_tasks
from lpc.pipeline.errors import GateFailed, InputError
from lpc.pipeline.progress import Progress, track

log = logging.getLogger(__name__)

BUILTIN_TASKS_DIR = Path(_builtin_tasks.__file__).resolve().parent
ASSETS_ENV = "LPC_ASSETS"
# Task metrics where lower is better: their recovery is baseline / compressed.
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})
_JSONL_HINT = 'each line must be a JSON object like {"text": "..."}'


# ----------------------------------------------------------------------------------- perplexity
def perplexity(model: torch.nn.Module, tokenizer: Any, path: str | Path, seq_len: int = 256,
               progress: Progress | None = None, batch_size: int = 8,
               max_tokens: int | None = None) -> dict:
    """Perplexity of `model` (on `model.device`) over the text in `path`.

    Protocol. `.jsonl` (an object with a string `text` per line): each record's text tokenized on
    its own with the tokenizer's default special tokens (BOS for Llama), truncated to `seq_len`.
    Any other file: the whole text tokenized once, cut into non-overlapping windows of `seq_len`
    tokens, the last partial window kept if it has >= 2 tokens. `max_tokens` keeps only the first
    tokens of that stream (for jsonl, the truncated records laid end to end). A sequence of n
    tokens gives n-1 predictions; perplexity = exp(summed loss / predictions). Batches of
    `batch_size` (sorted by length, right-padded, masked) give the one-at-a-time result up to
    float rounding.

    Returns {"perplexity": float, "tokens": int (predictions), "sequences": int,
    "nll": float (mean loss, nats), "protocol": str}.
    """
    path = Path(path)
    _check_int("seq_len", seq_len, 2, "use a window of at least 2 tokens, e.g. 256")
    _check_int("batch_size", batch_size, 1, "use 1 or more")
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 2, "use at least 2 tokens, or None for all")
    seqs, how = _sequences(tokenizer, path, seq_len, max_tokens)
    total, count = _score(model, seqs, batch_size, progress)
    return {"perplexity": math.exp(total / count), "tokens": count, "sequences": len(seqs),
            "nll": total / count,
            "protocol": f"{path.name}: {how}; exp(token-weighted mean next-token loss)"}


def _sequences(tokenizer: Any, path: Path, seq_len: int, max_tokens: int | None) -> tuple[list[list[int]], str]:
    """The token sequences of the perplexity protocol and its description."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        ids = tokenizer(_jsonl_texts(path, text), verbose=False)["input_ids"]
        seqs = [list(x[:seq_len]) for x in ids]
        how = f"each record tokenized on its own, truncated to {seq_len} tokens"
    else:
        stream = list(tokenizer(text, verbose=False)["input_ids"])
        seqs = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        how = f"whole text tokenized once, non-overlapping windows of {seq_len} tokens"
    seqs = [s for s in _cap_tokens(seqs, max_tokens) if len(s) >= 2]
    if not seqs:
        raise InputError(f"{path} yields no sequence of 2 or more tokens", "give it more text")
    cap = f", first {max_tokens} tokens" if max_tokens is not None else ""
    return seqs, how + cap


def kl_divergence(model: torch.nn.Module, baseline: torch.nn.Module, tokenizer: Any, path: str | Path,
                  seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
                  progress: Progress | None = None) -> dict:
    """Mean KL(baseline || model) of the next-token distributions over the perplexity protocol's
    predicted positions of `path` (nats per token, fp32 softmax, summed in fp64).

    Unlike perplexity it does not depend on how well either model fits the text: 0 means the
    compressed model predicts exactly like the baseline. Both models must share the tokenizer and
    vocabulary. Returns {"kl": float, "tokens": int, "protocol": str}.
    """
    path = Path(path)
    _check_int("seq_len", seq_len, 2, "use a window of at least 2 tokens, e.g. 256")
    _check_int("batch_size", batch_size, 1, "use 1 or more")
    seqs, how = _sequences(tokenizer, path, seq_len, max_tokens)
    batches = _length_batches(seqs, batch_size)
    parts = [0.0] * len(seqs)
    with _eval_mode(model), _eval_mode(baseline), torch.inference_mode():
        for batch in track(batches, "kl", progress):
            rows = [seqs[i] for i in batch]
            q = _batch_logits(model, rows)
            p = _batch_logits(baseline, rows)
            if p.shape[-1] != q.shape[-1]:
                raise InputError(f"the baseline has {p.shape[-1]} output classes, the model {q.shape[-1]}",
                                 "compare models that share the tokenizer and vocabulary")
            for k, (i, row) in enumerate(zip(batch, rows)):
                lp = torch.log_softmax(p[k, : len(row) - 1].float(), -1)
                lq = torch.log_softmax(q[k, : len(row) - 1].to(lp.device).float(), -1)
                parts[i] = float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
    count = sum(len(s) - 1 for s in seqs)
    return {"kl": math.fsum(parts) / count, "tokens": count,
            "protocol": f"{path.name}: {how}; mean KL(baseline || model) per predicted token"}


def _batch_logits(model: torch.nn.Module, rows: list[list[int]], device: Any = None) -> torch.Tensor:
    """Logits (batch, longest, vocab) of right-padded rows; no mask when nothing is padded (the
    plain causal path, as when scoring one at a time)."""
    device = device or getattr(model, "device", None) or next(model.parameters()).device
    seqs = [torch.tensor(row, dtype=torch.long) for row in rows]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (batch, longest) int64
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)
    padded = bool((mask == 0).any())
    return model(input_ids=ids.to(device), attention_mask=mask.to(device) if padded else None).logits


def _check_int(name: str, value: Any, least: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}", fix)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"perplexity file {path} does not exist or is not a file",
                         'pass a .txt file, or a .jsonl file with a "text" field per line')
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err})", "convert it to UTF-8") from err
    if not text.strip():
        raise InputError(f"{path} is empty", "give a file with text to score")
    return text


def _jsonl_texts(path: Path, text: str) -> list[str]:
    """The `text` field of every non-blank line; a bad line raises InputError with its number."""
    texts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {lineno}: not valid JSON ({err.msg})", _JSONL_HINT) from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f'{path}, line {lineno}: no string field "text" (found {found})',
                             _JSONL_HINT)
        texts.append(record["text"])
    return texts


def _cap_tokens(seqs: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The sequences cut so that their lengths add up to at most `max_tokens`."""
    if max_tokens is None:
        return seqs
    out, left = [], max_tokens
    for seq in seqs:
        if left <= 0:
            break
        out.append(seq[:left])
        left -= len(out[-1])
    return out


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring; the caller's train/eval flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _score(model: torch.nn.Module, seqs: list[list[int]], batch_size: int,
           progress: Progress | None) -> tuple[float, int]:
    """(summed next-token loss in nats, as fp64; number of predictions) over `seqs`."""
    batches = _length_batches(seqs, batch_size)
    device = getattr(model, "device", None) or next(model.parameters()).device
    losses = [0.0] * len(seqs)
    with _eval_mode(model), torch.inference_mode():
        for batch in track(batches, "perplexity", progress):
            for i, loss in zip(batch, _batch_losses(model, [seqs[i] for i in batch], device)):
                losses[i] = loss
    # Summed in input order so that the total does not depend on the batching.
    return math.fsum(losses), sum(len(s) - 1 for s in seqs)


def _length_batches(seqs: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `seqs` in batches, longest first, so a batch holds similar lengths (little padding)."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _batch_losses(model: torch.nn.Module, rows: list[list[int]], device: torch.device) -> list[float]:
    """Summed next-token loss of each row; rows are right-padded and masked when lengths differ."""
    logits_all = _batch_logits(model, rows, device)
    losses = []
    for k, row in enumerate(rows):
        # One row at a time in fp32 bounds the temporary to (len, vocab).
        logits = logits_all[k, : len(row) - 1].float()
        target = torch.tensor(row[1:], dtype=torch.long, device=logits.device)
        losses.append(float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")))
    return losses


# ------------------------------------------------------------------------------ lm-eval tasks
def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str],
              tasks_dir: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
              num_fewshot: int | None = 0, max_length: int | None = None) -> dict:
    """Run lm-evaluation-harness `tasks` on the loaded model; returns {task: {metric: value}}.

    Names are looked up in `tasks_dir` (the user's YAMLs win a name clash), then in the built-in
    lpc/recipes/tasks (`*_local` tasks over the assets' multiple-choice JSON; tag `lpc_local` is
    all of them; their ${LPC_ASSETS} is `default_assets_dir()`), then among lm-eval's own tasks
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
        # HFLM switches the model to eval mode; _eval_mode restores the caller's flag afterwards.
        with _hub_offline(local), _eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            results = _simple_evaluate(lm, manager, names, limit, num_fewshot)
    return _compact(results)


def default_assets_dir() -> Path:
    """The assets folder: env LPC_ASSETS, else ../shared/assets beside the repository root."""
    env = os.environ.get(ASSETS_ENV)
    return Path(env).expanduser().resolve() if env else (BUILTIN_TASKS_DIR.parents[2] / "shared" / "assets").resolve()


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
    _check_int("batch_size", batch_size, 1, "use 1 or more")
    for name, value, least in (("limit", limit, 1), ("num_fewshot", num_fewshot, 0),
                               ("max_length", max_length, 2)):
        if value is not None:
            _check_int(name, value, least, "or None for the default")
    return [t.strip() for t in tasks]


def _check_tasks_dir(tasks_dir: str | Path | None) -> Path | None:
    path = None if tasks_dir is None else Path(tasks_dir).expanduser().resolve()
    if path is not None and not path.is_dir():
        raise InputError(f"tasks dir {tasks_dir} is not a directory", "pass a folder of lm-eval task YAMLs")
    return path


@contextmanager
def _resolved_builtin_dir() -> Iterator[Path]:
    """A temporary copy of the built-in task YAMLs with ${LPC_ASSETS} replaced by the assets path."""
    # JSON escaping suits the double-quoted YAML strings that hold the placeholder.
    assets = json.dumps(str(default_assets_dir()))[1:-1]
    with tempfile.TemporaryDirectory(prefix="lpc-tasks-") as tmp:
        for src in sorted(BUILTIN_TASKS_DIR.glob("*.yaml")):
            text = src.read_text(encoding="utf-8").replace("${LPC_ASSETS}", assets)
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
        raise InputError(f"a task's data file is missing ({err})", f"built-in tasks read data/mc/ in "
                         f"{default_assets_dir()}: set {ASSETS_ENV} to the assets folder") from err
    except ConnectionError as err:
        raise InputError(f"tasks {names} need a hub dataset that could not be reached ({err})",
                         "run with network or a filled datasets cache, or use local tasks") from err
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


# ---------------------------------------------------------------------------------- comparison
def compare(result: Mapping, baseline: Mapping) -> dict:
    """Deltas and recoveries of an evaluation report against the baseline model's report.

    A report is {"perplexity": P, "tasks": run_tasks() dict}, either optional; P is a perplexity()
    dict or {label: perplexity() dict}. Per metric: delta = compressed - baseline; recovery =
    compressed / baseline where higher is better (acc, acc_norm, ...), baseline / compressed for
    perplexities and LOWER_IS_BETTER metrics: 1.0 = no loss, < 1.0 = worse. A zero denominator
    gives 1.0, a non-finite compressed value 0.0. *_stderr and `samples` are not compared;
    perplexities must share protocol and token count, tasks their sample count (else InputError).
    Returns {"metrics": {name: {"baseline", "compressed", "delta", "recovery"}}, "recovery": the
    minimum, "worst": its name, "unmatched": names in one report only}; names are "perplexity",
    "perplexity <label>" and "<task>/<metric>".
    """
    pairs, unmatched = _ppl_pairs(result.get("perplexity"), baseline.get("perplexity"))
    task_pairs, task_unmatched = _task_pairs(result.get("tasks") or {}, baseline.get("tasks") or {})
    pairs, unmatched = {**pairs, **task_pairs}, unmatched + task_unmatched
    if not pairs:
        raise InputError(f"nothing to compare: no metric is in both reports (in one only: {unmatched})",
                         "evaluate both models on the same files and tasks")
    if unmatched:
        log.warning("only in one report, not compared: %s", unmatched)
    metrics = {name: _metric_entry(name, *values) for name, values in pairs.items()}
    worst = min(metrics, key=lambda n: (metrics[n]["recovery"], n))
    return {"metrics": metrics, "recovery": metrics[worst]["recovery"], "worst": worst,
            "unmatched": unmatched}


def check_gate(recovery: float | Mapping, fail_under: float | None) -> None:
    """Raise GateFailed (exit code 3) if `recovery` (a float or compare()'s dict) < `fail_under`."""
    if fail_under is None:
        return
    if isinstance(fail_under, bool) or not isinstance(fail_under, (int, float)) or not fail_under > 0:
        raise InputError(f"the recovery gate must be a number > 0, got {fail_under!r}", "e.g. 0.99")
    worst = ""
    if isinstance(recovery, Mapping):
        entry = recovery["metrics"][recovery["worst"]]
        worst = f" (worst: {recovery['worst']} {entry['compressed']:.4g} vs baseline {entry['baseline']:.4g})"
        recovery = recovery["recovery"]
    if not recovery >= fail_under:  # written so that NaN fails too
        raise GateFailed(f"recovery {recovery:.4f}{worst} is under the gate {fail_under:.4f}",
                         "keep more of the model in high precision, or lower the gate")
    log.info("recovery %.4f passes the gate %.4f", recovery, fail_under)


def _ppl_pairs(ppl: Any, ppl_base: Any) -> tuple[dict, list[str]]:
    """{name: (compressed, baseline, lower_is_better)} for perplexities; names in one side only."""
    if not ppl or not ppl_base:
        return {}, (["perplexity"] if ppl or ppl_base else [])
    if "perplexity" in ppl and "perplexity" in ppl_base:  # one perplexity() dict each
        ppl, ppl_base = {"": ppl}, {"": ppl_base}
    pairs = {}
    for label in sorted(set(ppl) & set(ppl_base)):
        name = f"perplexity {label}".strip()
        _same(f"{name} protocol", ppl[label].get("protocol"), ppl_base[label].get("protocol"))
        _same(f"{name} token count", ppl[label].get("tokens"), ppl_base[label].get("tokens"))
        pairs[name] = (ppl[label]["perplexity"], ppl_base[label]["perplexity"], True)
    return pairs, [f"perplexity {label}" for label in sorted(set(ppl) ^ set(ppl_base))]


def _task_pairs(tasks: Mapping, tasks_base: Mapping) -> tuple[dict, list[str]]:
    """{"<task>/<metric>": (compressed, baseline, lower_is_better)}; tasks in one side only."""
    pairs = {}
    for task in sorted(set(tasks) & set(tasks_base)):
        row, row_base = tasks[task], tasks_base[task]
        _same(f"{task} sample count", row.get("samples"), row_base.get("samples"))
        for metric in sorted(set(row) & set(row_base)):
            if metric != "samples" and not metric.endswith("_stderr"):
                lower = metric.split("[")[0] in LOWER_IS_BETTER
                pairs[f"{task}/{metric}"] = (row[metric], row_base[metric], lower)
    return pairs, sorted(set(tasks) ^ set(tasks_base))


def _same(what: str, value: Any, base: Any) -> None:
    if value != base:
        raise InputError(f"{what} differs: {value!r} here, {base!r} in the baseline",
                         "evaluate both models with the same file, seq_len, max_tokens and limit")


def _metric_entry(name: str, compressed: float, baseline: float, lower_is_better: bool) -> dict:
    if not math.isfinite(baseline):
        raise InputError(f"baseline {name} is {baseline}", "the baseline must evaluate to finite values")
    num, den = (baseline, compressed) if lower_is_better else (compressed, baseline)
    recovery = 0.0 if not math.isfinite(compressed) else num / den if den != 0 else 1.0
    return {"baseline": baseline, "compressed": compressed, "delta": compressed - baseline,
            "recovery": recovery}
