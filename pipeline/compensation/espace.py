"""ESPACE (arXiv 2410.05437): activation-space projections for compression and error compensation.

A projection P (in, L) with orthonormal columns keeps the L input directions that matter most.
Two uses, both in the (B (out, L), A (L, in)) convention of `lpc.pipeline.compensation.lowrank`:

    P = espace_projection("grad", 64, C_x, C_g=fisher_x)
    B, A = espace_residual(W - W_q, P)   # y = W_q x + B (A x), B = dW P, A = P^T
    WP, Pt = espace_compress(W, P)       # y = (W P)(P^T x), W P itself quantizable

Why symmetric statistics. With the projector Pi = I - P P^T that removes what P drops, the
errors ESPACE minimizes expand as

    input MSE     E||Pi x||^2          = tr(C_X) - tr(P^T C_X P)
    output MSE    E||W Pi x||^2 / out  = tr(C_W C_X) - tr(P^T (C_W C_X + C_X C_W) P) + tr(P^T C_X P P^T C_W P)
    loss change   E[(g^T Pi x)^2]      = tr(C_G C_X) - tr(P^T (C_G C_X + C_X C_G) P) + tr(P^T C_X P P^T C_G P)

(g = dL/dx independent of x). The cross term appears once in each order, so the part that is
linear in P P^T is the trace of P^T M P with M the *symmetric* sum. Only symmetric M gives real
eigenvalues with orthonormal eigenvectors, and by Ky Fan's theorem the top-L eigenvectors of a
symmetric M maximize tr(P^T M P) over all orthonormal P. A one-sided product C_W C_X has a
non-orthogonal eigenbasis (its P^T would not be P's inverse on the kept space) and the same
quadratic form as its symmetric part anyway. The symmetric sums may be indefinite;
eigenvectors are ranked by signed eigenvalue.

The last (quartic) term is what ESPACE neglects, so "weight" and "grad" are first-order
choices: exact when C_X and C_G share eigenvectors (e.g. independent channel groups), but
when important channels correlate with loud unimportant ones the cross block
C_X,ij (g_i + g_j) mixes the two and the neglected term can make them lose to "act".
`projection_error` gives the exact error of any P, to compare candidates per layer.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.compensation.lowrank import check_covariance, check_matrix, check_rank

log = logging.getLogger(__name__)

STATISTICS = ("act", "weight", "grad")


def espace_statistic(stat: str, C_x: torch.Tensor, W: torch.Tensor | None = None,
                     C_g: torch.Tensor | None = None, normalize_rows: bool = False) -> torch.Tensor:
    """The symmetric (in, in) float64 matrix whose top eigenvectors form the projection.

    stat "act":    C_X                   (C_x: (in, in) = X^T X / n)
    stat "weight": C_W C_X + C_X C_W     (C_W = W^T W / out; W: (out, in); pass dW for a residual)
    stat "grad":   C_X C_G + C_G C_X     (C_g: (in, in) gradient autocorrelation of dL/dx, or its
                                          diagonal (in,), the per-channel activation Fisher)
    Arguments a statistic does not use are ignored.

    normalize_rows: divide row i and column i of M by d_i = sqrt(|M_ii|) for every input channel i
    (d_i = 0 is left at 1), i.e. M_ij <- M_ij / (d_i d_j), which keeps M symmetric and puts +-1 on
    its diagonal. For "act" this is the correlation matrix of the inputs: the projection no
    longer depends on per-channel scales, so a few outlier channels cannot claim the leading
    eigenvectors alone. It also cancels most of the per-channel weighting of "weight"/"grad".
    """
    if stat not in STATISTICS:
        raise InputError(f"unknown ESPACE statistic {stat!r}", f"use one of {', '.join(STATISTICS)}")
    C_x = check_matrix("C_x", C_x)
    n_in = C_x.shape[0]
    Cx = check_covariance(C_x, n_in, "C_x")
    if stat == "act":
        M = Cx
    elif stat == "weight":
        Cw = _weight_autocorrelation(W, n_in).to(Cx.device)
        M = Cw @ Cx + Cx @ Cw
    else:
        M = _gradient_sum(Cx, C_g, n_in)
    return _normalize(M) if normalize_rows else M


def espace_projection(stat: str, rank: int, C_x: torch.Tensor, W: torch.Tensor | None = None,
                      C_g: torch.Tensor | None = None, normalize_rows: bool = False) -> torch.Tensor:
    """-> P (in, rank) fp32 with orthonormal columns: the top-`rank` eigenvectors (largest signed
    eigenvalue first) of `espace_statistic(stat, C_x, W, C_g, normalize_rows)`. Each column's
    largest-magnitude entry is made positive so the result is deterministic."""
    M = espace_statistic(stat, C_x, W, C_g, normalize_rows)
    n_in = M.shape[0]
    rank = check_rank(rank, n_in, f"a layer with {n_in} input channels")
    evals, evecs = torch.linalg.eigh(M)
    P = torch.flip(evecs[:, -rank:], [1])
    pivot = P.gather(0, P.abs().argmax(0, keepdim=True))
    P = P * torch.where(pivot < 0, -1.0, 1.0).to(P.dtype)
    log.debug("espace %s: kept %d of %d directions", stat, rank, n_in)
    return P.to(torch.float32)


def espace_residual(dW: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual path for a quantization error: dW (out, in), P (in, L) -> B = dW P (out, L) fp32,
    A = P^T (L, in) fp32. Forward y = W_q x + B (A x); the error left is dW (I - P P^T)."""
    return _project(check_matrix("dW", dW), P, "dW")


def espace_compress(W: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compression of a layer: W (out, in), P (in, L) -> W P (out, L) fp32, P^T (L, in) fp32.
    Forward y = (W P)(P^T x); W P may itself be quantized afterwards."""
    return _project(check_matrix("W", W), P, "W")


def _project(M: torch.Tensor, P: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    P = check_matrix("P", P)
    if P.shape[0] != M.shape[1] or P.shape[1] > P.shape[0]:
        raise InputError(f"P has shape {tuple(P.shape)} but {name} has shape {tuple(M.shape)}",
                         f"pass P of shape ({M.shape[1]}, L) with L <= {M.shape[1]} from espace_projection")
    P64 = P.to(device=M.device, dtype=torch.float64)
    return (M.to(torch.float64) @ P64).to(torch.float32), P64.T.contiguous().to(torch.float32)


def _weight_autocorrelation(W: Any, n_in: int) -> torch.Tensor:
    if W is None:
        raise InputError("ESPACE statistic 'weight' needs the weight W", "pass W=(out, in) weight (or dW)")
    W = check_matrix("W", W)
    if W.shape[1] != n_in:
        raise InputError(f"W has shape {tuple(W.shape)} but C_x is ({n_in}, {n_in})",
                         f"pass the (out, {n_in}) weight of the layer C_x was collected on")
    W64 = W.to(torch.float64)
    return W64.T @ W64 / W.shape[0]


def _gradient_sum(Cx: torch.Tensor, C_g: Any, n_in: int) -> torch.Tensor:
    """C_X C_G + C_G C_X for C_G an (in, in) matrix or the diagonal (in,) of one."""
    if C_g is None:
        raise InputError("ESPACE statistic 'grad' needs C_g",
                         "pass the activation Fisher (in,) or gradient autocorrelation (in, in); "
                         "calibrate with --fisher")
    if isinstance(C_g, torch.Tensor) and C_g.ndim == 1:
        g = _fisher_vector(C_g, n_in).to(Cx.device)
        return Cx * g[None, :] + g[:, None] * Cx
    Cg = check_covariance(C_g, n_in, "C_g").to(Cx.device)
    return Cx @ Cg + Cg @ Cx


def projection_error(P: torch.Tensor, C_x: torch.Tensor, C_g: torch.Tensor | None = None) -> float:
    """Exact expected error of dropping what P (in, L) does not keep: tr(Pi C_X Pi C_G) in float64,
    Pi = I - P P^T. C_g None: input MSE E||Pi x||^2; C_g = C_W (= W^T W / out): output MSE per
    output; C_g = gradient autocorrelation (in, in) or activation Fisher (in,): expected squared
    first-order loss change. Use it to compare candidate projections of one layer."""
    P = check_matrix("P", P)
    n_in = P.shape[0]
    Cx = check_covariance(C_x, n_in, "C_x")
    Pi = torch.eye(n_in, dtype=torch.float64, device=Cx.device) - _outer(P.to(Cx.device))
    left = Pi @ Cx @ Pi
    if C_g is None:
        return float(left.trace())
    if isinstance(C_g, torch.Tensor) and C_g.ndim == 1:
        return float((left.diagonal() * _fisher_vector(C_g, n_in).to(Cx.device)).sum())
    return float((left * check_covariance(C_g, n_in, "C_g").to(Cx.device)).sum())


def _outer(P: torch.Tensor) -> torch.Tensor:
    P64 = P.to(torch.float64)
    return P64 @ P64.T


def _fisher_vector(C_g: torch.Tensor, n_in: int) -> torch.Tensor:
    g = C_g.to(torch.float64)
    if g.numel() != n_in or not torch.isfinite(g).all() or (g < 0).any():
        raise InputError(f"C_g of shape {tuple(C_g.shape)} is not a finite non-negative ({n_in},) vector",
                         f"pass the mean squared gradient dL/dx of each of the {n_in} input channels")
    return g


def _normalize(M: torch.Tensor) -> torch.Tensor:
    d = M.diagonal().abs().sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    return M / d[:, None] / d[None, :]


__all__ = ["STATISTICS", "espace_compress", "espace_projection", "espace_residual", "espace_statistic",
           "projection_error"]
