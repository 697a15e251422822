"""`lpc allocate`: decide which weights keep more precision.

Policies:
- fgmp (arXiv 2504.14152): score every block of 16 weights by the Fisher-weighted loss increase of
  NVFP4 over FP8, keep the top `fraction` of blocks model-wide in FP8; `random` and `magnitude`
  are the baselines at the same fraction. With `activations`, a threshold on the activation block
  score is fixed on calibration data so that `fraction` of activation blocks go FP8 at run time.
- vapr (arXiv 2310.07854, per Linear here): one format per layer from `candidates`, minimizing the
  summed predicted loss increase under `budget_bits` (exact multiple-choice knapsack), optionally
  refined by measured calibration loss; a Pareto front over `pareto_budgets`, as JSON and PNG.
Writes plan.json (per layer: format, spec, mask reference), masks.safetensors, pareto.json/png.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.artifact import store as art
from lpc.pipeline.allocation import vapr
from lpc.pipeline.calibration.stats import STATS_FILE, read_stats
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.io.models import find_targets, load_hf_model, model_files
from lpc.pipeline.progress import Progress
from lpc.pipeline.quantization.layers import group_amax
from lpc.pipeline.stages.core import StageResult, _run, calibration_batches_of
from lpc.recipes.schema import Recipe

log = logging.getLogger(__name__)
PLAN, MASKS = "plan.json", "masks.safetensors"


def allocate(calib: Path, recipe: Recipe, out: Path, model: str | None = None, overwrite: bool = False,
             progress: Progress | None = None) -> StageResult:
    """Write an allocation plan for the recipe's targets from a calibration artifact."""
    if recipe.allocate is None:
        raise RecipeError(f"recipe {recipe.name} has no allocate section",
                          "use an allocation recipe (fgmp_nvfp4, fgmp_nvfp4a16, vapr) or add one")
    cm = art.read_manifest(calib, "calibrate")
    src = model or cm["config"]["model"]
    a = recipe.allocate
    config = {"model": src, "calib": str(calib), "allocate": a.model_dump(mode="json"),
              "quantize": recipe.quantize.model_dump(mode="json"), "targets": recipe.targets, "ignore": recipe.ignore}

    def body(tmp: Path) -> dict[str, Any]:
        m = load_hf_model(src)
        targets = find_targets(m, recipe.targets, recipe.ignore)
        stats = read_stats(calib)
        ctx = _Context(m, targets, stats, recipe, cm, src, progress, Path(calib))
        plan, tensors, extra = (vapr.search(ctx, tmp) if a.policy == "vapr" else _fgmp(ctx))
        art.save_tensors(tensors or {"_empty": torch.zeros(1)}, tmp / MASKS)
        art.write_json(tmp / PLAN, plan)
        return {"layers": plan["layers"], "summary": {"policy": a.policy, **extra},
                "bits_per_weight": extra.get("bits_per_weight")}

    return _run("allocate", out, model_files(src) + [Path(calib) / STATS_FILE], config, overwrite, body)


class _Context:
    def __init__(self, model, targets, stats, recipe, calib_manifest, src, progress, calib_dir):
        self.model, self.targets, self.stats, self.recipe = model, targets, stats, recipe
        self.calib_manifest, self.src, self.progress = calib_manifest, src, progress
        self.calib_dir = calib_dir

    def fisher(self, name: str) -> torch.Tensor:
        s = self.stats.get(name, {})
        if "weight_fisher" not in s:
            raise InputError(f"the calibration has no Fisher statistics for {name}",
                             "calibrate with --fisher (or calibrate.fisher: true in the recipe)")
        return s["weight_fisher"]

    def batches(self) -> list[torch.Tensor]:
        return calibration_batches_of(self.calib_dir, self.src, self.model)


def _fgmp(ctx: _Context) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    from lpc.pipeline.allocation import fgmp as fp

    a = ctx.recipe.allocate
    weights = {n: m.weight.detach().float() for n, m in ctx.targets.items()}
    amax = group_amax(ctx.targets, {n: {"format": "fgmp"} for n in ctx.targets}, ctx.recipe.quantize.fuse_groups)
    if a.policy == "fgmp":
        scores = fp.weight_block_scores(weights, {n: ctx.fisher(n) for n in weights}, {n: float(v) for n, v in amax.items()})
        masks = fp.select_high_blocks(scores, a.fraction)
    elif a.policy == "random":
        shapes = {n: (w.shape[0], -(-w.shape[1] // 16)) for n, w in weights.items()}
        masks = fp.random_high_blocks(shapes, a.fraction, seed=a.seed)
    else:
        masks = fp.magnitude_high_blocks(weights, a.fraction)
    spec = {"clip": a.clip, **_low_spec(ctx.recipe)}
    layers, tensors = {}, {}
    for name, mask in masks.items():
        tensors[f"{name}.mask"] = mask.to(torch.uint8)
        layers[name] = {"format": "fgmp", "spec": spec, "mask": f"{name}.mask",
                        "high_fraction": float(mask.float().mean()),
                        "importance": "weight_fisher" if a.clip == "sensitivity" else None}
    in_features = {n: m.in_features for n, m in ctx.targets.items()}
    bits = fp.plan_bits_per_weight(masks, in_features)
    plan: dict[str, Any] = {"policy": a.policy, "fraction": a.fraction, "layers": layers}
    extra = {"bits_per_weight": bits, "high_fraction": sum(int(m.sum()) for m in masks.values()) /
             sum(m.numel() for m in masks.values()),
             "high_fraction_by_kind": fp.high_fraction_by_group(masks, lambda n: n.rsplit(".", 1)[-1])}
    if a.activations:
        plan["activations"], act_tensors, extra["activation_threshold"] = _activation_plan(ctx, a.fraction)
        tensors.update(act_tensors)
    return plan, tensors, extra


def _low_spec(recipe: Recipe) -> dict[str, Any]:
    """Spec keys of the recipe's weight format that the fgmp low (NVFP4) blocks understand."""
    spec = recipe.quantize.weights.spec if recipe.quantize.weights.format in ("nvfp4", "fgmp") else {}
    return {k: v for k, v in spec.items() if k == "scale_search"}


def _activation_plan(ctx: _Context, fraction: float) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
    from lpc.pipeline.allocation.fgmp import activation_threshold, collect_activation_scores

    act_fisher = {}
    for n in ctx.targets:
        if "act_fisher" not in ctx.stats.get(n, {}):
            raise InputError(f"the calibration has no activation Fisher for {n}",
                             "calibrate with --fisher (or calibrate.fisher: true in the recipe)")
        act_fisher[n] = ctx.stats[n]["act_fisher"]
    amax = {n: float(ctx.stats[n]["act_absmax"].max()) for n in ctx.targets}
    scores = collect_activation_scores(ctx.model, ctx.batches(), ctx.targets, act_fisher, amax,
                                       max_blocks_per_layer=200_000, seed=ctx.recipe.allocate.seed,
                                       progress=ctx.progress)
    threshold = activation_threshold(torch.cat([scores[n] for n in ctx.targets]), fraction)
    layers, tensors = {}, {}
    for n in ctx.targets:
        key = f"lpc.act.{n}.channel_importance"
        tensors[key] = act_fisher[n].float()
        layers[n] = {"format": "fgmp", "channel_importance": f"tensor:{key}", "threshold": threshold,
                     "global_amax": amax[n]}
    return {"layers": layers, "threshold": threshold}, tensors, threshold


def read_plan(alloc: Path, recipe: Recipe) -> tuple[Recipe, dict[str, Any], list[Path]]:
    """An allocation artifact -> (recipe, per-layer plan for the quantize stage, files it depends on).

    Plan entries: {"format", "spec", "context": {mask, importance}, "activation": {...}?}; an entry
    of None keeps the layer unquantized.
    """
    m = art.read_manifest(alloc, "allocate")
    plan = json.loads((Path(alloc) / PLAN).read_text())
    tensors = art.load_tensors(Path(alloc) / MASKS)
    needs_stats = any(isinstance(e, dict) and e.get("importance") for e in plan["layers"].values())
    stats = read_stats(m["config"]["calib"]) if needs_stats else {}
    acts = (plan.get("activations") or {}).get("layers", {})
    layer_plan: dict[str, Any] = {}
    for name, e in plan["layers"].items():
        if e is None:
            layer_plan[name] = None
            continue
        ctx: dict[str, Any] = {}
        if e.get("mask"):
            ctx["mask"] = tensors[e["mask"]].bool()
        if e.get("codebook"):
            ctx["codebook"] = tensors[e["codebook"]]
        if e.get("importance"):
            ctx["importance"] = stats[name][e["importance"]]
        layer_plan[name] = {"format": e["format"], "spec": e["spec"], "context": ctx}
        if name in acts:
            layer_plan[name]["activation"] = acts[name]
    aux = {k: v for k, v in tensors.items() if k.startswith("lpc.")}
    if aux:
        layer_plan["__aux__"] = aux
    return recipe, layer_plan, [Path(alloc) / PLAN, Path(alloc) / MASKS]
