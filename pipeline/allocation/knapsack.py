"""VaPr-style precision search (arXiv 2310.07854): one format per Linear layer under a bit budget.

A multiple-choice knapsack: layer j picks one option i with cost c_ij = bits_per_weight_i * numel_j
bits and value l_ij (predicted loss increase, e.g. `layer_sensitivity`); minimize sum l subject to
sum c <= budget_bits_per_weight * sum numel.

- `lagrangian_hull`: for every multiplier lambda, each layer independently minimizes l + lambda c;
  sweeping lambda visits exactly the lower convex hull of (total bits, total loss). Computed
  exactly by merging the layers' hull segments in order of efficiency (loss saved per bit).
- `solve`: exact dynamic programme. Costs are exact rationals (every float is one), so on the grid
  unit g = gcd of the costs above each layer's cheapest option (in units of 1/lcm of the
  bits-per-weight denominators) the DP is exact for the given costs. Give measured costs as
  `Fraction(stored_bits, numel)`: a float such as 5.4 is the binary fraction nearest to it, whose
  denominator near 2^51 makes the exact grid too fine (it is then coarsened, `exact` False).
- Ties: the minimum of (loss, bits) wins; among equal (cost, loss) options of a layer the earlier
  one in its list; the result is a deterministic function of the input order.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lpc.formats import get_format
from lpc.formats.errors import FormatError
from lpc.pipeline.errors import InputError, RecipeError

logger = logging.getLogger(__name__)

MAX_DP_CELLS = 200_000_000  # choice-table entries (1 byte each) before the grid is coarsened
_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Option:
    """One candidate for a layer: a format label, its bits per weight, its predicted loss.

    bits_per_weight: a float or, exactly, a `Fraction` (stored bits / numel of the layer).
    """

    label: str
    bits_per_weight: float | Fraction
    loss: float


@dataclass(frozen=True)
class Layer:
    """A layer to assign: `numel` weights and its candidate options (order = tie-break order)."""

    name: str
    numel: int
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Solution:
    """An assignment: layer name -> option label, with its totals.

    bits_per_weight: total bits / total weights; predicted_loss: sum of the chosen losses;
    exact: True when proven optimal for the budget (False only for a coarsened DP grid);
    measured_loss: filled in later by whoever evaluates the assignment.
    """

    choice: dict[str, str]
    bits: float
    bits_per_weight: float
    predicted_loss: float
    budget_bits_per_weight: float | None = None
    exact: bool = True
    measured_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Problem:
    """Validated layers with integer costs: cost[j][i] = bits_per_weight_i * numel_j * scale."""

    def __init__(self, layers: Sequence[Layer]):
        _validate(layers)
        self.layers = list(layers)
        fracs = [[Fraction(o.bits_per_weight) for o in lay.options] for lay in self.layers]
        self.scale = math.lcm(*(f.denominator for row in fracs for f in row))
        self.cost = [[int(f * self.scale) * lay.numel for f in row] for row, lay in zip(fracs, self.layers)]
        self.loss = [[float(o.loss) for o in lay.options] for lay in self.layers]
        self.numel = sum(lay.numel for lay in self.layers)

    def budget_units(self, budget_bpw: float) -> int:
        return math.floor(Fraction(budget_bpw) * self.scale * self.numel)

    def min_units(self) -> int:
        return sum(min(row) for row in self.cost)

    def solution(self, picks: Sequence[int], budget: float | None, exact: bool) -> Solution:
        units = sum(self.cost[j][i] for j, i in enumerate(picks))
        bits = units / self.scale
        return Solution(choice={lay.name: lay.options[i].label for lay, i in zip(self.layers, picks)},
                        bits=bits, bits_per_weight=bits / self.numel,
                        predicted_loss=math.fsum(self.loss[j][i] for j, i in enumerate(picks)),
                        budget_bits_per_weight=budget, exact=exact)


def _validate(layers: Sequence[Layer]) -> None:
    if not layers:
        raise InputError("the precision search got no layers", "pass at least one Layer")
    seen: set[str] = set()
    for lay in layers:
        if lay.name in seen:
            raise InputError(f"layer '{lay.name}' appears twice", "give each layer once")
        seen.add(lay.name)
        if not isinstance(lay.numel, int) or lay.numel <= 0:
            raise InputError(f"layer '{lay.name}' has numel={lay.numel!r}", "numel must be a positive int")
        if not lay.options:
            raise InputError(f"layer '{lay.name}' has no candidate options", "give at least one format")
        for o in lay.options:
            if not (math.isfinite(o.bits_per_weight) and o.bits_per_weight > 0 and math.isfinite(o.loss)):
                raise InputError(f"layer '{lay.name}' option '{o.label}' has bits_per_weight="
                                 f"{o.bits_per_weight!r}, loss={o.loss!r}",
                                 "bits must be finite and > 0, loss finite")


def _pareto_options(cost: list[int], loss: list[float]) -> list[int]:
    """Indices of the options not dominated by another (cheaper-or-equal and no worse), by
    increasing cost; equal (cost, loss) keep the earliest."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], loss[i], i))
    kept: list[int] = []
    for i in order:
        if not kept or loss[i] < loss[kept[-1]]:
            kept.append(i)
    return kept


def _lower_hull(cost: list[int], loss: list[float], idx: list[int]) -> list[int]:
    """Of the Pareto options (increasing cost, decreasing loss), those on the lower convex hull."""
    hull: list[int] = []
    for i in idx:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above (or on) segment a-i: it never wins for any lambda (ties go to the ends).
            if (loss[b] - loss[a]) * (cost[i] - cost[a]) >= (loss[i] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def lagrangian_hull(layers: Sequence[Layer]) -> list[Solution]:
    """All Lagrangian solutions, from the cheapest assignment to the least-loss one.

    Each returned solution minimizes sum l + lambda sum c for some lambda >= 0, so their (bits,
    loss) points are the vertices of the lower convex hull of every assignment; consecutive ones
    differ in one layer. Cost: O(total options * log).
    """
    prob = _Problem(layers)
    hulls = [_lower_hull(c, l, _pareto_options(c, l)) for c, l in zip(prob.cost, prob.loss)]
    steps = []
    for j, h in enumerate(hulls):
        for s in range(1, len(h)):
            dc = prob.cost[j][h[s]] - prob.cost[j][h[s - 1]]
            saved = prob.loss[j][h[s - 1]] - prob.loss[j][h[s]]
            steps.append((-(Fraction(saved) / dc), j, s))
    steps.sort()  # most loss saved per bit first; ties by layer then step: deterministic
    picks = [h[0] for h in hulls]
    out = [prob.solution(picks, None, True)]
    for _, j, s in steps:
        picks[j] = hulls[j][s]
        out.append(prob.solution(picks, None, True))
    return out


def solve(layers: Sequence[Layer], budget_bits_per_weight: float,
          max_cells: int = MAX_DP_CELLS) -> Solution:
    """The optimal assignment for an average of at most `budget_bits_per_weight` bits per weight.

    Exact dynamic programme over the extra bits above each layer's cheapest option. If the exact
    grid would need more than `max_cells` table entries, costs are rounded up to a coarser grid
    (the budget still holds; `exact` is then False and a warning is logged).
    Raises RecipeError when even the cheapest options exceed the budget.
    """
    prob = _Problem(layers)
    _check_budget(prob, budget_bits_per_weight)
    # Every layer at its least-loss option (cheapest among equals) is optimal when it fits.
    greedy = [min(range(len(c)), key=lambda i: (l[i], c[i], i)) for c, l in zip(prob.cost, prob.loss)]
    if sum(prob.cost[j][i] for j, i in enumerate(greedy)) <= prob.budget_units(budget_bits_per_weight):
        return prob.solution(greedy, budget_bits_per_weight, True)
    slack = prob.budget_units(budget_bits_per_weight) - prob.min_units()
    extra = [[c - min(row) for c in row] for row in prob.cost]
    unit = math.gcd(*(e for row in extra for e in row)) or 1
    span = sum(max(row) for row in extra)
    cap = min(slack, span) // unit
    exact = True
    if len(extra) * (cap + 1) > max_cells:
        unit = -(-min(slack, span) * len(extra) // max_cells)
        cap = min(slack, span) // unit
        exact = False
        logger.warning("precision search: exact grid too fine; costs rounded up to %d-unit steps "
                       "(result respects the budget but may be slightly suboptimal)", unit)
    units = [[-(-e // unit) for e in row] for row in extra]
    picks = _dp(units, prob.loss, cap)
    return prob.solution(picks, budget_bits_per_weight, exact)


def _check_budget(prob: _Problem, budget: float) -> None:
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise RecipeError(f"bit budget must be a positive number of bits per weight, got {budget!r}",
                          "set e.g. budget_bits_per_weight: 5.0")
    if prob.budget_units(budget) < prob.min_units():
        least = Fraction(prob.min_units(), prob.scale * prob.numel)
        shown = math.ceil(least * 10**6) / 10**6  # rounded up, so the value shown is feasible
        raise RecipeError(f"bit budget {budget} bits/weight is below the minimum feasible budget "
                          f"{shown} bits/weight (every layer at its cheapest option)",
                          f"raise the budget to at least {shown} or add cheaper candidate formats")


def _dp(units: list[list[int]], loss: list[list[float]], cap: int) -> list[int]:
    """Exact-cost DP: best[c] = least loss of the layers so far using exactly c units.

    Returns the option index per layer of the (least loss, then fewest units) solution with at
    most `cap` units. Table: one int8/int16 choice per (layer, units).
    """
    n_opt = max(len(row) for row in units)
    ctype = np.int8 if n_opt < 128 else np.int16
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.full((len(units), cap + 1), -1, dtype=ctype)
    for j, (u_row, l_row) in enumerate(zip(units, loss)):
        new = np.full(cap + 1, np.inf)
        for i in _pareto_options(u_row, l_row):  # dominated options can never be chosen
            u = u_row[i]
            if u > cap:
                continue
            cand = best[: cap + 1 - u] + l_row[i]
            better = cand < new[u:]  # strict: earlier (cheaper, then listed first) option keeps ties
            new[u:][better] = cand[better]
            choice[j, u:][better] = i
        best = new
    c = int(np.argmin(best))  # first minimum: the fewest units among equal loss
    picks = []
    for j in range(len(units) - 1, -1, -1):
        i = int(choice[j, c])
        picks.append(i)
        c -= units[j][i]
    return picks[::-1]


def pareto_front(layers: Sequence[Layer], budgets: Iterable[float],
                 max_cells: int = MAX_DP_CELLS) -> list[Solution]:
    """The exact optimum at each budget (bits per weight), in the order given.

    Raises RecipeError for a budget below the minimum feasible one (the message names it).
    """
    return [solve(layers, float(b), max_cells) for b in budgets]


def layer_sensitivity(weight: torch.Tensor, fisher: torch.Tensor, fmt: str,
                      spec: dict[str, Any] | None = None) -> float:
    """Fisher-weighted perturbation sum_i F_i (w_i - Q(w_i))^2 of quantizing `weight` with `fmt`.

    weight: (out, in) float; fisher: (out, in) or (in,) non-negative (the weight Fisher diagonal).
    fmt: a registered format name, or bf16 / fp16 / fp32 as plain casts when no format of that
    name is registered. spec: the format's spec and context (e.g. {"scale_search": 2}, or
    {"mask": ...} for fgmp); the Fisher is passed as the format's `importance`. This is the second-order loss increase without its factor 1/2 (a
    common scale does not change the search). Returns a Python float (accumulated in float64).
    """
    w = weight.detach().to(torch.float32)
    f = torch.as_tensor(fisher).detach().to(torch.float32)
    if f.shape not in (w.shape, w.shape[-1:]):
        raise InputError(f"fisher of shape {tuple(f.shape)} does not fit a weight of shape {tuple(w.shape)}",
                         "pass the weight Fisher (out, in) or a per-input-channel (in,) vector")
    q = _fake_quantize(w, f, fmt, dict(spec or {}))
    return float(((w - q).double().square() * f.double()).sum())


def _fake_quantize(w: torch.Tensor, f: torch.Tensor, fmt: str, spec: dict[str, Any]) -> torch.Tensor:
    key = fmt.lower().replace("-", "_")
    try:
        form = get_format(key)
    except FormatError:
        if key in _CASTS:
            return w.to(_CASTS[key]).to(torch.float32)
        raise
    if "importance" in form.context_keys:
        spec.setdefault("importance", f)
    return form.fake_quantize(w, **spec).to(torch.float32)
