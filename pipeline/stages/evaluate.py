"""`lpc eval`: load an artifact (or plain model), measure perplexity and lm-eval tasks, compare.

`evaluate_report` returns the report; `evaluate` is the stage: it writes eval.json and a manifest
into its output directory (the gate's threshold and verdict included, also when the gate fails).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lpc.pipeline.errors import GateFailed, InputError
from lpc.pipeline.progress import Progress
from lpc.pipeline.stages.base import StageResult, run_stage

log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"


def evaluate_model(path: str | Path, ppl: list[str] | None = None, seq_len: int = 256,
                   tasks: list[str] | None = None, tasks_dir: str | None = None, limit: int | None = None,
                   device: str = "cpu", progress: Progress | None = None, batch_size: int = 8,
                   max_length: int | None = None, kv_policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one model directory: {"perplexity": {file: value}, "tasks": {...}, "details": ...}.

    kv_policy {policy, budget, policy_options}: perplexity through that KV cache policy (else the
    artifact's kv_cache section's policy, if any)."""
    from lpc.pipeline.evaluation.perplexity import perplexity
    from lpc.pipeline.evaluation.tasks import run_tasks
    from lpc.pipeline.artifact.load import load
    from lpc.pipeline.artifact.store import check_before_loading

    if not ppl and not tasks:
        raise InputError("nothing to evaluate", "give --ppl FILE and/or --tasks NAME[,NAME]")
    from lpc.pipeline.io.device import check_device

    device = check_device(device)
    t0 = time.perf_counter()
    check_before_loading(path)  # a damaged artifact is refused, as lpc verify refuses it
    model, tok = load(path, device=device)
    report: dict[str, Any] = {"model": str(path), "perplexity": {}, "tasks": {}, "details": {}}
    kv_policy = kv_policy or _artifact_kv_policy(path)
    if kv_policy and tasks:
        raise InputError("lm-eval tasks do not run through a KV cache policy",
                         "evaluate perplexity (--ppl) with the policy, and tasks in a separate run without it")
    for f in ppl or []:
        if kv_policy:
            from lpc.pipeline.kvcache.decode import perplexity_with_policy
            from lpc.pipeline.evaluation.perplexity import token_windows

            r = perplexity_with_policy(model, token_windows(tok, f, seq_len), kv_policy["policy"],
                                       kv_policy["budget"], kv_policy.get("policy_options"), progress=progress)
        else:
            r = perplexity(model, tok, f, seq_len=seq_len, progress=progress, batch_size=batch_size)
        report["perplexity"][str(f)] = r["perplexity"]
        report["details"][str(f)] = r
    if tasks:
        report["tasks"] = run_tasks(model, tok, tasks, tasks_dir=tasks_dir, limit=limit, batch_size=batch_size,
                                    max_length=max_length)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _artifact_kv_policy(path: str | Path) -> dict[str, Any] | None:
    """The kv_cache section of an artifact's quantization_config when it names a policy."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    kv = (json.loads(cfg.read_text()).get("quantization_config") or {}).get("kv_cache") or {}
    return kv if kv.get("policy") else None


def evaluate_report(path: str | Path, baseline: str | Path | None = None, fail_under_recovery: float | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """Evaluate `path` (and `baseline` with the same settings); gate on recovery when asked.

    Returns {"perplexity", "tasks", "baseline": report | None, "recovery": float | None, "compare": ...}.
    Raises GateFailed (exit 3) when recovery < fail_under_recovery.
    """
    from lpc.pipeline.evaluation.compare import compare, gate_report

    if fail_under_recovery is not None and baseline is None:
        raise InputError("--fail-under-recovery needs --baseline MODEL", "give the model to compare against")
    from lpc.pipeline.evaluation.fidelity import encoder_report, is_encoder_dir

    if is_encoder_dir(path):  # no perplexity: fidelity of pooled embeddings to the original
        return encoder_report(path, baseline, fail_under_recovery, **kwargs)
    result = evaluate_model(path, **kwargs)
    out = {"perplexity": result["perplexity"], "tasks": result["tasks"], "baseline": None,
           "recovery": None, "model": str(path), "details": result["details"], "seconds": result["seconds"]}
    if baseline is not None:
        from lpc.pipeline.evaluation.compare import saved_baseline

        # A saved report of the original (lpc eval MODEL --json / -o DIR) is compared as is: no re-evaluation.
        saved = saved_baseline(baseline, kwargs.get("ppl"), kwargs.get("tasks"), kwargs.get("limit"))
        base = saved or evaluate_model(baseline, **kwargs)
        cmp = compare(_as_report(result), _as_report(base))
        out["baseline"] = {"model": str(baseline), "perplexity": base["perplexity"], "tasks": base["tasks"]}
        if saved:
            out["baseline"].update(model=saved["model"], report=saved["from"])
        out["compare"] = cmp
        if kwargs.get("ppl") and not saved:  # KL needs the baseline model itself
            out["kl_to_baseline"] = _kl_to_baseline(path, baseline, **kwargs)
        out["recovery"] = cmp.get("recovery")
        gate_report(out, fail_under_recovery)  # GateFailed carries the report: the CLI still shows the numbers
    return out


def evaluate(path: str | Path, out: Path, baseline: str | Path | None = None,
             fail_under_recovery: float | None = None, overwrite: bool = False, **kwargs: Any) -> StageResult:
    """The eval stage: `evaluate_report` written to out/eval.json with a manifest. A failed gate
    still writes the report (its `gate.passed` is false), then raises GateFailed."""
    from lpc.pipeline.artifact import store as art
    from lpc.pipeline.io.device import check_device

    kwargs["device"] = check_device(kwargs.get("device", "cpu"))  # refused before anything is written
    inputs = [*_files_of(path), *(_files_of(baseline) if baseline else []), *(kwargs.get("ppl") or [])]
    config = {"model": str(path), "baseline": str(baseline) if baseline else None,
              "fail_under_recovery": fail_under_recovery,
              **{k: v for k, v in kwargs.items() if k not in ("progress", "device")}}
    failed: list[GateFailed] = []

    def body(tmp: Path) -> dict[str, Any]:
        try:
            report = evaluate_report(path, baseline, fail_under_recovery, **kwargs)
        except GateFailed as err:
            report = err.report  # type: ignore[attr-defined]
            failed.append(err)
        art.write_json(tmp / EVAL_FILE, report)
        return {"summary": {"perplexity": report["perplexity"], "recovery": report["recovery"],
                            "kl_to_baseline": report.get("kl_to_baseline"), "gate": report.get("gate")}}

    result = run_stage("eval", out, inputs, config, overwrite, body)
    gate = result.manifest.get("summary", {}).get("gate") or {}
    if failed or gate.get("passed") is False:
        err = failed[0] if failed else GateFailed(f"recovery {result.manifest['summary']['recovery']} is under "
                                                  f"{gate.get('fail_under_recovery')}")
        err.report = json.loads((Path(out) / EVAL_FILE).read_text())  # type: ignore[attr-defined]
        raise err
    return result


def read_report(out: str | Path) -> dict[str, Any]:
    """The report an eval stage wrote."""
    return json.loads((Path(out) / EVAL_FILE).read_text())


def _files_of(model: str | Path) -> list[Path]:
    from lpc.pipeline.evaluation.compare import saved_baseline
    from lpc.pipeline.io.models import model_files, resolve_model

    saved = saved_baseline(model)
    if saved:
        return [Path(saved["from"])]
    return model_files(resolve_model(str(model)))


def _kl_to_baseline(path: str | Path, baseline: str | Path, ppl: list[str], seq_len: int = 256,
                    device: str = "cpu", progress: Progress | None = None, batch_size: int = 8,
                    **_: Any) -> dict[str, float]:
    """KL(baseline || model) per token on each perplexity file (both models loaded at once)."""
    from lpc.pipeline.evaluation.perplexity import kl_divergence
    from lpc.pipeline.artifact.load import load

    from lpc.pipeline.io.device import check_device

    device = check_device(device)
    model, tok = load(path, device=device)
    base, _tok = load(baseline, device=device)
    return {str(f): kl_divergence(model, base, tok, f, seq_len=seq_len, batch_size=batch_size,
                                  progress=progress)["kl"] for f in ppl}


def _as_report(r: dict[str, Any]) -> dict[str, Any]:
    """Adapt to evaluate.compare's input: perplexity details per file, tasks as returned."""
    return {"perplexity": r["details"], "tasks": r["tasks"]}
