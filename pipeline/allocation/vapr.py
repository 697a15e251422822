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
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from lpc.formats import get_format, stored_bits
from lpc.pipeline.artifact import store as art
from lpc.pipeline.allocation.engine import ENGINE_FORMATS, engine_groups, expand
from lpc.pipeline.allocation.registry import ALLOCATION_POLICIES
from lpc.pipeline.allocation.knapsack import Layer, Option, Solution, lagrangian_hull, pareto_front, solve
from lpc.pipeline.allocation.measure import mean_loss, streamed_mean_loss, swapped_weights
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
    by_label = dict(zip(labels, cands))
    books = _shared_codebooks(ctx, cands)
    total = sum(math.prod(ctx.shape(n)) for n in ctx.names)
    # A model-wide codebook set is stored once, whichever layers use it: its bits are reserved from
    # the budget up front and each bcq option is costed without it (as the artifact counts it).
    reserve = {nc: stored_bits(book) / total for nc, book in books.items()}
    budget = a.budget_bits - sum(reserve.values())
    need_loss = a.predictor == "measured" or a.refine or bool(a.pareto_budgets)
    batches = ctx.batches() if need_loss else []
    measure = _Measure(ctx, batches, by_label, books) if need_loss else None
    base = measure(None) if need_loss else None
    # Options are scored one weight at a time (read from the checkpoint while the model streams); a plan
    # whose loss is measured quantizes its layers again as they come (the same bytes), so no candidate is
    # kept: they would be some 50 bits per weight, the model's size several times over.
    layers = []
    for name in track(list(ctx.names), "format search", ctx.progress):
        w = ctx.weight(name)
        fisher = ctx.fisher(name) if a.predictor == "fisher" else None
        options = []
        for label, c in zip(labels, cands):
            q, book = _quantize(ctx, name, w, c, books)
            wq = get_format(q.format).dequantize(q)
            # Exact rational bits per weight (integer stored bits / numel): the knapsack stays exact.
            bits = Fraction(stored_bits(q) - (stored_bits(q.data["codebook"]) if book is not None else 0), q.numel)
            if fisher is not None:
                loss = float(((w - wq).double().square() * fisher.double()).sum())
            else:
                with swapped_weights(ctx.model, {name: wq}):
                    loss = mean_loss(ctx.model, batches) - base
            options.append(Option(label, bits, loss))
        layers.append(Layer(name, w.numel(), tuple(options)))
        del w, fisher
    if a.engine is not None:  # one format per fused group, so engines can fuse its members
        layers = engine_groups(layers, ctx.recipe.quantize.fuse_groups)
    best = solve(layers, budget)
    if a.refine:
        best = _refine(ctx, layers, best, measure, budget)
    front = _pareto(ctx, layers, measure, sorted(set(a.pareto_budgets) | {a.budget_bits}), base,
                    reserve, by_label) if a.pareto_budgets else []
    if front:
        art.write_json(tmp / "pareto.json", {"baseline_loss": base, "points": front})
        from lpc.pipeline.artifact.plots import plot_pareto
        plot_pareto(front, tmp / "pareto.png", chosen_budget=a.budget_bits)
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


def _quantize(ctx, name: str, w: torch.Tensor, c: dict[str, Any], books: dict[int, torch.Tensor]):
    """(QTensor of candidate c for weight w of layer `name`, the shared codebook it used or None)."""
    fmt = get_format(c["format"])
    second = second_moment(ctx.stats[name]) if name in ctx.stats else None  # E[x^2] per input channel
    extra = {"importance": second.clamp_min(0)} if second is not None and "importance" in fmt.context_keys else {}
    book = books.get(_nc(c)) if c["format"] == "bcq" else None
    if book is not None:
        extra["codebook"] = book
    return fmt.quantize(w, **c["spec"], **extra), book


class _Measure:
    """The measured calibration loss of a plan ({Linear: label}, or None for the model as it is): one
    decoder layer at a time when the model streams, each layer's chosen formats quantized as it comes;
    else on the whole model with the plan's weights swapped in."""

    def __init__(self, ctx, batches: list[torch.Tensor], by_label: dict[str, dict[str, Any]],
                 books: dict[int, torch.Tensor]):
        self.ctx, self.batches, self.by_label, self.books = ctx, batches, by_label, books
        self.streams = ctx.recipe.allocate.predictor != "measured" and ctx.streamed() is not None

    def _weights(self, choice: dict[str, str], names) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            if n in choice:
                q, _ = _quantize(self.ctx, n, self.ctx.weight(n), self.by_label[choice[n]], self.books)
                out[n] = get_format(q.format).dequantize(q, dtype=self._dtype(n))
        return out

    def _dtype(self, name: str) -> torch.dtype:
        model = self.ctx.streamed()[0] if self.streams else self.ctx.model
        return model.get_submodule(name).weight.dtype

    def __call__(self, choice: dict[str, str] | None) -> float:
        choice = choice or {}
        if self.streams:
            loss = streamed_mean_loss(self.ctx.streamed(), self.batches, lambda mine: self._weights(choice, mine))
            if loss is not None:
                return loss
            self.streams = False
        with swapped_weights(self.ctx.model, self._weights(choice, list(choice))):
            return mean_loss(self.ctx.model, self.batches)


def _nc(candidate: dict[str, Any]) -> int:
    return int(candidate.get("spec", {}).get("codebooks", 16))


def _shared_codebooks(ctx, cands: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
    """With `quantize.codebook_scope: model`, one LO-BCQ codebook set per Nc fitted over all target
    weights: the search costs bcq with it and the plan hands it to the quantize stage."""
    if ctx.recipe.quantize.codebook_scope != "model":
        return {}
    from lpc.formats.codebooks import LazyWeight, fit_codebooks

    weights = [LazyWeight(ctx.shape(n), lambda n=n: ctx.weight(n)) for n in ctx.names]  # read one at a time
    return {nc: fit_codebooks(weights, codebooks=nc).codebook
            for nc in sorted({_nc(c) for c in cands if c["format"] == "bcq"})}


def _reserved(choice: dict[str, str], by_label: dict[str, dict[str, Any]], reserve: dict[int, float]) -> float:
    """Bits per weight of the shared codebooks the chosen formats actually use."""
    used = {_nc(by_label[l]) for l in choice.values() if by_label[l]["format"] == "bcq"}
    return sum(reserve.get(nc, 0.0) for nc in used)


def _refine(ctx, layers, best: Solution, measure: "_Measure", budget: float, neighbours: int = 4) -> Solution:
    """Measure the optimum and its nearest Lagrangian-hull neighbours under the budget; keep the best."""
    hull = [s for s in lagrangian_hull(layers) if s.bits_per_weight <= budget + 1e-12]
    hull = sorted(hull, key=lambda s: -s.bits_per_weight)[:neighbours]
    scored = []
    for i, sol in enumerate(track([best] + hull, "vapr refinement (measured loss)", ctx.progress)):
        scored.append((measure(expand(sol.choice)), i, sol))
    loss, _, chosen = min(scored, key=lambda t: (t[0], t[1]))
    log.info("refinement: measured loss %.5f (knapsack optimum %.5f)", loss, scored[0][0])
    return Solution(**{**chosen.to_dict(), "measured_loss": loss, "budget_bits_per_weight": budget})


def _pareto(ctx, layers, measure: "_Measure", budgets: list[float], base: float | None, reserve: dict[int, float],
            by_label: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    points = []
    solved = list(zip(budgets, pareto_front(layers, [b - sum(reserve.values()) for b in budgets])))
    for b, sol in track(solved, "vapr pareto front (measured loss)", ctx.progress):
        measured = measure(expand(sol.choice))
        points.append({"budget_bits_per_weight": b,
                       "bits_per_weight": sol.bits_per_weight + _reserved(sol.choice, by_label, reserve),
                       "predicted_loss": sol.predicted_loss, "measured_loss": measured,
                       "measured_loss_increase": None if base is None else measured - base,
                       "choice": sol.choice})
    return points


ALLOCATION_POLICIES.add("vapr", search)
