"""Comparison of two evaluation reports (deltas, recoveries) and the CI recovery gate (exit 3)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from lpc.pipeline.errors import GateFailed, InputError

log = logging.getLogger(__name__)

# Task metrics where lower is better: their recovery is baseline / compressed.
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


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


def saved_baseline(baseline: Any, ppl: list | None = None, tasks: list | None = None,
                   limit: int | None = None) -> dict | None:
    """The baseline as a saved report when `baseline` names one, else None (a model to evaluate).

    A saved report is what `lpc eval MODEL ... --json` prints (a .json file) or what `lpc eval MODEL
    ... -o DIR` writes (DIR/eval.json, a directory without config.json). It stands for the original
    in every comparison, so a CI job evaluates the original once and gates each compressed model
    against the file. It must hold every asked perplexity file (same protocol and token count,
    checked by compare) and task (same sample count); KL needs the model itself. Returns
    {"model", "perplexity", "tasks", "details", "from"}; a bad file raises InputError.
    """
    path = Path(str(baseline)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "eval.json").is_file():
        path = path / "eval.json"
    elif not (path.is_file() and path.suffix == ".json"):
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"baseline report {path} is not readable JSON ({err})",
                         "write it with `lpc eval MODEL ... --json > FILE.json` or `-o DIR`") from err
    if not isinstance(report, dict) or not isinstance(report.get("perplexity", {}), dict) \
            or not isinstance(report.get("tasks", {}), dict):
        raise InputError(f"baseline report {path} is not an lpc eval report",
                         "write it with `lpc eval MODEL ... --json > FILE.json` or `-o DIR`")
    details = report.get("details") or {}
    missing = [str(f) for f in ppl or [] if str(f) not in details]
    missing += [t for t in tasks or [] if t not in (report.get("tasks") or {})]
    if missing:
        raise InputError(f"baseline report {path} lacks {missing}",
                         "evaluate the original on the same --ppl files and --tasks, or pass the model")
    if limit is not None and tasks:
        counts = {t: report["tasks"][t].get("samples") for t in tasks}
        log.info("baseline report %s: task sample counts %s (limit %s here)", path, counts, limit)
    return {"model": report.get("model", str(path)), "perplexity": report.get("perplexity") or {},
            "tasks": {t: report["tasks"][t] for t in tasks or []},
            "details": {str(f): details[str(f)] for f in ppl or []}, "from": str(path)}


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


def gate_report(out: dict[str, Any], fail_under: float | None) -> None:
    """Record the gate in an evaluation report `out` (with its "recovery") and apply it: GateFailed
    carries the report (`err.report`), so the numbers are still shown and written."""
    if fail_under is None:
        return
    out["gate"] = {"fail_under_recovery": fail_under, "passed": True}
    try:
        check_gate(out["recovery"], fail_under)
    except GateFailed as err:
        out["gate"]["passed"] = False
        err.report = out  # type: ignore[attr-defined]
        raise


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
