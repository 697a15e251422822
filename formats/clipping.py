"""Scale clipping shared by the formats: a grid of multipliers on amax, and OCTAV.

Every search here is vectorized over blocks; the only Python loops run over the (few)
multipliers or fixed-point iterations.
"""
from __future__ import annotations

from typing import Callable

import torch

ScaleOf = Callable[[torch.Tensor], torch.Tensor]
Fake = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OCTAV_ITERS = 30


def multipliers(grid: int, low: float) -> list[float]:
    """`grid` multipliers from 1.0 down to `low`; 1.0 first so that ties keep plain amax."""
    return [1.0 - (1.0 - low) * i / (grid - 1) for i in range(grid)]


def block_error(xb: torch.Tensor, deq: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(R, B, L) values and their dequantized copy -> (R, B) (weighted) squared error."""
    err = (xb - deq).square()
    return (err if weight is None else err * weight).sum(-1)


def keep_least(best: torch.Tensor | None, best_err: torch.Tensor | None, cand: torch.Tensor,
               err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The running choice of a search over candidates: per element, the candidate of least error so far
    (the earlier one on ties); `best` None starts the search. Eager searches and the compiled kernels
    share it, so they pick alike."""
    if best is None:
        return cand, err
    better = err < best_err
    return torch.where(better, cand, best), torch.where(better, err, best_err)


def search_block_scales(xb: torch.Tensor, amax: torch.Tensor, scale_of: ScaleOf, fake: Fake,
                        weight: torch.Tensor | None, grid: int, low: float,
                        mults: list[float] | None = None) -> torch.Tensor:
    """Per block, the scale (from `scale_of(m * amax)`) whose (weighted) squared error is least.

    xb: (R, B, L) float32 blocks; amax: (R, B); weight: None or (R, B, L) non-negative.
    scale_of: (R, B) clipped amax -> (R, B) stored scale; fake: (xb, scale) -> dequantized xb.
    mults: explicit multipliers (first one wins ties) instead of `multipliers(grid, low)`.
    Returns the (R, B) float32 scales; on ties the earlier multiplier wins.
    """
    best = best_err = None
    for m in (mults if mults is not None else multipliers(grid, low)):
        scale = scale_of(amax * m)
        best, best_err = keep_least(best, best_err, scale, block_error(xb, fake(xb, scale), weight))
    return best


def octav_clip(absx: torch.Tensor, bits: int, iters: int = OCTAV_ITERS) -> torch.Tensor:
    """OCTAV (arXiv 2206.06501): per vector the clip s solving s = E|x|>s / (4^-B/3 P(|x|<=s) + P(|x|>s)).

    absx: (..., L) float32 magnitudes -> (...) clip values by the fixed point
    s <- sum_{|x|>s}|x| / ((4^-B/3) #{|x|<=s} + #{|x|>s}), started at the mean magnitude and
    run `iters` times (each step is one Newton-Raphson step of the MSE model). A vector whose
    values all fall below s (or all zero) keeps its amax.
    """
    amax = absx.amax(-1)
    noise = 4.0 ** (-bits) / 3.0
    s = absx.mean(-1)
    for _ in range(iters):
        above = absx > s.unsqueeze(-1)
        n_above = above.sum(-1).to(torch.float32)
        n_below = absx.shape[-1] - n_above
        s_next = (absx * above).sum(-1) / (noise * n_below + n_above)
        s = torch.where(n_above > 0, s_next, amax)
    return torch.minimum(torch.where(s > 0, s, amax), amax)
