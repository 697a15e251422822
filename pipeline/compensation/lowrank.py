"""Low-rank compensation of quantization error: EoRA, plain SVD, rank budgets, factor storage.

Pure functions, tensors in and tensors out; nothing is mutated. Every factor pair follows one
convention: B (out, r) and A (r, in), fp32, and a compensated layer computes
y = W_q x + B (A x). The numerics run in float64 on the device of the inputs.

    dec = eora_decompose(W - W_q, C)          # one eigh + one SVD per layer
    B, A = dec.factors(16)                    # any rank from the same decomposition
    curve = dec.residual_errors(64)           # output error left at ranks 0..64, no second SVD
    ranks = allocate_ranks({"q": curve, ...}, {"q": out + in, ...}, budget_params, 64)
    stored = quantize_factors(B, A, "fp8_e4m3")   # values as used after storage, plus bits

ESPACE projections live in `lpc.pipeline.compensation.espace`.
"""
from __future__ import annotations

import heapq
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lpc.formats import get_format, stored_bits
from lpc.pipeline.errors import InputError

log = logging.getLogger(__name__)

# Errors remaining at ranks 0, 1, 2, ... of one layer; or a function giving them per layer name.
ErrorCurves = Mapping[str, Sequence[float]] | Callable[[str], Sequence[float]]


# ---------------------------------------------------------------- input checks (shared)

def check_matrix(name: str, t: Any) -> torch.Tensor:
    """A finite, non-empty, floating-point 2-D tensor, else `InputError`."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise InputError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t))}",
                         f"pass {name} as a float32 tensor")
    if t.ndim != 2 or t.numel() == 0:
        raise InputError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}",
                         f"pass {name} with shape (rows, columns)")
    if not torch.isfinite(t).all():
        raise InputError(f"{name} holds NaN or inf values",
                         f"{name} is broken upstream; recompute it before compensation")
    return t


def check_rank(rank: Any, limit: int, what: str) -> int:
    """An integer rank with 1 <= rank <= limit, else `InputError` naming the valid range."""
    try:
        if isinstance(rank, bool):
            raise TypeError
        r = operator.index(rank)
    except TypeError:
        raise InputError(f"rank must be an integer, got {rank!r}", "pass a whole number such as 16") from None
    if r <= 0 or r > limit:
        raise InputError(f"rank {r} is out of range for {what}", f"use 1 <= rank <= {limit}")
    return r


def check_covariance(C: Any, n_in: int, name: str = "C") -> torch.Tensor:
    """C: (in, in) symmetric, finite -> its float64 symmetrized copy, else `InputError`."""
    C = check_matrix(name, C)
    if tuple(C.shape) != (n_in, n_in):
        raise InputError(f"{name} has shape {tuple(C.shape)} but the layer has {n_in} input channels",
                         f"pass the ({n_in}, {n_in}) input autocorrelation X^T X / n of this layer")
    C64 = C.to(torch.float64)
    scale = C64.abs().max()
    # fp32 accumulation leaves asymmetry near eps; a large one means the wrong matrix was passed.
    if (C64 - C64.T).abs().max() > 1e-4 * scale:
        raise InputError(f"{name} is not symmetric (max |C - C^T| = {(C64 - C64.T).abs().max().item():.3g})",
                         "pass an autocorrelation X^T X / n, not the activations or a factor")
    return (C64 + C64.T) / 2


# ---------------------------------------------------------------- decompositions

@dataclass(frozen=True)
class LowRankDecomposition:
    """SVD of a (possibly whitened) weight error, from which any rank's factors are cut.

    U: (out, m) f64, s: (m,) f64 descending, Vh: (m, k) f64 -- the SVD of dW S.
    unwhiten: (k, in) f64, the map S^+ back to input space; None when S = I (plain SVD).
    floor: error no rank can remove (energy of dW on the dropped eigenvectors of C).
    shape: (out, in) of dW.
    """

    U: torch.Tensor
    s: torch.Tensor
    Vh: torch.Tensor
    unwhiten: torch.Tensor | None
    floor: float
    shape: tuple[int, int]

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> B (out, rank) fp32, A (rank, in) fp32 with B = U_r diag(sqrt s_r),
        A = diag(sqrt s_r) V_r^T S^+. Ranks beyond the numerical rank of dW S get zero columns."""
        rank = check_rank(rank, self.max_rank, f"a {self.shape[0]}x{self.shape[1]} layer")
        out, n_in = self.shape
        used = min(rank, self.s.numel())
        root = self.s[:used].sqrt()
        a = root[:, None] * self.Vh[:used]
        if self.unwhiten is not None:
            a = a @ self.unwhiten
        B = torch.zeros(out, rank, dtype=torch.float32, device=self.U.device)
        A = torch.zeros(rank, n_in, dtype=torch.float32, device=self.U.device)
        B[:, :used] = (self.U[:, :used] * root).to(torch.float32)
        A[:used] = a.to(torch.float32)
        return B, A

    def residual_errors(self, max_rank: int | None = None) -> list[float]:
        """Error left at ranks 0..max_rank (default min(out, in)): e[r] = floor + sum_{i>=r} s_i^2.

        For EoRA this is the output error trace(E C E^T) of E = dW - B A; for plain SVD it is
        ||dW - B A||_F^2. Non-increasing and convex in r (its steps are the s_i^2)."""
        top = self.max_rank if max_rank is None else max_rank
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= self.max_rank:
            raise InputError(f"max_rank {top!r} is out of range for a {self.shape[0]}x{self.shape[1]} layer",
                             f"use 0 <= max_rank <= {self.max_rank}")
        energy = self.s.square()
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(1)]).cpu().tolist()
        return [self.floor + tail[min(r, len(tail) - 1)] for r in range(top + 1)]


def whitening(C: torch.Tensor, eps_rel: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """C: (in, in) -> Q_k (in, k) f64, L_k (k,) f64: the eigenpairs of C that are kept.

    eigh runs in float64; eigenvalues <= max(L) * eps_rel are dropped (DESIGN section 5), with
    eps_rel = in * eps(C.dtype) by default: an fp32 C cannot resolve eigenvalues below about
    max * in * 1.2e-7, and keeping that rounding noise would only spend ranks on directions the
    inputs never take. S = Q_k diag(sqrt L_k)."""
    C = check_matrix("C", C)
    evals, evecs, keep = _eigen_split(check_covariance(C, C.shape[0]), _default_eps(C, eps_rel))
    return evecs[:, keep], evals[keep]


def _default_eps(C: torch.Tensor, eps_rel: float | None) -> float:
    if eps_rel is None:
        return C.shape[0] * torch.finfo(C.dtype).eps
    if isinstance(eps_rel, bool) or not isinstance(eps_rel, (int, float)) or not 0 <= eps_rel < 1:
        raise InputError(f"eps_rel must be a number in [0, 1), got {eps_rel!r}",
                         "leave it unset for the default in * eps of C's dtype")
    return float(eps_rel)


def _eigen_split(C64: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C64: (in, in) symmetric f64 -> eigenvalues (in,), eigenvectors (in, in), kept mask (in,)."""
    n_in = C64.shape[0]
    evals, evecs = torch.linalg.eigh(C64)
    top = evals.max()
    if top <= 0:
        raise InputError("C has no positive eigenvalue (all calibration inputs were zero)",
                         "recalibrate this layer with data that reaches it")
    keep = evals > top * eps
    log.debug("whitening: kept %d of %d eigenvalues", int(keep.sum()), n_in)
    return evals, evecs, keep


def eora_decompose(dW: torch.Tensor, C: torch.Tensor, eps_rel: float | None = None) -> LowRankDecomposition:
    """EoRA (arXiv 2410.21271) decomposition of a weight error.

    dW: (out, in) float = W - W_q; C: (in, in) float = X^T X / n of the layer's inputs.
    S = Q_k diag(sqrt L_k), S^+ = diag(1/sqrt L_k) Q_k^T (pseudo-inverse on the eigenvectors
    kept, eps_rel as in `whitening`); U, s, V^T = svd(dW S). Then B A = U_r U_r^T dW Q_k Q_k^T,
    so small kept eigenvalues never blow up: 1/sqrt L multiplies what sqrt L has shrunk."""
    dW = check_matrix("dW", dW)
    if not (isinstance(C, torch.Tensor) and C.ndim == 2 and C.shape[-1] == dW.shape[1]):
        raise InputError(f"C has shape {tuple(getattr(C, 'shape', ()))} but dW has shape {tuple(dW.shape)}",
                         f"pass C of shape ({dW.shape[1]}, {dW.shape[1]}), the covariance of this layer's inputs")
    C64 = check_covariance(C.to(dW.device), dW.shape[1])
    evals, evecs, keep = _eigen_split(C64, _default_eps(C, eps_rel))
    d64 = dW.to(torch.float64)
    root = evals[keep].sqrt()
    U, s, Vh = torch.linalg.svd((d64 @ evecs[:, keep]) * root, full_matrices=False)
    # Energy of dW on the dropped eigenvectors: the part of trace(E C E^T) no rank removes.
    dropped = (d64 @ evecs[:, ~keep]) * evals[~keep].clamp(min=0).sqrt()
    unwhiten = evecs[:, keep].T / root[:, None]
    return LowRankDecomposition(U, s, Vh, unwhiten, float(dropped.square().sum()), tuple(dW.shape))


def svd_decompose(dW: torch.Tensor) -> LowRankDecomposition:
    """Plain SVD of dW: (out, in) float. Its residual errors are ||dW - B A||_F^2."""
    dW = check_matrix("dW", dW)
    U, s, Vh = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    return LowRankDecomposition(U, s, Vh, None, 0.0, tuple(dW.shape))


def eora(dW: torch.Tensor, C: torch.Tensor, rank: int,
         eps_rel: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA factors: dW (out, in), C (in, in) -> B (out, rank) fp32, A (rank, in) fp32.

    Minimizes the expected output error trace((dW - B A) C (dW - B A)^T) over rank-r B A;
    use as y = W_q x + B (A x). See `eora_decompose` for the construction."""
    dW = check_matrix("dW", dW)
    check_rank(rank, min(dW.shape), f"a {dW.shape[0]}x{dW.shape[1]} layer")
    return eora_decompose(dW, C, eps_rel).factors(rank)


def svd_lowrank(dW: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD baseline: dW (out, in) -> B (out, rank) fp32, A (rank, in) fp32,
    B = U_r diag(sqrt s_r), A = diag(sqrt s_r) V_r^T (minimizes ||dW - B A||_F)."""
    dW = check_matrix("dW", dW)
    check_rank(rank, min(dW.shape), f"a {dW.shape[0]}x{dW.shape[1]} layer")
    return svd_decompose(dW).factors(rank)


def output_error(E: torch.Tensor, C: torch.Tensor) -> float:
    """trace(E C E^T) in float64: the expected squared output error E[||E x||^2] over the
    calibration inputs. E: (out, in) remaining weight error, C: (in, in) = X^T X / n."""
    E = check_matrix("E", E)
    C64 = check_covariance(C, E.shape[1])
    E64 = E.to(torch.float64)
    return float(((E64 @ C64.to(E.device)) * E64).sum())


# ---------------------------------------------------------------- factor storage

@dataclass(frozen=True)
class StoredFactors:
    """Factors as a compensated layer will use them after storage.

    B: (out, r) fp32, A: (r, in) fp32 -- the stored values, dequantized.
    bits: stored bits of both factors, scales and padding included.
    fmt: "bf16", "fp32" or a registry format name.
    packed: {"lora_B": ..., "lora_A": ...}: bf16/fp32 tensors, or `QTensor`s for a format.
    """

    B: torch.Tensor
    A: torch.Tensor
    bits: int
    fmt: str
    packed: dict[str, Any] = field(default_factory=dict)


def quantize_factors(B: torch.Tensor, A: torch.Tensor, fmt: str | None = None, **spec: Any) -> StoredFactors:
    """Round B (out, r), A (r, in) the way the artifact will store them.

    fmt None or "bf16": bf16 rounding (16 bits each); "fp32": unchanged; any `lpc.formats` name
    ("fp8_e4m3", "nvfp4", ...): quantized with `spec` and dequantized. Blocks run along each
    factor's last (contraction) dimension, so for nvfp4 keep r a multiple of 16 or pay padding,
    which `bits` counts."""
    B, A = check_matrix("B", B), check_matrix("A", A)
    if B.shape[1] != A.shape[0]:
        raise InputError(f"B {tuple(B.shape)} and A {tuple(A.shape)} disagree on the rank",
                         "pass B (out, r) and A (r, in) from the same decomposition")
    name = "bf16" if fmt is None else str(fmt).lower().replace("-", "_")
    if name in ("bf16", "fp32"):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        sb, sa = B.to(dtype), A.to(dtype)
        bits = stored_bits(sb, sa)
        return StoredFactors(sb.float(), sa.float(), bits, name, {"lora_B": sb, "lora_A": sa})
    f = get_format(name)  # unknown names raise FormatError listing the valid ones
    qb, qa = f.quantize(B.float(), **spec), f.quantize(A.float(), **spec)
    return StoredFactors(f.dequantize(qb), f.dequantize(qa), stored_bits(qb, qa),
                         name, {"lora_B": qb, "lora_A": qa})


# ---------------------------------------------------------------- rank budgets

def allocate_ranks(errors_by_rank: ErrorCurves, params_per_rank: Mapping[str, int], budget_params: int,
                   max_rank: int | Mapping[str, int]) -> dict[str, int]:
    """Spread `budget_params` extra parameters over layers, greedily by error removed per parameter.

    errors_by_rank: per layer name, the error left at ranks 0, 1, 2, ... (e.g.
        `LowRankDecomposition.residual_errors`), or a function name -> that list.
    params_per_rank: per layer, parameters one rank costs (out + in for B and A).
    budget_params: total extra parameters allowed; the result never exceeds it.
    max_rank: cap on every layer's rank, or a cap per name; a curve also caps at len - 1.
    Returns {name: rank} for every name in `params_per_rank`.

    Each step takes, over all layers, the move r -> r' (any r' > r that fits the budget) with the
    largest (e[r] - e[r']) / ((r' - r) * cost); for convex curves that is one rank at a time,
    and longer moves let non-convex curves climb over a flat stretch. Ties go to the smallest
    name, then the shortest move. Moves that remove no error are never taken."""
    names = _check_allocation(params_per_rank, budget_params)
    curves = {n: _curve(errors_by_rank, n, _cap(max_rank, n)) for n in names}
    ranks = dict.fromkeys(names, 0)
    remaining = budget_params
    heap: list[tuple[float, str, int]] = []
    for n in names:
        _push(heap, n, curves[n], 0, params_per_rank[n], remaining)
    while heap:
        neg_ratio, n, step = heapq.heappop(heap)
        cost = step * params_per_rank[n]
        if cost > remaining:  # the budget shrank since this move was priced: price it again
            _push(heap, n, curves[n], ranks[n], params_per_rank[n], remaining)
            continue
        ranks[n] += step
        remaining -= cost
        _push(heap, n, curves[n], ranks[n], params_per_rank[n], remaining)
    log.debug("allocate_ranks: %d of %d params used", budget_params - remaining, budget_params)
    return ranks


def _push(heap: list, name: str, curve: torch.Tensor, rank: int, cost: int, remaining: int) -> None:
    """Push the best affordable move of one layer (at most one live entry per layer)."""
    steps = min(curve.numel() - 1 - rank, remaining // cost)
    if steps < 1:
        return
    gain = curve[rank] - curve[rank + 1: rank + steps + 1]
    ratio = gain / (torch.arange(1, steps + 1, dtype=torch.float64) * cost)
    best = ratio.max().item()
    if best <= 0:
        return
    # Round-off must not turn an exact tie between a short and a long move into a long move.
    step = int(torch.nonzero(ratio >= best * (1 - 1e-12))[0]) + 1
    heapq.heappush(heap, (-best, name, step))


def _check_allocation(params_per_rank: Mapping[str, int], budget_params: int) -> list[str]:
    if isinstance(budget_params, bool) or not isinstance(budget_params, int) or budget_params < 0:
        raise InputError(f"budget_params must be an integer >= 0, got {budget_params!r}",
                         "give the number of extra parameters the low-rank paths may add")
    for n, p in params_per_rank.items():
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
            raise InputError(f"params_per_rank[{n!r}] must be an integer > 0, got {p!r}",
                             "one rank of a (out, in) layer costs out + in parameters")
    return sorted(params_per_rank)


def _cap(max_rank: int | Mapping[str, int], name: str) -> int:
    cap = max_rank.get(name) if isinstance(max_rank, Mapping) else max_rank
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise InputError(f"max_rank for layer {name!r} must be an integer >= 0, got {cap!r}",
                         "give one cap for all layers or one per layer name")
    return cap


def _curve(errors_by_rank: ErrorCurves, name: str, cap: int) -> torch.Tensor:
    """The error curve of `name` cut to ranks 0..cap, as float64."""
    if callable(errors_by_rank):
        values = errors_by_rank(name)
    elif name in errors_by_rank:
        values = errors_by_rank[name]
    else:
        raise InputError(f"no error curve for layer {name!r}",
                         f"errors_by_rank holds {sorted(errors_by_rank)[:5]}; give one per layer of params_per_rank")
    curve = torch.as_tensor(list(values)[: cap + 1], dtype=torch.float64)
    if curve.ndim != 1 or curve.numel() == 0 or not torch.isfinite(curve).all():
        raise InputError(f"the error curve of layer {name!r} must be a non-empty list of finite numbers",
                         "pass the errors left at ranks 0, 1, 2, ... of that layer")
    return curve


__all__ = ["ErrorCurves", "LowRankDecomposition", "StoredFactors", "allocate_ranks", "check_covariance",
           "check_matrix", "check_rank", "eora", "eora_decompose", "output_error", "quantize_factors",
           "svd_decompose", "svd_lowrank", "whitening"]
