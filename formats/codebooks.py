"""LO-BCQ codebooks (arXiv 2502.05376): normalization, encoding and Lloyd-Max fitting.

Scalars are normalized per block array of 64 (E4M3 scale times a per-tensor FP32 scale) so
that an array's amax maps to 31; blocks of 8 normalized scalars u each pick one of Nc
codebooks of 16 INT6 entries, and each scalar the nearest entry of that codebook.

Encoding is a table look-up: entries are integers, so all midpoints between entries are
multiples of 1/2 and the nearest entry of u depends only on t = ceil(2u). Codebooks are kept
sorted so that the argmin's tie rule (first index = lower entry) matches the table exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch

from lpc.formats import kernels
from lpc.formats.errors import FormatError
from lpc.formats.numerics import E4M3_MAX, as_rows, pad_last, padded, round_e4m3

log = logging.getLogger(__name__)

LB, LA, ENTRIES = 8, 64, 16
QMAX, QMIN = 31, -32                  # INT6 entries; arrays are normalized to amax 31
T_MIN, T_MAX = -70, 70                # ceil(2u) range kept by the table (|u| <= 35 after clamp)
FINE = 16                             # resolution of the first fitting stage (entries in 1/16)


@dataclass(frozen=True)
class LazyWeight:
    """A weight known by its shape, read only when its blocks are sampled (e.g. from a checkpoint), so a
    model-wide fit holds one weight at a time."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


Weight = Union[torch.Tensor, LazyWeight]
# Up to this many blocks the sample is a prefix of one seeded permutation of all of them (8 bytes per
# block, 128 MB here); beyond it, seeded draws of distinct block indices (memory of the sample only).
PERMUTE_MAX = 1 << 24


@dataclass
class CodebookFit:
    """codebook: int8 (Nc, 16) sorted INT6 entries; mse: mean squared error (normalized units)
    after every assignment step on the INT6 grid, non-increasing; mse_fine: the same for the
    first stage on the finer grid (rounding to INT6 between the stages may add error)."""

    codebook: torch.Tensor
    mse: list[float] = field(default_factory=list)
    mse_fine: list[float] = field(default_factory=list)


def global_scale_for(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP32 scale amax / (31 * 448) so array scales land in E4M3's range (0 -> 1)."""
    amax = amax.to(torch.float32).reshape(())
    return torch.where(amax > 0, amax / (QMAX * E4M3_MAX), torch.ones_like(amax))


def array_scales(amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Array amax (R, A) -> E4M3 array scales e4m3(amax / (31 * s2)) as float32 (0 -> 1)."""
    sa = round_e4m3(amax / (QMAX * s2))
    return torch.where(sa > 0, sa, torch.ones_like(sa))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x: (..., K) float -> normalized blocks (N, 8) float32 with amax-scaled arrays of 64."""
    rows = as_rows(x)
    s2 = global_scale_for(rows.abs().amax())
    xa = pad_last(rows, LA).view(rows.shape[0], -1, LA)
    sa = array_scales(xa.abs().amax(-1), s2)
    return (xa / (sa * s2).unsqueeze(-1)).reshape(-1, LB)


def check_codebook(codebook: torch.Tensor, nc: int) -> torch.Tensor:
    """Validate a (Nc, 16) integer codebook of INT6 entries; return it sorted per row as int8."""
    if not isinstance(codebook, torch.Tensor) or codebook.is_floating_point() or codebook.is_complex():
        raise FormatError(f"bcq codebook must be an integer tensor, got {getattr(codebook, 'dtype', type(codebook))}",
                          "pass the int8 `codebook` of fit_codebooks(...) or of a saved bcq tensor")
    if tuple(codebook.shape) != (nc, ENTRIES):
        raise FormatError(f"bcq codebook of shape {tuple(codebook.shape)} does not match codebooks={nc}",
                          f"give shape ({nc}, {ENTRIES}) or set codebooks={codebook.shape[0]}")
    if codebook.min() < QMIN or codebook.max() > QMAX:
        raise FormatError(f"bcq codebook entries span [{int(codebook.min())}, {int(codebook.max())}]",
                          f"INT6 entries lie in [{QMIN}, {QMAX}]")
    return codebook.to(torch.int8).sort(dim=-1).values


def tables(codebook: torch.Tensor, res: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted codebook (Nc, 16) of integers in units of 1/res -> look-up tables over
    t = ceil(2 * res * u): values (T, Nc) float32 (normalized units) and indices (T, Nc) uint8.

    Row t + 70*res holds, per codebook, the nearest entry of any u in ((t-1)/(2res), t/(2res)];
    a probe inside that interval decides it, ties going to the lower entry.
    """
    cb = codebook.to(torch.float32) / res
    t = torch.arange(T_MIN * res, T_MAX * res + 1, dtype=torch.float32)
    probe = (t - 0.5) / (2 * res)
    idx = (probe.view(-1, 1, 1) - cb.unsqueeze(0)).abs().argmin(-1)       # (T, Nc)
    vals = torch.gather(cb.unsqueeze(0).expand(len(probe), -1, -1), 2, idx.unsqueeze(-1))[..., 0]
    return vals, idx.to(torch.uint8)


def encode(u: torch.Tensor, vals: torch.Tensor, idxs: torch.Tensor, res: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u: (..., 8) float32 blocks -> selector (...) int64, indices (..., 8) uint8, squared error (...).

    The error of a block is summed in a fixed pairwise order so that every implementation
    (eager or compiled) gets the same float32 value and so the same argmin (first on ties).
    """
    t = (torch.ceil(u * (2 * res)).clamp(T_MIN * res, T_MAX * res) - T_MIN * res).to(torch.int32)
    e = (u.unsqueeze(-1) - vals[t]).square()                             # (..., 8, Nc)
    e = e[..., 0::2, :] + e[..., 1::2, :]                                  # e0+e1, e2+e3, ...
    e = e[..., 0::2, :] + e[..., 1::2, :]                                  # (e0+e1)+(e2+e3), ...
    best, sel = (e[..., 0, :] + e[..., 1, :]).min(dim=-1)
    return sel, idxs[t, sel.unsqueeze(-1)], best


def decode(sel: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """selector (N,), indices (N, 8) -> normalized values (N, 8) float32."""
    return codebook.to(torch.float32)[sel.long().unsqueeze(-1), idx.long()]


def fit_codebooks(tensors: Iterable[Weight], codebooks: int = 16, max_iters: int = 50,
                  tol: float = 1e-4, max_blocks: int = 1 << 16, fine_blocks: int = 1 << 13,
                  seed: int = 0) -> CodebookFit:
    """Fit Nc codebooks over the blocks of many tensors (one model-wide codebook).

    tensors: float tensors (..., K), or `LazyWeight`s read one at a time; blocks are normalized per
    tensor as bcq quantizes them. At most `max_blocks` blocks (a seeded sample) take part. Alternates (1) each block to the
    codebook of least squared error and (2) each entry to the rounded mean of the scalars
    nearest it (Lloyd-Max), until the mean squared error falls by less than `tol` (relative):
    first on a grid of 1/16 over a sample of `fine_blocks` blocks (integer Lloyd steps stall
    where a mean moves by under one INT6 step), then on the INT6 grid over all blocks,
    starting from the rounded fine codebook. Deterministic for a given seed.
    """
    if codebooks not in (8, 16):
        raise FormatError(f"codebooks={codebooks} is not supported", "use 8 or 16")
    tensors = list(tensors)
    if not tensors:
        raise FormatError("fit_codebooks got no tensors", "pass at least one weight tensor")
    u = _sample_blocks(tensors, max_blocks, seed)
    fine_u = _sample(u, fine_blocks, seed + 1)
    fine, fine_mse = lloyd(fine_u, initial_codebooks(fine_u, codebooks) * FINE, FINE, max_iters, tol)
    book = torch.round(fine.to(torch.float64) / FINE).clamp(QMIN, QMAX).to(torch.int32).sort(-1).values
    book, mse = lloyd(u, book, 1, max_iters, tol)
    log.debug("bcq codebooks: fine mse %s -> %s, INT6 mse %s -> %s",
              fine_mse[0], fine_mse[-1], mse[0], mse[-1])
    return CodebookFit(book.to(torch.int8), mse, fine_mse)


def _block_rows(x: Weight) -> int:
    """Rows of normalize(x), from its shape."""
    k = x.shape[-1]
    numel = math.prod(x.shape)
    return (numel // max(k, 1)) * (-(-k // LA)) * (LA // LB)


def _load(x: Weight) -> torch.Tensor:
    return x.load() if isinstance(x, LazyWeight) else x


def _sample_blocks(tensors: list[Weight], n: int, seed: int) -> torch.Tensor:
    """At most n normalized blocks of the tensors, a seeded random subset in random order, with one
    normalized tensor alive at a time (not a float32 copy of all of them). Up to PERMUTE_MAX blocks in
    all these are the rows of `_sample(cat(normalize(t) for t in tensors), n, seed)`."""
    counts = [_block_rows(t) for t in tensors]
    total = sum(counts)
    if total <= n:
        return torch.cat([normalize(_load(t)) for t in tensors])
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=gen)[:n] if total <= PERMUTE_MAX else _distinct(total, n, gen)
    order = torch.argsort(picks)
    wanted = picks[order]  # the sampled global rows, ascending; order[i] is where row wanted[i] goes
    out = torch.empty(n, LB, dtype=torch.float32)
    start = 0
    for t, c in zip(tensors, counts):
        lo, hi = (int(torch.searchsorted(wanted, v)) for v in (start, start + c))
        if hi > lo:
            out[order[lo:hi]] = normalize(_load(t))[wanted[lo:hi] - start]
        start += c
    return out


def _distinct(total: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct indices of range(total) (n < total), uniformly at random in draw order: seeded uniform
    draws, each index kept at its first draw, until n are kept (memory O(n), not O(total))."""
    kept = torch.empty(0, dtype=torch.int64)
    while kept.numel() < n:
        draws = torch.cat([kept, torch.randint(total, (2 * (n - kept.numel()) + 16,), generator=gen)])
        uniq, inverse = torch.unique(draws, return_inverse=True)
        first = torch.full((uniq.numel(),), draws.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
        kept = draws[first.sort().values]
    return kept[:n]


def _sample(u: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most n rows of u, a seeded random subset in random order."""
    if u.shape[0] <= n:
        return u
    gen = torch.Generator().manual_seed(seed)
    return u[torch.randperm(u.shape[0], generator=gen)[:n]]


def lloyd(u: torch.Tensor, book: torch.Tensor, res: int, max_iters: int, tol: float
          ) -> tuple[torch.Tensor, list[float]]:
    """Alternate assignment and Lloyd-Max updates of integer codebooks in units of 1/res.

    Returns the codebook of least error and the mean squared error of every assignment."""
    book = book.to(torch.int32)
    history: list[float] = []
    best, best_mse = book, float("inf")
    for step in range(max_iters):
        sel, idx, err = encode(u, *tables(book, res), res)
        history.append(float(err.double().sum() / u.numel()))
        if history[-1] < best_mse:
            best, best_mse = book, history[-1]
        if step and history[-1] >= history[-2] * (1 - tol):
            break
        book = lloyd_update(u, sel, idx, book, res)
    return best, history


def initial_codebooks(u: torch.Tensor, nc: int) -> torch.Tensor:
    """Blocks (N, 8) -> (Nc, 16) int32: blocks grouped by amax quantile, entries at the
    quantiles of each group's scalars (so codebooks start spread over block ranges)."""
    order = torch.argsort(u.abs().amax(-1), stable=True)
    groups = torch.tensor_split(order, nc)
    qs = (torch.arange(ENTRIES, dtype=torch.float32) + 0.5) / ENTRIES
    books = []
    for g in groups:
        vals = u[g].reshape(-1) if g.numel() else u.reshape(-1)
        vals = vals if vals.numel() <= (1 << 16) else vals[:: vals.numel() // (1 << 16) + 1]
        books.append(torch.quantile(vals, qs) if vals.numel() else torch.zeros(ENTRIES))
    return torch.stack(books).round().clamp(QMIN, QMAX).to(torch.int32).sort(-1).values


def lloyd_update(u: torch.Tensor, sel: torch.Tensor, idx: torch.Tensor,
                 codebook: torch.Tensor, res: int = 1) -> torch.Tensor:
    """One Lloyd-Max step on integer entries in units of 1/res: every entry moves to the
    rounded mean of the scalars assigned to it (an empty cell keeps its entry). For a fixed
    assignment the nearest grid point to a cell's mean minimizes its error, so the error
    never grows."""
    nc = codebook.shape[0]
    cell = (sel.view(-1, 1) * ENTRIES + idx.long()).reshape(-1)
    sums = torch.zeros(nc * ENTRIES, dtype=torch.float64).index_add_(0, cell, u.reshape(-1).double())
    counts = torch.bincount(cell, minlength=nc * ENTRIES).double()
    means = (sums * res / counts.clamp(min=1)).round().clamp(QMIN * res, QMAX * res)
    new = torch.where(counts > 0, means, codebook.reshape(-1).double()).view(nc, ENTRIES)
    return new.to(torch.int32).sort(-1).values


def kernel(xa: torch.Tensor, s2: torch.Tensor, vals: torch.Tensor, idxs: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Amax-scaled encoding of arrays xa (r, A, 64), any float dtype, with tables of `tables`.

    Returns packed indices (r, A, 32) uint8, selectors (r, A, 8) uint8, array scales (r, A) f32.
    """
    r, na = xa.shape[0], xa.shape[1]
    xf = xa.to(torch.float32)
    sa = array_scales(xf.abs().amax(-1), s2)
    u = (xf / (sa * s2).unsqueeze(-1)).view(r, na, LA // LB, LB)  # static inner dims: no modulo
    sel, idx, _ = encode(u, vals, idxs)
    return kernels.pack_pairs(idx.view(r, na, LA)), sel.to(torch.uint8), sa


# Keep the 16 codebook errors of a block in registers: with the default thresholds inductor
# stores partial sums of all (blocks, 16) errors to memory and reads them back.
kernel.inductor_options = {"realize_opcount_threshold": 1000, "realize_reads_threshold": 64,
                           "realize_acc_reads_threshold": 64}


def padded_k(k: int) -> int:
    return padded(k, LA)
