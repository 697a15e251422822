"""Stage entry points: each reads its inputs, writes one artifact directory, returns its manifest.

Each stage skips itself when its output already holds a complete artifact made from the same inputs
and config (resume), refuses an existing different output unless `overwrite`, and never modifies its
inputs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lpc.pipeline.artifact import store as art
from lpc.pipeline.calibration.stats import STATS_FILE, collect_input_stats, data_inputs, read_stats, stats_tensors
from lpc.pipeline.io.data import calibration_batches
from lpc.pipeline.errors import ArtifactError, RecipeError
from lpc.pipeline.artifact.lpc_model import read_qconfig, shared_bits, write_lpc_model
from lpc.pipeline.io.models import (
    copy_tokenizer_files, find_targets, load_hf_model, load_tokenizer, model_files, resolve_model,
)
from lpc.pipeline.progress import Progress
from lpc.pipeline.io.streaming import open_for_calibration
from lpc.pipeline.quantization.layers import bits_summary, layer_setups, plan_from_recipe, quantize_layers
from lpc.recipes.schema import Recipe

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("lpc", "dense", "peft", "compressed-tensors")


@dataclass
class StageResult:
    """What a stage did: its manifest, where, whether it was skipped, and how long it took."""

    stage: str
    out: Path
    manifest: dict[str, Any]
    skipped: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": str(self.out), "skipped": self.skipped,
                "seconds": round(self.seconds, 3), **self.manifest.get("summary", {}), **self.extra}


def _run(stage: str, out: Path, inputs: list[str | Path], config: dict[str, Any], overwrite: bool,
         body: Callable[[Path], dict[str, Any]]) -> StageResult:
    """Common frame: resume check, output checks, staging directory, manifest, timing."""
    records = [art.input_record(p) for p in inputs]
    t0 = time.perf_counter()
    if art.is_up_to_date(out, stage, records, config):
        log.info("%s: %s is up to date, skipping", stage, out)
        return StageResult(stage, out, art.read_manifest(out, stage), skipped=True)
    art.check_output(out, [p for p in inputs if Path(p).exists()], overwrite)
    with art.staging(out) as tmp:
        manifest = body(tmp)
        manifest = art.finish_manifest(tmp, {"stage": stage, "config": config, "inputs": records, **manifest})
    return StageResult(stage, out, manifest, seconds=time.perf_counter() - t0)


def calibrate(model: str, data: str, out: Path, recipe: Recipe, overwrite: bool = False,
              device: str = "cpu", progress: Progress | None = None) -> StageResult:
    """Collect input statistics (and Fisher with recipe.calibrate.fisher) of the recipe's targets."""
    c = recipe.calibrate
    src = resolve_model(model)
    config = {"model": src, "data": data, "samples": c.samples, "seq_len": c.seq_len, "fisher": c.fisher,
              "seed": c.seed, "targets": recipe.targets, "ignore": recipe.ignore}

    def body(tmp: Path) -> dict[str, Any]:
        tok = load_tokenizer(src)
        # Fisher (backward passes) and `--data self` (generation) need the whole model; plain
        # statistics stream one decoder layer at a time from the checkpoint.
        opened = None if c.fisher or data == "self" or not Path(src).is_dir() else \
            open_for_calibration(src, recipe.targets, recipe.ignore)
        m, store = opened if opened else (load_hf_model(src), None)
        targets = find_targets(m, recipe.targets, recipe.ignore)
        batches = calibration_batches(data, tok, c.samples, c.seq_len, model=m, seed=c.seed)
        stats = collect_input_stats(m, batches, targets, progress, device, store=store)
        if c.fisher:
            _add_fisher(m, batches, targets, stats, progress, device)
        art.save_tensors(stats_tensors(stats), tmp / STATS_FILE)
        tokens = sum(b.shape[1] for b in batches)
        layers = {n: {"in_features": mod.in_features, "out_features": mod.out_features, "rows": stats[n].count}
                  for n, mod in targets.items()}
        return {"layers": layers, "summary": {"samples": len(batches), "tokens": tokens, "layers": len(layers),
                                             "fisher": c.fisher}}

    return _run("calibrate", out, model_files(src) + data_inputs(data), config, overwrite, body)


def _add_fisher(model, batches, targets, stats, progress, device) -> None:
    from lpc.pipeline.calibration.fisher import fisher_statistics

    model.to(device)
    fisher = fisher_statistics(model, [b.to(device) for b in batches], targets, progress=progress)
    model.to("cpu")
    for name, f in fisher.items():
        stats[name].extra["weight_fisher"] = f["weight_fisher"].float().cpu()
        stats[name].extra["act_fisher"] = f["act_fisher"].float().cpu()


def quantize(model: str, recipe: Recipe, out: Path, calib: Path | None = None,
             plan: dict[str, Any] | None = None, plan_inputs: list[Path] | None = None,
             overwrite: bool = False, progress: Progress | None = None, device: str = "cpu") -> StageResult:
    """Quantize the recipe's targets (or a given per-layer plan) and write an lpc model directory.

    device: where `method: distill` tunes (the artifact is the same up to float rounding)."""
    src = resolve_model(model)
    stats_path = [Path(calib) / STATS_FILE] if calib else []
    config = {"model": src, "recipe": recipe.model_dump(mode="json"), "calib": str(calib) if calib else None}

    q = recipe.quantize
    if q.method == "distill" and calib is None:
        raise RecipeError("quantize.method=distill tunes on the calibration text, but no calibration was given",
                          "pass --calib DIR (from `lpc calibrate`), or use `lpc compress`")

    def body(tmp: Path) -> dict[str, Any]:
        m = load_hf_model(src)
        stats = read_stats(calib) if calib else None
        targets = find_targets(m, recipe.targets, recipe.ignore)
        layer_plan = plan if plan is not None else plan_from_recipe(recipe, list(targets))
        setups = layer_setups(targets, layer_plan, stats, q.fuse_groups, q.importance != "none", q.codebook_scope)
        tuned, report = _distill(m, targets, setups, stats, layer_plan, recipe, Path(calib), src, device, progress) \
            if q.method == "distill" else (None, None)
        qtensors, records = quantize_layers(targets, layer_plan, stats, progress=progress,
                                            method="rtn" if q.method == "distill" else q.method,
                                            weights=tuned, setups=setups)
        acts, aux = activation_config(recipe, qtensors, stats, layer_plan)
        write_lpc_model(tmp, m, qtensors, extra_tensors=aux, extra_config={"activations": acts} if acts else None)
        copy_tokenizer_files(src, tmp)
        summary = bits_summary(m, qtensors, targets)
        _, per_layer = shared_bits(qtensors)
        for name, own in per_layer.items():  # per-layer bits leave out what is stored once for all
            records[name]["bits_per_weight"] = (qtensors[name].storage_bits() - own) / qtensors[name].numel
            records[name]["shared_fields"] = True
        summary["activations"] = recipe.quantize.activations.format if recipe.quantize.activations else None
        if report is not None:
            summary["distill"] = report
        return {"recipe": recipe.model_dump(mode="json"), "layers": records, "summary": summary,
                "bits_per_weight": summary["bits_per_weight"]}

    return _run("quantize", out, model_files(src) + stats_path + list(plan_inputs or []), config, overwrite, body)


def calibration_batches_of(calib: Path, src: str, model: Any) -> list[Any]:
    """The token sequences a calibration artifact was collected on (rebuilt from its config)."""
    c = art.read_manifest(calib, "calibrate")["config"]
    return calibration_batches(c["data"], load_tokenizer(src), c["samples"], c["seq_len"], model=model, seed=c["seed"])


def _distill(m, targets, setups, stats, layer_plan, recipe: Recipe, calib: Path, src: str, device: str,
             progress: Progress | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tuned weights for `method: distill`, each layer's fake quantizer exactly as quantize_layers
    will apply it (the same `setups`: format, spec and context), the activations simulated as at eval."""
    from lpc.pipeline.quantization.distill import distill_weights
    from lpc.pipeline.artifact.load import activation_plan

    q = recipe.quantize
    quantizers = {n: _fake_quantizer(fmt, spec, ctx, targets[n].weight.dtype) for n, (fmt, spec, ctx) in setups.items()}
    acts, aux = activation_config(recipe, setups, stats, layer_plan)
    act_plan = activation_plan(acts, aux) if acts else None
    batches = calibration_batches_of(calib, src, m)
    d = q.distill
    m.to(device)
    try:
        tuned, report = distill_weights(m, {n: targets[n] for n in setups}, quantizers, batches, d.steps, d.lr,
                                        d.eval_every, d.patience, d.val_fraction, act_plan,
                                        batch_rows=d.batch_rows, progress=progress)
    finally:
        m.to("cpu")
    return tuned, report


def _fake_quantizer(fmt: Any, spec: dict[str, Any], ctx: dict[str, Any], dtype: Any) -> Callable:
    def fake(w: Any) -> Any:
        c = {k: (v.to(w.device) if hasattr(v, "to") else v) for k, v in ctx.items()}
        return fmt.fake_quantize(w.to(dtype), **spec, **c)
    return fake


def activation_config(recipe: Recipe, qtensors: dict[str, Any], stats, plan: dict[str, Any] | None = None
                      ) -> tuple[dict | None, dict]:
    """Activation quantization plan per quantized layer, and the tensors it refers to.

    An allocation plan's per-layer "activation" entries (FGMP mixing) win; otherwise the recipe's
    `quantize.activations` format applies to every quantized layer, its global amax calibrated.
    """
    plan = plan or {}
    from_plan = {n: e["activation"] for n, e in plan.items() if isinstance(e, dict) and e.get("activation")}
    if from_plan:
        return {"layers": {n: from_plan[n] for n in sorted(from_plan)}}, dict(plan.get("__aux__", {}))
    act = recipe.quantize.activations
    if act is None:
        return None, {}
    layers = {}
    for name in sorted(qtensors):
        amax = None
        if stats and name in stats and "act_absmax" in stats[name]:
            amax = float(stats[name]["act_absmax"].max())
        layers[name] = {"format": act.format, "spec": dict(act.spec), "global_amax": amax}
    return {"layers": layers}, {}


def export(src: Path, out: Path, fmt: str = "lpc", overwrite: bool = False,
           progress: Progress | None = None) -> StageResult:
    """Write a deployable model: `lpc` (packed, as is), `dense` (dequantized, low-rank paths merged,
    loadable anywhere), `peft` (dense quantized base + PEFT LoRA adapter in adapter/) or
    `compressed-tensors` (NVFP4/FP8 layers in compressed-tensors' layout, see export_ct)."""
    manifest = art.read_manifest(src, ("quantize", "compensate", "export"))
    problems = art.verify_files(src, manifest)
    if problems:
        raise ArtifactError(f"{src}: {problems[0]}", "the artifact was changed or damaged; re-run the stage")
    config = {"format": fmt}

    def body(tmp: Path) -> dict[str, Any]:
        summary = dict(manifest.get("summary", {}))
        if fmt == "lpc":
            for name in sorted(manifest["files"]):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes((Path(src) / name).read_bytes())
        elif fmt == "peft":
            from lpc.pipeline.export.peft import write_peft
            summary.update(write_peft(Path(src), tmp))
        elif fmt == "compressed-tensors":
            from lpc.pipeline.export.compressed_tensors import write_compressed_tensors
            summary.update(write_compressed_tensors(Path(src), tmp))
        else:
            summary["dropped"] = _write_dense(Path(src), tmp)
        summary["format"] = fmt
        return {"recipe": manifest.get("recipe"), "layers": manifest.get("layers", {}), "summary": summary,
                "bits_per_weight": manifest.get("bits_per_weight")}

    inputs = [Path(src) / n for n in sorted(manifest["files"])]
    return _run("export", out, inputs, config, overwrite, body)


def _write_dense(src: Path, tmp: Path) -> list[str]:
    """Dequantized weights (low-rank paths merged) as a plain HF model; returns what had to be dropped."""
    from lpc.pipeline.artifact.load import load

    qconfig = read_qconfig(src) or {}
    model, tok = load(src, activations=False, merge_lowrank=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    copy_tokenizer_files(src, tmp)
    dropped = []
    if qconfig.get("activations"):
        dropped.append("activation quantization (a dense model has none; evaluate the lpc artifact for W+A)")
        log.warning("dense export drops the simulated activation quantization")
    return dropped
