"""One layer's compensation as stored (factors rounded to their storage format, errors before and
after, bits), and the choice of ranks over layers."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from lpc.formats import QTensor, get_format, stored_bits
from lpc.pipeline.compensation.lowrank import allocate_ranks, output_error, quantize_factors
from lpc.pipeline.compensation.methods import COMPENSATION_METHODS, LayerInputs, LowRankPath
from lpc.pipeline.progress import Progress, track
from lpc.recipes.schema import CompensateConfig, Recipe

log = logging.getLogger(__name__)


def low_rank_path(cfg: CompensateConfig, x: LayerInputs) -> LowRankPath:
    """The configured method's decomposition of one layer."""
    return COMPENSATION_METHODS.get(cfg.method)(cfg, x)


def compensate_layer(cfg: CompensateConfig, recipe: Recipe, name: str, x: LayerInputs, rank: int,
                      q: QTensor) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Factors of one layer as stored, and its manifest record (rank, errors before/after, bits)."""
    dW = x.W - x.Wq
    ref = max(output_error(x.W, x.C), 1e-30)
    before = output_error(dW, x.C) / ref
    rec = {"method": cfg.method, "mode": cfg.mode, "rank": rank, "factor_format": cfg.factor_format,
           "rel_output_error_before": before, "rel_output_error": before, "factor_bits": 0,
           "bits_per_weight": q.bits_per_weight()}
    if rank == 0:
        rec.update(method="none", mode="none")
        return None, rec
    B, A = low_rank_path(cfg, x).factors(rank)
    stored = _store(cfg, recipe, B, A, x.C)
    target = x.W if cfg.mode == "compress" else dW
    err = target - stored["B"].to(target) @ stored["A"].to(target)
    weight_bits = 0 if cfg.mode == "compress" else stored_bits(q)
    rec.update(rel_output_error=output_error(err, x.C) / ref, factor_bits=stored["bits"],
               bits_per_weight=(weight_bits + stored["bits"]) / q.numel)
    log.debug("compensate %s: rank %d, rel output error %.4g -> %.4g", name, rank, before, rec["rel_output_error"])
    return stored, rec


def _store(cfg: CompensateConfig, recipe: Recipe, B: torch.Tensor, A: torch.Tensor,
           C: torch.Tensor) -> dict[str, Any]:
    """Round the factors as the artifact stores them: {"B", "A" (fp32 as used), "bits", "packed"}."""
    s = quantize_factors(B.cpu(), A.cpu(), cfg.factor_format)
    if cfg.mode != "compress":
        return {"B": s.B, "A": s.A, "bits": s.bits, "packed": dict(s.packed)}
    qb, a_packed = _quantize_projected(B.cpu(), A.cpu(), C.cpu(), recipe), s.packed["lora_A"]
    return {"B": get_format(qb.format).dequantize(qb), "A": s.A, "bits": stored_bits(qb, a_packed),
            "packed": {"lora_B": qb, "lora_A": a_packed}}


def _quantize_projected(WP: torch.Tensor, Pt: torch.Tensor, C: torch.Tensor, recipe: Recipe) -> QTensor:
    """W P (out, L) in the recipe's weight format; its inputs P^T x have second moments diag(P^T C P)."""
    w = recipe.quantize.weights
    fmt = get_format(w.format)
    ctx = {}
    if recipe.quantize.importance != "none" and "importance" in fmt.context_keys:
        ctx["importance"] = ((Pt.double() @ C.double()) * Pt.double()).sum(1).clamp_min(0).float()
    return fmt.quantize(WP, **w.spec, **ctx)


def choose_ranks(cfg: CompensateConfig, names: list[str], qtensors: dict[str, QTensor],
                  path_of: Callable[[str], LowRankPath], progress: Progress | None) -> dict[str, int]:
    """One rank for all (capped at min(out, in)), or the budget spread over output-error curves."""
    caps = {n: min(qtensors[n].shape) for n in names}
    if cfg.budget_params is None:
        ranks = {n: min(cfg.rank, caps[n]) for n in names}
        for n in [n for n in names if cfg.rank > caps[n]]:
            log.info("compensate: rank %d capped at %d for layer %s", cfg.rank, caps[n], n)
        return ranks
    # Curves first (one decomposition resident at a time); factors are cut in the second pass.
    curves = {n: path_of(n).curve(caps[n]) for n in track(names, "compensate: error curves", progress)}
    cost = {n: qtensors[n].shape[0] + qtensors[n].shape[1] for n in names}
    return allocate_ranks(curves, cost, cfg.budget_params, caps)
