"""Block-level plans (FGMP, arXiv 2504.14152): every block of 16 weights FP8 or NVFP4.

Policies `fgmp` (Fisher-weighted score of NVFP4 over FP8), and the baselines `random` and `magnitude`
at the same fraction; with `activations`, a threshold on the activation block score is fixed on
calibration data so that `fraction` of activation blocks go FP8 at run time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lpc.pipeline.allocation import fgmp as fp
from lpc.pipeline.allocation.registry import ALLOCATION_POLICIES, AllocationContext
from lpc.pipeline.calibration.stored import stat_fields, stat_names
from lpc.pipeline.errors import InputError
from lpc.pipeline.io.models import fuse_groups
from lpc.pipeline.io.streaming import trim_heap
from lpc.pipeline.progress import track
from lpc.recipes.schema import Recipe


def block_plan(ctx: AllocationContext, tmp: Path | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Masks from one weight at a time (`ctx.weight`): the model is never loaded for weight scores."""
    a = ctx.recipe.allocate
    if a.policy == "fgmp":
        amax = _group_amax(ctx)
        scores = _each_weight(ctx, "weight block scores",
                              lambda n: fp.weight_block_scores({n: ctx.weight(n)}, {n: ctx.fisher(n)}, {n: amax[n]})[n])
        masks = fp.select_high_blocks(scores, a.fraction)
    elif a.policy == "random":
        shapes = {n: (ctx.shape(n)[0], -(-ctx.shape(n)[1] // fp.BLOCK)) for n in ctx.names}
        masks = fp.random_high_blocks(shapes, a.fraction, seed=a.seed)
    else:
        scores = _each_weight(ctx, "weight block magnitudes", lambda n: fp.magnitude_scores(ctx.weight(n)))
        masks = fp.select_high_blocks(scores, a.fraction)
    spec = {"clip": a.clip, **_low_spec(ctx.recipe)}
    layers, tensors = {}, {}
    for name, mask in masks.items():
        tensors[f"{name}.mask"] = mask.to(torch.uint8)
        layers[name] = {"format": "fgmp", "spec": spec, "mask": f"{name}.mask",
                        "high_fraction": float(mask.float().mean()),
                        "importance": "weight_fisher" if a.clip == "sensitivity" else None}
    in_features = {n: ctx.shape(n)[1] for n in ctx.names}
    bits = fp.plan_bits_per_weight(masks, in_features)
    plan: dict[str, Any] = {"policy": a.policy, "fraction": a.fraction, "layers": layers}
    extra = {"bits_per_weight": bits, "high_fraction": sum(int(m.sum()) for m in masks.values()) /
             sum(m.numel() for m in masks.values()),
             "high_fraction_by_kind": fp.high_fraction_by_group(masks, lambda n: n.rsplit(".", 1)[-1])}
    if a.activations:
        plan["activations"], act_tensors, extra["activation_threshold"] = _activation_plan(ctx, a.fraction)
        tensors.update(act_tensors)
    return plan, tensors, extra


def _group_amax(ctx: AllocationContext) -> dict[str, float]:
    """Each target's NVFP4 global amax: the max over its fused group (q/k/v, gate/up), one weight read at a time."""
    own = _each_weight(ctx, "weight amax", lambda n: float(ctx.weight(n).abs().amax()))
    return {n: max(own[m] for m in group) for group in fuse_groups(ctx.names, ctx.recipe.quantize.fuse_groups)
            for n in group}


def _each_weight(ctx: AllocationContext, label: str, fn: Callable[[str], Any]) -> dict[str, Any]:
    """fn(name) for every target in order, the C heap trimmed after each (one weight and its temporaries
    at a time: without the trim, freed weights' memory stays with the process and RSS climbs with depth)."""
    out = {}
    for n in track(ctx.names, label, ctx.progress):
        out[n] = fn(n)
        trim_heap()
    return out


def _low_spec(recipe: Recipe) -> dict[str, Any]:
    """Spec keys of the recipe's weight format that the fgmp low (NVFP4) blocks understand."""
    spec = recipe.quantize.weights.spec if recipe.quantize.weights.format in ("nvfp4", "fgmp") else {}
    return {k: v for k, v in spec.items() if k == "scale_search"}


def _activation_plan(ctx: AllocationContext, fraction: float) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
    act_fisher, amax = {}, {}
    for n in ctx.names:  # the small statistics only (a layer's weight Fisher is the size of its weight)
        if "act_fisher" not in stat_names(ctx.stats, n):
            raise InputError(f"the calibration has no activation Fisher for {n}",
                             "calibrate with --fisher (or calibrate.fisher: true in the recipe)")
        s = stat_fields(ctx.stats, n, ["act_fisher", "act_absmax"])
        act_fisher[n], amax[n] = s["act_fisher"], float(s["act_absmax"].max())
    opts = dict(max_blocks_per_layer=200_000, seed=ctx.recipe.allocate.seed, progress=ctx.progress)
    streamed = ctx.streamed()
    if streamed is not None:  # one decoder layer resident at a time
        model, found, store, targets = streamed
        scores = fp.collect_activation_scores_layerwise(model, found, store, ctx.batches(), targets, act_fisher, amax,
                                                        **opts)
    else:
        scores = fp.collect_activation_scores(ctx.model, ctx.batches(), ctx.targets, act_fisher, amax, **opts)
    threshold = fp.activation_threshold([scores.pop(n) for n in ctx.names], fraction)
    layers, tensors = {}, {}
    for n in ctx.names:
        key = f"lpc.act.{n}.channel_importance"
        tensors[key] = act_fisher[n].float()
        layers[n] = {"format": "fgmp", "channel_importance": f"tensor:{key}", "threshold": threshold,
                     "global_amax": amax[n]}
    return {"layers": layers, "threshold": threshold}, tensors, threshold


for _name in ("fgmp", "random", "magnitude"):
    ALLOCATION_POLICIES.add(_name, block_plan)
