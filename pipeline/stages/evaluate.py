"""`lpc eval`: load an artifact (or plain model), measure perplexity and lm-eval tasks, compare."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lpc.pipeline.errors import GateFailed, InputError
from lpc.pipeline.progress import Progress

log = logging.getLogger(__name__)


def evaluate_model(path: str | Path, ppl: list[str] | None = None, seq_len: int = 256,
                   tasks: list[str] | None = None, tasks_dir: str | None = None, limit: int | None = None,
                   device: str = "cpu", progress: Progress | None = None, batch_size: int = 8,
                   max_length: int | None = None) -> dict[str, Any]:
    """Evaluate one model directory: {"perplexity": {file: value}, "tasks": {...}, "details": ...}."""
    from lpc.pipeline.evaluation.metrics import perplexity, run_tasks
    from lpc.pipeline.artifact.load import load

    if not ppl and not tasks:
        raise InputError("nothing to evaluate", "give --ppl FILE and/or --tasks NAME[,NAME]")
    t0 = time.perf_counter()
    model, tok = load(path, device=device)
    report: dict[str, Any] = {"model": str(path), "perplexity": {}, "tasks": {}, "details": {}}
    for f in ppl or []:
        r = perplexity(model, tok, f, seq_len=seq_len, progress=progress, batch_size=batch_size)
        report["perplexity"][str(f)] = r["perplexity"]
        report["details"][str(f)] = r
    if tasks:
        report["tasks"] = run_tasks(model, tok, tasks, tasks_dir=tasks_dir, limit=limit, batch_size=batch_size,
                                    max_length=max_length)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def evaluate(path: str | Path, baseline: str | Path | None = None, fail_under_recovery: float | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Evaluate `path` (and `baseline` with the same settings); gate on recovery when asked.

    Returns {"perplexity", "tasks", "baseline": report | None, "recovery": float | None, "compare": ...}.
    Raises GateFailed (exit 3) when recovery < fail_under_recovery.
    """
    from lpc.pipeline.evaluation.metrics import check_gate, compare

    if fail_under_recovery is not None and baseline is None:
        raise InputError("--fail-under-recovery needs --baseline MODEL", "give the model to compare against")
    result = evaluate_model(path, **kwargs)
    out = {"perplexity": result["perplexity"], "tasks": result["tasks"], "baseline": None,
           "recovery": None, "model": str(path), "details": result["details"], "seconds": result["seconds"]}
    if baseline is not None:
        base = evaluate_model(baseline, **kwargs)
        cmp = compare(_as_report(result), _as_report(base))
        out["baseline"] = {"model": str(baseline), "perplexity": base["perplexity"], "tasks": base["tasks"]}
        out["compare"] = cmp
        if kwargs.get("ppl"):
            out["kl_to_baseline"] = _kl_to_baseline(path, baseline, **kwargs)
        out["recovery"] = cmp.get("recovery")
        if fail_under_recovery is not None:
            try:
                check_gate(out["recovery"], fail_under_recovery)
            except GateFailed as err:
                err.report = out  # type: ignore[attr-defined]  # the CLI still shows the numbers
                raise
    return out


def _kl_to_baseline(path: str | Path, baseline: str | Path, ppl: list[str], seq_len: int = 256,
                    device: str = "cpu", progress: Progress | None = None, batch_size: int = 8,
                    **_: Any) -> dict[str, float]:
    """KL(baseline || model) per token on each perplexity file (both models loaded at once)."""
    from lpc.pipeline.evaluation.metrics import kl_divergence
    from lpc.pipeline.artifact.load import load

    model, tok = load(path, device=device)
    base, _tok = load(baseline, device=device)
    return {str(f): kl_divergence(model, base, tok, f, seq_len=seq_len, batch_size=batch_size,
                                  progress=progress)["kl"] for f in ppl}


def _as_report(r: dict[str, Any]) -> dict[str, Any]:
    """Adapt to evaluate.compare's input: perplexity details per file, tasks as returned."""
    return {"perplexity": r["details"], "tasks": r["tasks"]}
