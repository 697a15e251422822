"""VaPr-style format search (arXiv 2310.07854, here one format per Linear layer).

Each layer gets candidate options (format, exact stored bits, predicted loss increase); an exact
multiple-choice knapsack picks the least total predicted loss under an average bits budget.
Predicted loss is the Fisher-weighted perturbation sum F (w - Q(w))^2 (cheap) or the measured
calibration-loss change of quantizing that layer alone (exact, slower). Optional refinement
measures the loss of the knapsack optimum and of its Lagrangian neighbours under the budget and
keeps the best measured one. The Pareto front (bits vs predicted and measured loss) goes to JSON/PNG.
"""
from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from lpc.formats import get_format, stored_bits
from lpc.pipeline.artifact import store as art
from lpc.pipeline.allocation.engine import ENGINE_FORMATS, engine_groups, expand
from lpc.pipeline.allocation.registry import ALLOCATION_POLICIES
from lpc.pipeline.allocation.knapsack import Layer, Option, Solution, lagrangian_hull, pareto_front, solve
from lpc.pipeline.allocation.measure import mean_loss, swapped_weights
from lpc.pipeline.progress import track
from lpc.pipeline.quantization.layers import second_moment

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = [
    {"format": "bf16", "spec": {}}, {"format": "fp8_e4m3", "spec": {}}, {"format": "mxfp8", "spec": {}},
    {"format": "nvfp4", "spec": {"scale_search": 2}}, {"format": "mxfp4", "spec": {}},
]


def _labels(cands: list[dict[str, Any]]) -> list[str]:
    labels = []
    for c in cands:
        label = c["format"] if sum(d["format"] == c["format"] for d in cands) == 1 else \
            f"{c['format']}{json.dumps(c['spec'], sort_keys=True, separators=(',', ':'))}"
        labels.append(label)
    return labels


def search(ctx, tmp: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Run the search for a recipe's allocate section; returns (plan, tensors, summary)."""
    a = ctx.recipe.allocate
    cands = [c.model_dump() for c in a.candidates] or DEFAULT_CANDIDATES
    if a.engine is not None:
        cands = [c for c in cands if c["format"] in ENGINE_FORMATS]
    labels = _labels(cands)
    books = _shared_codebooks(ctx, cands)
    total = sum(m.weight.numel() for m in ctx.targets.values())
    # A model-wide codebook set is stored once, whichever layers use it: its bits are reserved from
    # the budget up front and each bcq option is costed without it (as the artifact counts it).
    reserve = {nc: stored_bits(book) / total for nc, book in books.items()}
    budget = a.budget_bits - sum(reserve.values())
    need_loss = a.predictor == "measured" or a.refine or bool(a.pareto_budgets)
    batches = ctx.batches() if need_loss else []
    base = mean_loss(ctx.model, batches) if need_loss else None
    # packed candidates (not their fp32 values: 4.5 bits instead of 32 per NVFP4 weight), kept only when
    # plans are measured; dequantized into the model one plan at a time
    layers, packed = [], {}
    for name, mod in track(list(ctx.targets.items()), "format search", ctx.progress):
        w = mod.weight.detach().float()
        fisher = ctx.fisher(name) if a.predictor == "fisher" else None
        second = second_moment(ctx.stats[name]) if name in ctx.stats else None  # E[x^2] per input channel
        options = []
        for label, c in zip(labels, cands):
            fmt = get_format(c["format"])
            extra = {"importance": second.clamp_min(0)} if second is not None and "importance" in fmt.context_keys else {}
            book = books.get(_nc(c)) if c["format"] == "bcq" else None
            if book is not None:
                extra["codebook"] = book
            q = fmt.quantize(w, **c["spec"], **extra)
            wq = fmt.dequantize(q)
            # Exact rational bits per weight (integer stored bits / numel): the knapsack stays exact.
            bits = Fraction(stored_bits(q) - (stored_bits(q.data["codebook"]) if book is not None else 0), q.numel)
            if need_loss:
                packed[(name, label)] = q
            if fisher is not None:
                loss = float(((w - wq).double().square() * fisher.double()).sum())
            else:
                with swapped_weights(ctx.model, {name: wq}):
                    loss = mean_loss(ctx.model, batches) - base
            options.append(Option(label, bits, loss))
        layers.append(Layer(name, w.numel(), tuple(options)))
    if a.engine is not None:  # one format per fused group, so engines can fuse its members
        layers = engine_groups(layers, ctx.recipe.quantize.fuse_groups)
    best = solve(layers, budget)
    if a.refine:
        best = _refine(ctx, layers, best, packed, batches, budget)
    front = _pareto(ctx, layers, packed, batches, sorted(set(a.pareto_budgets) | {a.budget_bits}), base,
                    reserve, by_label=dict(zip(labels, cands))) if a.pareto_budgets else []
    if front:
        art.write_json(tmp / "pareto.json", {"baseline_loss": base, "points": front})
        from lpc.pipeline.artifact.plots import plot_pareto
        plot_pareto(front, tmp / "pareto.png", chosen_budget=a.budget_bits)
    by_label = dict(zip(labels, cands))
    plan_layers = {n: {"format": by_label[l]["format"], "spec": by_label[l]["spec"], "label": l}
                   for n, l in expand(best.choice).items()}
    tensors = {}
    for entry in plan_layers.values():
        if entry["format"] == "bcq" and _nc(entry) in books:
            entry["codebook"] = f"codebook.{_nc(entry)}"
            tensors[entry["codebook"]] = books[_nc(entry)]
    plan = {"policy": "vapr", "budget_bits": a.budget_bits, "layers": plan_layers}
    summary = {"bits_per_weight": best.bits_per_weight + _reserved(best.choice, by_label, reserve),
               "predicted_loss": best.predicted_loss,
               "measured_loss": best.measured_loss, "baseline_loss": base, "exact": best.exact,
               "formats": {l: sum(1 for v in best.choice.values() if v == l) for l in labels}}
    return plan, tensors, summary


def _nc(candidate: dict[str, Any]) -> int:
    return int(candidate.get("spec", {}).get("codebooks", 16))


def _shared_codebooks(ctx, cands: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
    """With `quantize.codebook_scope: model`, one LO-BCQ codebook set per Nc fitted over all target
    weights: the search costs bcq with it and the plan hands it to the quantize stage."""
    if ctx.recipe.quantize.codebook_scope != "model":
        return {}
    from lpc.formats.codebooks import fit_codebooks

    weights = [m.weight.detach().float() for m in ctx.targets.values()]
    return {nc: fit_codebooks(weights, codebooks=nc).codebook
            for nc in sorted({_nc(c) for c in cands if c["format"] == "bcq"})}


def _reserved(choice: dict[str, str], by_label: dict[str, dict[str, Any]], reserve: dict[int, float]) -> float:
    """Bits per weight of the shared codebooks the chosen formats actually use."""
    used = {_nc(by_label[l]) for l in choice.values() if by_label[l]["format"] == "bcq"}
    return sum(reserve.get(nc, 0.0) for nc in used)


def _plan_loss(ctx, sol: Solution, packed, batches) -> float:
    weights = {}
    for n, label in expand(sol.choice).items():
        q = packed[(n, label)]
        weights[n] = get_format(q.format).dequantize(q, dtype=ctx.model.get_submodule(n).weight.dtype)
    with swapped_weights(ctx.model, weights):
        return mean_loss(ctx.model, batches)


def _refine(ctx, layers, best: Solution, packed, batches, budget: float, neighbours: int = 4) -> Solution:
    """Measure the optimum and its nearest Lagrangian-hull neighbours under the budget; keep the best."""
    hull = [s for s in lagrangian_hull(layers) if s.bits_per_weight <= budget + 1e-12]
    hull = sorted(hull, key=lambda s: -s.bits_per_weight)[:neighbours]
    scored = []
    for i, sol in enumerate(track([best] + hull, "vapr refinement (measured loss)", ctx.progress)):
        scored.append((_plan_loss(ctx, sol, packed, batches), i, sol))
    loss, _, chosen = min(scored, key=lambda t: (t[0], t[1]))
    log.info("refinement: measured loss %.5f (knapsack optimum %.5f)", loss, scored[0][0])
    return Solution(**{**chosen.to_dict(), "measured_loss": loss, "budget_bits_per_weight": budget})


def _pareto(ctx, layers, packed, batches, budgets: list[float], base: float | None, reserve: dict[int, float],
            by_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    points = []
    solved = list(zip(budgets, pareto_front(layers, [b - sum(reserve.values()) for b in budgets])))
    for b, sol in track(solved, "vapr pareto front (measured loss)", ctx.progress):
        measured = _plan_loss(ctx, sol, packed, batches)
        points.append({"budget_bits_per_weight": b,
                       "bits_per_weight": sol.bits_per_weight + _reserved(sol.choice, by_label, reserve),
                       "predicted_loss": sol.predicted_loss, "measured_loss": measured,
                       "measured_loss_increase": None if base is None else measured - base,
                       "choice": sol.choice})
    return points


ALLOCATION_POLICIES.add("vapr", search)
