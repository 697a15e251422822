"""Compensation methods: the low-rank path of one layer (EoRA, plain SVD, ESPACE).

A method is a function (CompensateConfig, LayerInputs) -> LowRankPath registered by name in
`COMPENSATION_METHODS` (`compensate.method` in a recipe). Adding one: a function here or in its own
module that calls `COMPENSATION_METHODS.add(name, fn)`, imported in `compensation/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lpc.formats.registry import Registry
from lpc.pipeline.compensation.espace import espace_compress, espace_projection
from lpc.pipeline.compensation.lowrank import LowRankDecomposition, eora_decompose, svd_decompose
from lpc.pipeline.errors import RecipeError


@dataclass(frozen=True)
class LayerInputs:
    """One layer's inputs, fp32 on the compute device: W and W_q (out, in), C (in, in), and with Fisher
    calibration g_in (in,) = E[(dL/dx)^2] (act_fisher), g_out (out,) ~ E[(dL/dy)^2] (see `_fisher_inputs`)."""

    W: torch.Tensor
    Wq: torch.Tensor
    C: torch.Tensor
    g_in: torch.Tensor | None = None
    g_out: torch.Tensor | None = None


@dataclass(frozen=True)
class LowRankPath:
    """What one layer's method offers: the output error left at ranks 0..cap, and factors at any rank."""

    curve: Callable[[int], list[float]]
    factors: Callable[[int], tuple[torch.Tensor, torch.Tensor]]


Method = Callable[[Any, LayerInputs], LowRankPath]

COMPENSATION_METHODS: "Registry[Method]" = Registry("compensation method", RecipeError)


@COMPENSATION_METHODS.register("eora")
def eora(cfg: Any, x: LayerInputs) -> LowRankPath:
    """EoRA: the error dW projected into the eigenspace of C, truncated SVD there."""
    dec = eora_decompose(x.W - x.Wq, x.C)
    return LowRankPath(dec.residual_errors, dec.factors)


@COMPENSATION_METHODS.register("svd")
def svd(cfg: Any, x: LayerInputs) -> LowRankPath:
    """Plain truncated SVD of dW."""
    dec = svd_decompose(x.W - x.Wq)
    return LowRankPath(lambda cap: _svd_curve(dec, x.C, cap), dec.factors)


@COMPENSATION_METHODS.register("espace")
def espace(cfg: Any, x: LayerInputs) -> LowRankPath:
    """ESPACE: projection on the top eigenvectors of a statistic (act / weight / grad). Mode compress:
    the layer itself as (W P)(P^T x), the paper's form. Residual: the kept directions' span with the
    least-squares B (`espace_fitted_residual`). B = dW P would be optimal only when P's directions are
    uncorrelated under C (true for "act"); for "weight"/"grad" it can leave more output error than no
    path at all, because dropping a direction also drops what it predicted of the kept ones."""
    dW = x.W - x.Wq
    target = x.W if cfg.mode == "compress" else dW
    cap = min(x.W.shape)
    # The weight statistic models the output error of what is projected: dW for a residual path.
    P = espace_projection(cfg.espace_stat, cap, x.C, W=target, C_g=_gradient_stat(cfg, x, dW),
                          normalize_rows=cfg.normalize_rows)
    if cfg.mode == "compress":
        return LowRankPath(lambda top: _projection_curve(target, P[:, :top], x.C),
                           lambda r: espace_compress(target, P[:, :r]))
    Q = _c_orthonormal(P, x.C)
    return LowRankPath(lambda top: _fitted_curve(dW, Q[:, :top], x.C),
                       lambda r: espace_fitted_residual(dW, Q[:, :r], x.C))


def _c_orthonormal(P: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Q (in, L) spanning the same nested subspaces as P's prefixes with Q^T C Q = I (Gram-Schmidt in the
    C inner product, by a Cholesky factor of P^T C P; directions C does not see get a tiny ridge)."""
    P64, C64 = P.double(), C.double()
    G = P64.T @ C64 @ P64
    ridge = 1e-9 * float(G.diagonal().abs().mean().clamp(min=1e-30))
    L = torch.linalg.cholesky(G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
    return torch.linalg.solve_triangular(L, P64.T, upper=False).T  # P L^-T


def espace_fitted_residual(dW: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual path on the activation directions Q keeps, with the least-squares B for them:
    A = Q^T (L, in), B = dW C Q (out, L) minimizes E||dW x - B A x||^2 (Q^T C Q = I), so the path never
    raises the output error (B = 0 is a candidate). With P the eigenvectors of C (statistic "act")
    this is the same path as B = dW P, A = P^T."""
    Q64 = Q.double()
    B = dW.double() @ (C.double() @ Q64)
    return B.to(torch.float32), Q64.T.contiguous().to(torch.float32)


def _fitted_curve(dW: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> list[float]:
    """Output error tr(dW C dW^T) - sum_{i<r} ||dW C q_i||^2 of `espace_fitted_residual` at r = 0..L."""
    D, C64 = dW.double(), C.double()
    total = float((D @ C64 * D).sum())
    gain = torch.cumsum((D @ (C64 @ Q.double())).square().sum(0), 0)
    return [total] + (total - gain).clamp(min=0).cpu().tolist()


def _gradient_stat(cfg: Any, x: LayerInputs, dW: torch.Tensor) -> torch.Tensor | None:
    """C_G of ESPACE's gradient statistic, the autocorrelation of the loss gradient seen by P^T x.

    compress: the input x itself is projected, so C_G = diag(act_fisher) (in,).
    residual: what is left out is the output error dW Pi x, whose first-order loss change is
    g_y^T dW Pi x; so C_G = dW^T diag(g_out) dW (in, in), the output gradient pulled back through dW
    (act_fisher is the gradient pulled back through W, which says nothing about where dW errs)."""
    if cfg.espace_stat != "grad":
        return None
    if cfg.mode == "compress":
        return x.g_in
    d64 = dW.double()
    G = d64.T @ (x.g_out[:, None] * d64)
    return (G + G.T) / 2


def _svd_curve(dec: LowRankDecomposition, C: torch.Tensor, cap: int) -> list[float]:
    """Output error trace(E_r C E_r^T) of truncated SVD at ranks 0..cap.

    E_r = sum_{i >= r} s_i u_i v_i^T with orthonormal u_i, so the trace is sum_{i >= r} s_i^2 v_i^T C v_i."""
    Vh = dec.Vh
    energy = dec.s.square() * ((Vh @ C.to(Vh)) * Vh).sum(1)
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).cpu().tolist() + [0.0]
    return [tail[min(r, len(tail) - 1)] for r in range(cap + 1)]


def _projection_curve(T: torch.Tensor, P: torch.Tensor, C: torch.Tensor) -> list[float]:
    """Output error trace(T Pi_r C Pi_r T^T), Pi_r = I - P_r P_r^T, for r = 0..L with P (in, L).

    Expanded: tr(T C T^T) - 2 sum_{i<r} (P^T C K P)_ii + sum_{i,j<r} (P^T K P)_ij (P^T C P)_ij with
    K = T^T T, so every rank comes from prefix sums of one (L, L) matrix instead of L projections."""
    T64, P64, C64 = T.double(), P.double(), C.double()
    K = T64.T @ T64
    CP, KP = C64 @ P64, K @ P64
    total = float((K * C64).sum())
    cross = torch.cumsum((CP * KP).sum(0), 0)
    quad = torch.cumsum(torch.cumsum((P64.T @ KP) * (P64.T @ CP), 0), 1).diagonal()
    left = (total - 2 * cross + quad).clamp(min=0).cpu().tolist()
    return [total] + left
