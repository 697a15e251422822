"""Second-order error feedback (GPTQ, arXiv 2210.17323) for any block format.

Columns are taken in groups of the format's scale block (`Format.block_width`: 16 for NVFP4/FGMP,
32 for MX, V for VS-Quant, 64 for LO-BCQ arrays). When a group is reached, its current (already
corrected) values are quantized with the format as they are, and the error e_S is pushed onto the
remaining columns R by the optimal update dW_R = -e_S U_SS^-1 U_SR, U the upper Cholesky factor of
H^-1 (H = X^T X / n, dampened). The values each group had when it was quantized form W~; quantizing
W~ with the format in one call gives exactly the per-group result, because block scales depend on
their block only and everything wider (tensor amax, a two-level row scale, a fitted codebook, an
FGMP mask) is pinned from W before the loop (`Format.pinned_context`). So the artifact stores an
ordinary QTensor of the format, and its dequantized values are the values fed back.
"""
from __future__ import annotations

from typing import Any

import torch

from lpc.formats import QTensor, get_format
from lpc.pipeline.errors import InputError
from lpc.pipeline.quantization.registry import QUANTIZE_METHODS, QuantizeMethod


def group_width(fmt: str, spec: dict[str, Any]) -> int | None:
    """Columns GPTQ quantizes at once: the format's scale-block width (None: not a block format)."""
    return get_format(fmt).block_width(**spec)


def gptq_quantize(w: torch.Tensor, cov: torch.Tensor, fmt_name: str, spec: dict[str, Any],
                  context: dict[str, Any], damp: float = 0.01) -> QTensor:
    """w: (out, in) float, cov: (in, in) X^T X / n -> QTensor of `fmt_name` with error feedback.

    context: the format's context tensors; what the format derives from more than one block
    (global_amax, a row scale, a codebook, an FGMP mask) is pinned from w when missing, and an FGMP
    `mask` (out, nb) and an `importance` (in,) or (out, in) are sliced per group. Returns the
    QTensor of the values each group had when quantized (float32), whose dequantization equals the
    values fed back during the loop.
    """
    width = group_width(fmt_name, spec)
    if width is None:
        raise InputError(f"GPTQ needs a block format, not {fmt_name}",
                         "use quantize.method: rtn for per-channel/per-tensor formats")
    fmt = get_format(fmt_name)
    context = fmt.pinned_context(w.detach().float(), spec, context)
    W = w.detach().to(torch.float64).clone()
    out_f, k = W.shape
    U = _inverse_cholesky(cov.to(torch.float64), damp)
    frozen = torch.empty_like(W)
    for start in range(0, k, width):
        stop = min(k, start + width)
        block = W[:, start:stop]
        frozen[:, start:stop] = block
        q = fmt.fake_quantize(block.float(), **spec, **_slice_context(context, start, stop, width, k)).double()
        err = block - q
        if stop < k:
            # dW_R = -e_S U_SS^-1 U_SR, solved without forming the inverse.
            coef = torch.linalg.solve_triangular(U[start:stop, start:stop], U[start:stop, stop:], upper=True)
            W[:, stop:] -= err @ coef
    # float32, as each group was quantized: a cast to a narrower weight dtype would round W~ again.
    return fmt.quantize(frozen.float(), **spec, **context)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1; dead inputs get H_ii = 1.

    An input that never fired in calibration has a zero row and column in H: giving it H_ii = 1 leaves
    its weights to plain rounding (their error is pushed nowhere, since H couples it to no other input),
    and W is left as it is: calibration text that never fires an input (an MoE expert no token reached)
    says nothing about the inputs the model meets later, so zeroing those weights would be wrong."""
    H = H.clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def _slice_context(context: dict[str, Any], start: int, stop: int, width: int, k: int) -> dict[str, Any]:
    out = {}
    for key, val in context.items():
        if key == "mask":
            out[key] = val[:, start // width: -(-stop // width)]
        elif key == "importance" and isinstance(val, torch.Tensor):
            out[key] = val[..., start:stop]
        else:
            out[key] = val
    return out


def _gptq_round(fmt: Any, w: torch.Tensor, spec: dict[str, Any], ctx: dict[str, Any],
                cov: torch.Tensor | None) -> QTensor:
    """GPTQ where it applies (a block format with a calibrated X^T X), the format's rounding elsewhere."""
    if cov is None or not group_width(fmt.name, spec):
        return fmt.quantize(w, **spec, **ctx)
    return gptq_quantize(w, cov, fmt.name, spec, ctx)


QUANTIZE_METHODS.add("gptq", QuantizeMethod(
    _gptq_round, needs_calibration=True,
    description="second-order error feedback over the calibrated X^T X (block formats)"))
