"""Quantize the target Linears of a model according to a per-layer plan.

A plan maps a Linear's name to {"format": name, "spec": {...}} (plus optional context tensors such as
an FGMP `mask`); `plan_from_recipe` builds the uniform plan of a recipe. Fused groups (q/k/v, gate/up)
share one global amax so engines can fuse them.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Callable

import torch
from torch import nn

from lpc.formats import QTensor, get_format, stored_bits
from lpc.pipeline.calibration.stored import resolve_refs
from lpc.pipeline.io.models import fuse_groups
from lpc.pipeline.progress import Progress, track
from lpc.pipeline.quantization.registry import QUANTIZE_METHODS
from lpc.recipes.schema import Recipe

log = logging.getLogger(__name__)


def plan_from_recipe(recipe: Recipe, names: list[str]) -> dict[str, dict[str, Any] | None]:
    """Uniform plan: the recipe's weight format for every target, unless an override matches.

    A layer mapped to None stays unquantized.
    """
    plan: dict[str, dict[str, Any] | None] = {}
    for name in names:
        choice = recipe.quantize.weights
        for ov in recipe.quantize.overrides:
            if fnmatch.fnmatchcase(name, ov.match) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], ov.match):
                choice = ov.weights
                break
        plan[name] = None if choice is None else {"format": choice.format, "spec": dict(choice.spec)}
    return plan


def group_amax(targets: dict[str, nn.Linear], plan: dict[str, Any], groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """Global amax per layer: the max over its fused group (layers of one format only)."""
    out = {}
    for group in fuse_groups([n for n in targets if isinstance(plan.get(n), dict)], groups):
        fmts = {plan[n]["format"] for n in group}
        members = group if len(fmts) == 1 else None
        for n in group:
            sel = members or [n]
            out[n] = torch.stack([targets[m].weight.detach().abs().amax().float() for m in sel]).amax()
    return out


def shared_codebooks(targets: dict[str, nn.Linear], plan: dict[str, Any],
                     weight_of: Callable[[str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """LO-BCQ: one codebook set fitted over all bcq layers of the model (per Nc), by layer name.

    weight_of: name -> the layer's weight (float), read when its blocks are sampled, one at a time (a
    streamed quantize reads them from the checkpoint; `targets` may then be a meta skeleton's)."""
    from lpc.formats.codebooks import LazyWeight, fit_codebooks

    weight_of = weight_of or (lambda n: targets[n].weight.detach().float())
    by_nc: dict[int, list[str]] = {}
    for name in targets:
        entry = plan.get(name)
        if isinstance(entry, dict) and entry["format"] == "bcq" and "codebook" not in entry.get("context", {}):
            by_nc.setdefault(int(entry["spec"].get("codebooks", 16)), []).append(name)
    out = {}
    for nc, names in by_nc.items():
        lazy = [LazyWeight(tuple(targets[n].weight.shape), lambda n=n: weight_of(n)) for n in names]
        book = fit_codebooks(lazy, codebooks=nc).codebook
        out.update({n: book for n in names})
    return out


def second_moment(stat: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """E[x^2] per input channel (in,): the diagonal of act_cov, or act_sqmean when only it was collected."""
    if "act_cov" in stat:
        return torch.diagonal(stat["act_cov"])
    return stat.get("act_sqmean")


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t.to(device) if t is not None else None


def layer_errors(w: torch.Tensor, wq: torch.Tensor, cov: torch.Tensor | None) -> dict[str, float]:
    """Weight SQNR (dB) and, with an input covariance C, relative output error tr(E C E^T)/tr(W C W^T).

    cov: (in, in), or its diagonal (in,) (calibrations made for round-to-nearest keep only that; the
    error then ignores correlations between input channels)."""
    w = w.to(torch.float32, copy=True)  # squared in place below: never the caller's tensor
    e = w - wq.float()
    if cov is not None and cov.dim() == 2:
        num, den = ((e @ cov) * e).sum().item(), ((w @ cov) * w).sum().item()
    elif cov is not None:  # per-channel sums first: one matrix-vector product each
        num = den = None
    e2, w2 = e.square_(), w.square_()
    err = e2.sum().item()
    out = {"sqnr_db": 10 * torch.log10(torch.tensor(w2.sum().item() / max(err, 1e-30))).item()}
    if cov is not None:
        if num is None:
            num, den = (e2.sum(0) @ cov).item(), (w2.sum(0) @ cov).item()
        out["rel_output_error"] = num / max(den, 1e-30)
    return out


def layer_setups(targets: dict[str, nn.Linear], plan: dict[str, dict[str, Any] | None],
                 stats: dict[str, dict[str, torch.Tensor]] | None = None,
                 fuse: list[list[str]] | None = None, use_importance: bool = True,
                 codebook_scope: str = "model", codebooks: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, tuple[Any, dict[str, Any], dict[str, Any]]]:
    """Per planned Linear: (format, spec, context) exactly as `quantize_layers` quantizes it.

    The context holds the plan entry's tensors (an FGMP `mask`, a Fisher `importance`), the fused
    group's global amax, a model-wide codebook, and the input second moment as importance.
    codebooks: the model-wide LO-BCQ codebooks by layer name, when already fitted (a streamed quantize
    fits them over the whole model before its walk; here `targets` are one decoder layer's).
    """
    amax = group_amax(targets, plan, fuse or [])
    shared = codebooks if codebooks is not None else \
        shared_codebooks(targets, plan) if codebook_scope == "model" else {}
    out = {}
    for name in [n for n in targets if isinstance(plan.get(n), dict)]:
        entry = plan[name]
        fmt = get_format(entry["format"])
        ctx = resolve_refs(entry.get("context", {}))  # a plan's Fisher importance is read now, layer by layer
        if name in shared:
            ctx.setdefault("codebook", shared[name])
        second = second_moment(stats[name]) if stats and name in stats else None
        if "global_amax" in fmt.context_keys:
            ctx.setdefault("global_amax", amax[name])
        if use_importance and second is not None and "importance" in fmt.context_keys:
            ctx.setdefault("importance", second.clamp_min(0))
        out[name] = (fmt, dict(entry["spec"]), ctx)
    return out


def quantize_layers(targets: dict[str, nn.Linear], plan: dict[str, dict[str, Any] | None],
                    stats: dict[str, dict[str, torch.Tensor]] | None = None,
                    fuse: list[list[str]] | None = None, use_importance: bool = True,
                    progress: Progress | None = None, method: str = "rtn",
                    codebook_scope: str = "model",
                    weights: dict[str, torch.Tensor] | None = None,
                    setups: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] | None = None,
                    device: str = "cpu", rounded: dict[str, QTensor] | None = None
                    ) -> tuple[dict[str, QTensor], dict[str, dict[str, Any]]]:
    """Quantize each planned Linear's weight; returns QTensors and per-layer records.

    stats: per layer {"act_cov": (in, in), ...} from calibration; the diagonal of act_cov (the
    input second moment) weighs each input channel in scale selection when `use_importance`.
    An entry's "context" (e.g. an FGMP `mask`, a Fisher `importance`) is passed to the format.
    method: a registered quantize method's name; its `round` quantizes each layer (gptq adds
    second-order error feedback over act_cov for block formats).
    weights: layer name -> the weight to quantize instead of the layer's own (tuned weights);
    scales that depend on the whole tensor (global amax, codebooks) still come from the layers,
    and errors are measured against the layers' own weights.
    setups: `layer_setups` of the same arguments, when the caller already has them.
    rounded: layer name -> the QTensor to store, already computed (layer-wise tuning hands over the
    rounding it measured: `weights[name]` on the frozen grid of plain rounding, or plain rounding itself):
    stored as is, not rounded again.
    device: where rounding, scale search and GPTQ compute (the QTensors come back on the CPU).
    """
    setups = setups if setups is not None else layer_setups(targets, plan, stats, fuse, use_importance,
                                                            codebook_scope)
    weights = weights or {}
    round_layer = QUANTIZE_METHODS.get(method).round
    qtensors, records = {}, {}
    for name in track(list(setups), "quantize", progress):
        fmt, spec, ctx = setups[name]
        w = targets[name].weight.detach()
        src = weights[name].to(w.dtype) if name in weights else w
        stat = stats[name] if stats and name in stats else {}
        cov = stat.get("act_cov")
        if device != "cpu":
            src, cov, ctx = src.to(device), cov.to(device) if cov is not None else None, _to(ctx, device)
        q = rounded[name] if rounded and name in rounded else round_layer(fmt, src, spec, ctx, cov)
        wq = fmt.dequantize(q)
        errors = layer_errors(w.to(wq.device), wq, cov if cov is not None else _on(stat.get("act_sqmean"), wq.device))
        q = q if device == "cpu" else _qtensor_to_cpu(q)
        qtensors[name] = q
        records[name] = {**q.meta(), "bits_per_weight": q.bits_per_weight(), **errors}
    return qtensors, records


def _to(ctx: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ctx.items()}


def _qtensor_to_cpu(q: QTensor) -> QTensor:
    import dataclasses

    return dataclasses.replace(q, data={k: t.cpu() for k, t in q.data.items()})


def bits_summary(model: nn.Module, qtensors: dict[str, QTensor], targets: dict[str, nn.Linear]) -> dict[str, float]:
    """Average bits per weight over target Linear weights (unquantized targets count 16/32 bits).

    Fields stored once for many layers (a model-wide codebook) count once.
    """
    from lpc.pipeline.artifact.lpc_model import shared_bits

    bits, per_layer = shared_bits(qtensors)
    numel = 0
    for name, mod in targets.items():
        n = mod.weight.numel()
        numel += n
        bits += stored_bits(qtensors[name]) - per_layer.get(name, 0) if name in qtensors else stored_bits(mod.weight)
    return {"bits_per_weight": bits / max(numel, 1), "quantized_layers": len(qtensors),
            "target_layers": len(targets), "target_params": numel}
