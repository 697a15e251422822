"""`lpc compress`: the runner over the stages, every one in order, into one output directory that IS the
finished model, with the stage artifacts kept inside it for resuming.

Layout of out/ (see README "What is where in out/"):

    config.json, model.safetensors, tokenizer files,   the exported model (export.format), as the export
    manifest.json [, adapter/, hf_quant_config.json]    stage wrote it: hard links to stages/export/ (no copy)
    compress.json                                       the run's inputs; written LAST: marks a finished run
    summary.json                                        what ran, bits per weight, eval, wall time, peak RSS
    stages/calib, [alloc], quant, [comp], export, [eval]  each a resumable stage artifact with its manifest

Weights are stored once: the export's files are hard-linked into out/ (and an lpc export hard-links the
quant/comp weights), so they share one copy on disk (a copy only where the filesystem has no hard links).

Claiming: a directory that holds a finished run (compress.json) with other inputs is refused unless
`overwrite`; an empty directory, or one holding only an unfinished lpc run (no compress.json: a failed or
interrupted run), is reused, since every stage re-runs unless its own inputs and config are unchanged.
So a failed compress never blocks its own corrected re-run. At the start of every run the run-level
files (compress.json, summary.json, the published model files) and the stage artifacts this recipe
does not produce are removed: nothing stale (e.g. an eval of another recipe) survives a re-run.
Run-level files are written atomically (temp name, fsync, rename).
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
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
from lpc.pipeline.kvcache import check_kv_model
from lpc.pipeline.progress import Progress
from lpc.recipes.schema import Recipe

log = logging.getLogger(__name__)
RUN_FILE = "compress.json"
SUMMARY_FILE = "summary.json"
STAGES_DIR = "stages"
STAGE_DIRS = ("calib", "alloc", "quant", "comp", "export", "eval")
# hidden temp entries of an interrupted write (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`): lpc's own
_HIDDEN_TEMP = re.compile(r"^\..+\.(?:tmp|old)-\d+$")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def stage_dir(out: Path, name: str) -> Path:
    """Where stage `name` (calib, alloc, quant, comp, export, eval) of the run in `out` lives."""
    return Path(out) / STAGES_DIR / name


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON written to a temp name, fsynced, renamed over `path`: a reader sees the old or the new file."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        art.write_json(tmp, obj)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _published(out: Path) -> list[str]:
    """Top-level names of the model published into `out` (listed by its manifest), manifest included."""
    names = set()
    for manifest in (out / art.MANIFEST, stage_dir(out, "export") / art.MANIFEST):
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            continue
        names.update(str(f).split("/")[0] for f in files if isinstance(f, str))
    return sorted(n for n in names if n and n not in (".", "..") and "/" not in n) + [art.MANIFEST]


def _lpc_entries(out: Path) -> set[str]:
    """Entries of `out` that an lpc run writes (everything else is foreign to it)."""
    return {RUN_FILE, SUMMARY_FILE, STAGES_DIR, *_published(out)}


def _read_run(out: Path) -> Any:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return "unreadable"


def _claim(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse an `out` that holds a finished run with other inputs, or files lpc did not write, unless
    overwrite; then clear the run-level results (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} is a file", "choose a directory for -o")
    entries = {p.name for p in out.iterdir() if not _HIDDEN_TEMP.match(p.name)} if out.exists() else set()
    if (out / RUN_FILE).exists() and _read_run(out) != json.loads(json.dumps(config)) and not overwrite:
        raise ArtifactError(f"output {out} already exists and holds another run",
                            "pass --overwrite to replace it, or choose another -o directory")
    foreign = sorted(entries - _lpc_entries(out))
    if foreign and not overwrite:
        raise ArtifactError(f"output {out} already exists and holds files lpc did not write ({foreign[0]})",
                            "pass --overwrite to write the run into it anyway, or choose another -o directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in (RUN_FILE, SUMMARY_FILE, *_published(out)):
        _remove(out / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _drop_unused_stages(out: Path, used: set[str]) -> None:
    """Stage artifacts of an earlier run that this recipe does not produce (alloc, comp, eval) are stale."""
    for name in STAGE_DIRS:
        if name not in used and stage_dir(out, name).exists():
            log.info("removing %s: this run does not produce it", stage_dir(out, name))
            _remove(stage_dir(out, name))


def _inside(directory: Path, name: str) -> Path:
    """directory/name, refused unless it stays inside `directory` (names come from a manifest)."""
    path = Path(directory) / name
    if Path(name).is_absolute() or Path(directory).resolve() not in path.resolve().parents:
        raise ArtifactError(f"{directory}: manifest names a file outside the artifact ({name})",
                            "the artifact is damaged or crafted; re-create it")
    return path


def publish(export_dir: Path, out: Path) -> list[str]:
    """Hard-link every file of the export artifact into `out` (copy where links are impossible), the
    manifest last; returns the top-level names published."""
    manifest = art.read_manifest(export_dir, "export")
    names = sorted(manifest["files"]) + [art.MANIFEST]
    for name in names:
        src, dst = _inside(export_dir, name), _inside(out, name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    _fsync_dir(out)
    return sorted({n.split("/")[0] for n in names})


def compress(model: str, recipe: Recipe, data: str, out: Path, overwrite: bool = False, device: str = "cpu",
             progress: Progress | None = None, ppl: list[str] | None = None, tasks: list[str] | None = None,
             tasks_dir: str | None = None, limit: int | None = None,
             fail_under_recovery: float | None = None) -> dict[str, Any]:
    """Run calibrate -> [allocate] -> quantize -> [compensate] -> export -> [eval] into `out` (the
    finished model; stage artifacts under out/stages/); returns the summary (also out/summary.json)."""
    from lpc.pipeline.io.device import check_device

    t0 = time.perf_counter()
    out = Path(out)
    device = check_device(device)
    check_recipe_names(recipe)
    src = resolve_model(model)
    check_kv_model(src, recipe)
    ppl = ppl if ppl is not None else recipe.eval.ppl
    tasks = tasks if tasks is not None else (recipe.eval.tasks or None)
    gate = fail_under_recovery if fail_under_recovery is not None else recipe.eval.fail_under_recovery
    limit = limit or recipe.eval.limit
    config = {"model": src, "data": data, "recipe": recipe.model_dump(mode="json"),
              "eval": {"ppl": [str(p) for p in ppl or []], "tasks": list(tasks or []), "tasks_dir": tasks_dir,
                       "limit": limit, "fail_under_recovery": gate}}
    art.check_output(out, [src] if Path(src).exists() else [], overwrite=True)
    created = not out.exists()
    _claim(out, config, overwrite)
    try:
        summary = _run(out, src, data, recipe, device, progress, evaluating=bool(ppl or tasks))
    except BaseException:
        if created and not any(stage_dir(out, n).exists() for n in STAGE_DIRS):
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before any stage leaves nothing
        raise
    summary["compress_seconds"] = round(time.perf_counter() - t0, 3)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if ppl or tasks:
        summary.update(_evaluate(out, src, ppl, tasks, tasks_dir, limit, gate, recipe.eval.seq_len, device,
                                 progress))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / SUMMARY_FILE, summary)
    write_json_atomic(out / RUN_FILE, config)  # last: the run is finished
    return summary


def _run(out: Path, src: str, data: str, recipe: Recipe, device: str, progress: Progress | None,
         evaluating: bool) -> dict[str, Any]:
    """The stages, then the export published into `out`; returns the summary so far."""
    optional = {"alloc": recipe.allocate is not None, "comp": recipe.compensate is not None, "eval": evaluating}
    _drop_unused_stages(out, {"calib", "quant", "export"} | {k for k, on in optional.items() if on})
    results = [calibrate(src, data, stage_dir(out, "calib"), recipe, overwrite=True, device=device,
                         progress=progress)]
    results += _quantize_path(src, recipe, out, device, progress)
    results.append(export(results[-1].out, stage_dir(out, "export"), recipe.export.format, overwrite=True,
                          progress=progress))
    publish(stage_dir(out, "export"), out)
    exported = results[-1].manifest.get("summary", {})
    return {"model": src, "recipe": recipe.name, "out": str(out), "artifact": str(out),
            "format": exported.get("format", recipe.export.format), "format_reason": exported.get("format_reason"),
            "bits_per_weight": results[-1].manifest.get("bits_per_weight"),
            "stages": [r.summary() for r in results]}


def _quantize_path(src: str, recipe: Recipe, out: Path, device: str, progress: Progress | None) -> list[StageResult]:
    """allocate (when the recipe has an allocate section) -> quantize -> compensate (when asked)."""
    results = []
    plan = None
    if recipe.allocate is not None:
        plan = stage_dir(out, "alloc")
        results.append(allocate(stage_dir(out, "calib"), recipe, plan, model=src, overwrite=True, progress=progress))
    results.append(quantize(src, recipe, stage_dir(out, "quant"), calib=stage_dir(out, "calib"), plan=plan,
                            overwrite=True, progress=progress, device=device))
    if recipe.compensate is not None:
        results.append(compensate(stage_dir(out, "quant"), stage_dir(out, "calib"), recipe, stage_dir(out, "comp"),
                                  overwrite=True, progress=progress, device=device))
    return results


def _evaluate(out: Path, src: str, ppl, tasks, tasks_dir, limit, gate, seq_len, device, progress) -> dict[str, Any]:
    try:
        result = evaluate(stage_dir(out, "export"), stage_dir(out, "eval"), baseline=src, fail_under_recovery=gate,
                          overwrite=True, ppl=ppl, seq_len=seq_len, tasks=tasks, tasks_dir=tasks_dir, limit=limit, device=device,
                          progress=progress)
        report, failed = read_report(result.out), False
    except GateFailed as err:
        report, failed = getattr(err, "report", None), True
        log.warning("%s", err)
    if report is not None:
        _card_with_evaluation(out, report)
    return {"eval": report, "gate_failed": failed}


def _card_with_evaluation(out: Path, report: dict[str, Any]) -> None:
    """The published model's card gains the evaluation; its manifest is replaced (not written through
    the hard link to stages/export) with the card's new hash, so `lpc verify out/` still holds."""
    from lpc.pipeline.artifact.card import CARD, write_card

    manifest = art.read_manifest(out)
    if CARD not in manifest.get("files", {}):
        return
    write_card(out, manifest, evaluation=report)
    manifest["files"][CARD] = art.sha256_file(out / CARD)
    write_json_atomic(out / art.MANIFEST, manifest)
