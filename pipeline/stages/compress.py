"""`lpc compress`: the runner over the stages, every one in order into one output directory, resumable.

Layout of the output: calib/, [alloc/], quant/, [comp/], model/ (the exported artifact), [eval/],
compress.json (the run's inputs), summary.json (what ran, bits per weight, wall time, peak RSS).
Re-running with the same recipe and inputs skips every stage whose artifact is complete.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

from lpc.pipeline.artifact import store as art
from lpc.pipeline.stages.allocate import allocate
from lpc.pipeline.stages.base import StageResult, check_recipe_names
from lpc.pipeline.stages.calibrate import calibrate
from lpc.pipeline.stages.compensate import compensate
from lpc.pipeline.stages.evaluate import evaluate, read_report
from lpc.pipeline.stages.export import export
from lpc.pipeline.stages.quantize import quantize
from lpc.pipeline.errors import ArtifactError, GateFailed
from lpc.pipeline.io.models import resolve_model
from lpc.pipeline.progress import Progress
from lpc.recipes.schema import Recipe

log = logging.getLogger(__name__)
RUN_FILE = "compress.json"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _claim(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse an existing output that belongs to another run, unless overwrite."""
    run_file = out / RUN_FILE
    if out.exists() and any(out.iterdir()):
        same = run_file.is_file() and json.loads(run_file.read_text()) == json.loads(json.dumps(config))
        if not same and not overwrite:
            raise ArtifactError(f"output {out} already exists and holds another run",
                                "pass --overwrite to replace it, or choose another -o directory")
    out.mkdir(parents=True, exist_ok=True)
    art.write_json(run_file, config)


def compress(model: str, recipe: Recipe, data: str, out: Path, overwrite: bool = False, device: str = "cpu",
             progress: Progress | None = None, ppl: list[str] | None = None, tasks: list[str] | None = None,
             tasks_dir: str | None = None, limit: int | None = None,
             fail_under_recovery: float | None = None) -> dict[str, Any]:
    """Run calibrate -> [allocate] -> quantize -> [compensate] -> export -> [eval]; returns a summary."""
    t0 = time.perf_counter()
    check_recipe_names(recipe)
    src = resolve_model(model)
    config = {"model": src, "data": data, "recipe": recipe.model_dump(mode="json")}
    art.check_output(out, [src] if Path(src).exists() else [], overwrite=True)
    _claim(out, config, overwrite)
    results = [calibrate(src, data, out / "calib", recipe, overwrite=True, device=device, progress=progress)]
    results += _quantize_path(src, recipe, out, device, progress)
    last = results[-1].out
    results.append(export(last, out / "model", recipe.export.format, overwrite=True, progress=progress))
    summary: dict[str, Any] = {
        "model": src, "recipe": recipe.name, "out": str(out), "artifact": str(out / "model"),
        "bits_per_weight": results[-1].manifest.get("bits_per_weight"),
        "stages": [r.summary() for r in results],
    }
    ppl = ppl if ppl is not None else recipe.eval.ppl
    tasks = tasks if tasks is not None else (recipe.eval.tasks or None)
    gate = fail_under_recovery if fail_under_recovery is not None else recipe.eval.fail_under_recovery
    summary["compress_seconds"] = round(time.perf_counter() - t0, 3)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if ppl or tasks:
        summary.update(_evaluate(out, src, ppl, tasks, tasks_dir, limit or recipe.eval.limit, gate,
                                 recipe.eval.seq_len, device, progress))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    art.write_json(out / "summary.json", summary)
    return summary


def _quantize_path(src: str, recipe: Recipe, out: Path, device: str, progress: Progress | None) -> list[StageResult]:
    """allocate (when the recipe has an allocate section) -> quantize -> compensate (when asked)."""
    results = []
    plan = None
    if recipe.allocate is not None:
        results.append(allocate(out / "calib", recipe, out / "alloc", model=src, overwrite=True, progress=progress))
        plan = out / "alloc"
    results.append(quantize(src, recipe, out / "quant", calib=out / "calib", plan=plan, overwrite=True,
                            progress=progress, device=device))
    if recipe.compensate is not None:
        results.append(compensate(out / "quant", out / "calib", recipe, out / "comp", overwrite=True,
                                  progress=progress, device=device))
    return results


def _evaluate(out: Path, src: str, ppl, tasks, tasks_dir, limit, gate, seq_len, device, progress) -> dict[str, Any]:
    try:
        result = evaluate(out / "model", out / "eval", baseline=src, fail_under_recovery=gate, overwrite=True,
                          ppl=ppl, seq_len=seq_len, tasks=tasks, tasks_dir=tasks_dir, limit=limit, device=device,
                          progress=progress)
        report, failed = read_report(result.out), False
    except GateFailed as err:
        report, failed = getattr(err, "report", None), True
        log.warning("%s", err)
    return {"eval": report, "gate_failed": failed}
