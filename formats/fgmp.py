"""FGMP block mix (arXiv 2504.14152): each block of 16 is FP8 E4M3 (high) or NVFP4 (low).

A boolean mask (R, Kp/16), True = high, picks the kind of every block. Both kinds share the
NVFP4 per-tensor scale s2 = amax / (6 * 448): low blocks are plain NVFP4 (E2M1 codes, E4M3 block
scale), high blocks are E4M3 values of x / (6 * s2), i.e. FP8 with the per-tensor scale
amax / 448 (E4M3's 17 binades need no block scale). Fields, in row-major block order:
qdata uint8 (n_low, 8) and scale f8e4m3 (n_low,) for low blocks, qdata_hi f8e4m3 (n_high, 16)
for high blocks, mask uint8 (R, ceil(Kp/128)) packed bits, global_scale f32 (1,).
Bits per weight come from the actual mix: 4.5 per low element, 8 per high element, 1/16 mask.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from lpc.formats import fast, kernels, nvfp4
from lpc.formats.errors import FormatError
from lpc.formats.numerics import (
    E2M1_MAX, amax_of, as_rows, blocks_of, e2m1_decode, e2m1_encode, importance_rows, pack_bits, pack_nibbles,
    pad_last, padded, round_e4m3, row_chunks, unpack_bits, unpack_nibbles,
)
from lpc.formats.qtensor import QTensor
from lpc.formats.registry import BlockSpec, Format, register

BLOCK = 16


class FGMPSpec(BlockSpec):
    high_fraction: float = Field(0.1, ge=0.0, le=1.0, description=(
        "fraction of blocks kept in FP8 when no mask= is given (top block_scores, ties by "
        "index); with a mask, the QTensor records the mask's actual fraction"))
    scale_search: int = Field(0, ge=0, le=8, description="as in nvfp4, for the low blocks")


def block_scores(x: torch.Tensor, importance: torch.Tensor | None = None,
                 global_amax: Any = None) -> torch.Tensor:
    """Per block of 16: sum_i F_i [(x_i - Q_lo(x_i))^2 - (x_i - Q_hi(x_i))^2].

    x: (..., K) float; importance F: (K,) or x's shape, non-negative (None = all ones);
    global_amax: amax behind the shared scale (default x's own). Q_lo is NVFP4 with amax block
    scales, Q_hi the FP8 of the high blocks. Returns float32 (R, Kp/16), R = numel / K.
    """
    rows = as_rows(x)
    n_rows, k = rows.shape
    kp = padded(k, BLOCK)
    s2 = _global_scale(rows, global_amax)
    compiled = _compiled_blocks(kernels.fgmp_scores, rows, importance, s2)
    if compiled is not None:
        return compiled[0]
    weight = None if importance is None else importance_rows(importance, tuple(x.shape))
    out = torch.empty(n_rows, kp // BLOCK, dtype=torch.float32, device=x.device)
    for sl in row_chunks(n_rows, kp):
        out[sl] = _lo_hi_scores(rows[sl], weight, sl, s2)[2]
    return out


def _lo_hi_scores(rows: torch.Tensor, weight: torch.Tensor | None, sl: slice, s2: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk of rows (r, K) -> its blocks' Q_lo (NVFP4, amax scales), Q_hi (FP8), both (r, Kp/16, 16),
    and block scores (r, Kp/16); weight: the importance rows of the whole tensor (sliced by `sl`)."""
    xb = pad_last(rows, BLOCK).view(-1, padded(rows.shape[1], BLOCK) // BLOCK, BLOCK)
    lo = nvfp4.fake_blocks(xb, nvfp4.block_scales(xb, s2), s2)
    hi = fake_high(xb, s2)
    gain = (xb - lo).square() - (xb - hi).square()
    if weight is not None:
        gain = gain * pad_last(weight[sl], BLOCK).view_as(xb)
    return lo, hi, gain.sum(-1)


def fake_by_threshold(x: torch.Tensor, importance: torch.Tensor | None, global_amax: Any,
                      threshold: float) -> torch.Tensor:
    """FGMP activations at run time in one pass: each block of 16 whose `block_scores` exceeds
    `threshold` is FP8, the others NVFP4 with amax block scales; returns the dequantized x in its own
    dtype. Equals dequantize(quantize(x, mask=scores > threshold)) (the spec's defaults: no clipping,
    no scale search) without packing: Q_lo and Q_hi are computed once, for the scores and the result."""
    rows = as_rows(x)
    n_rows, k = rows.shape
    kp = padded(k, BLOCK)
    s2 = _global_scale(rows, global_amax)
    thr = torch.tensor(float(threshold), dtype=torch.float32, device=x.device)
    got = _compiled_blocks(kernels.fgmp_act, rows, importance, s2, thr)
    if got is not None:
        return got[0].view(n_rows, kp)[:, :k].reshape(x.shape).to(x.dtype)
    weight = None if importance is None else importance_rows(importance, tuple(x.shape))
    out = torch.empty(n_rows, kp, dtype=torch.float32, device=x.device)
    for sl in row_chunks(n_rows, kp):
        lo, hi, scores = _lo_hi_scores(rows[sl], weight, sl, s2)
        out[sl] = torch.where((scores > threshold).unsqueeze(-1), hi, lo).view(-1, kp)
    return out[:, :k].reshape(x.shape).to(x.dtype)


def _compiled_blocks(kernel, rows: torch.Tensor, importance: Any, s2: torch.Tensor, *extra: Any) -> tuple | None:
    """kernel(blocks, s2, weight, *extra, sum order) compiled over the rows (R, K), or None (eager then) when
    compiling is off or failed or the sum order is unknown. The weight is per channel (nb, 16), or per
    element (R, nb, 16) for an importance of the tensor's shape (FGMP's weight Fisher)."""
    order = kernels.sum_order()
    if order is None or not fast.enabled():
        return None
    n_rows, k = rows.shape
    imp = torch.ones(k) if importance is None else torch.as_tensor(importance)
    w = imp.to(device=rows.device, dtype=torch.float32)
    if tuple(imp.shape) == (k,):
        wb = pad_last(w.reshape(1, k), BLOCK).view(-1, BLOCK)
    elif imp.ndim > 1 and imp.numel() == n_rows * k:
        wb = pad_last(w.reshape(n_rows, k), BLOCK).view(n_rows, -1, BLOCK)
    else:
        return None  # the eager path says what is wrong with it
    return fast.run_compiled(kernel, blocks_of(rows, BLOCK), s2.to(rows.device), wb, *extra, order)


def fake_high(xb: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Any float32 tensor -> its FP8 E4M3 value under the scale 6 * s2 (saturating)."""
    step = E2M1_MAX * s2
    return round_e4m3(xb / step) * step


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """scores (R, B) -> bool (R, B) marking the round(fraction * R * B) highest, ties by index."""
    flat = scores.reshape(-1)
    n_high = int(round(fraction * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:n_high]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask.view(scores.shape)


@register
class FGMP(Format):
    name = "fgmp"
    Spec = FGMPSpec
    description = "per-16-block mix of FP8 E4M3 and NVFP4 chosen by a mask (4.56..8.06 bits)"
    context_keys = ("mask", "importance", "global_amax")

    def _quantize(self, x: torch.Tensor, spec: FGMPSpec, mask: torch.Tensor | None = None,
                  importance: Any = None, global_amax: Any = None) -> QTensor:
        """x: (..., K); mask: bool (R, Kp/16) True = FP8 (default: top high_fraction by score)."""
        n_rows, nb = x.numel() // x.shape[-1], padded(x.shape[-1], BLOCK) // BLOCK
        if mask is None:
            mask = top_fraction_mask(block_scores(x, importance, global_amax), spec.high_fraction)
        mask = _check_mask(mask, n_rows, nb)
        s2 = _global_scale(x, global_amax)
        if spec.clip == "none" and not spec.scale_search:
            packed, sb, hi = fast.run(kernels.fgmp, blocks_of(x, BLOCK), s2.to(x.device))
            low = ~mask
            data = {"qdata": packed[low], "scale": sb[low].to(torch.float8_e4m3fn), "qdata_hi": hi[mask]}
        else:
            data = _encode_general(as_rows(x), mask, s2, spec, importance, tuple(x.shape))
        data["mask"] = pack_bits(mask.to(torch.uint8), 1)
        data["global_scale"] = s2.reshape(1)
        record = spec.model_dump()
        record["high_fraction"] = int(mask.sum()) / max(mask.numel(), 1)
        return QTensor(self.name, tuple(x.shape), record, data)

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        n_rows = q.numel // q.shape[-1]
        nb = padded(q.shape[-1], BLOCK) // BLOCK
        mask = unpack_bits(q.data["mask"], 1, nb).bool()
        s2 = q.data["global_scale"].to(torch.float32)
        out = torch.empty(n_rows, nb, BLOCK, dtype=torch.float32, device=mask.device)
        lo_step = (q.data["scale"].to(torch.float32) * s2).unsqueeze(-1)
        out[~mask] = e2m1_decode(unpack_nibbles(q.data["qdata"])) * lo_step
        out[mask] = q.data["qdata_hi"].to(torch.float32) * (E2M1_MAX * s2)
        return out.view(n_rows, -1)[:, : q.shape[-1]].reshape(q.shape)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        return ("qdata", "scale", "qdata_hi", "mask", "global_scale")

    def _block_width(self, spec: FGMPSpec) -> int:
        return BLOCK

    def pinned_context(self, x: torch.Tensor, spec: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Adds the mask chosen over the whole x (bool (R, Kp/16), top high_fraction) when none is given."""
        ctx = super().pinned_context(x, spec, context)
        if ctx.get("mask") is None:
            q = self.quantize(x, **spec, **ctx)
            ctx["mask"] = unpack_bits(q.data["mask"], 1, padded(x.shape[-1], BLOCK) // BLOCK).bool()
        return ctx

    def _bits_per_weight(self, spec: FGMPSpec) -> float:
        p = spec.high_fraction
        return p * 8.0 + (1.0 - p) * (4.0 + 8.0 / BLOCK) + 1.0 / BLOCK


def _encode_general(rows: torch.Tensor, mask: torch.Tensor, s2: torch.Tensor, spec: FGMPSpec,
                    importance: Any, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Rows (R, K) float32 with clipping or scale search, chunk by chunk -> the three streams."""
    nb = mask.shape[1]
    weight = None if importance is None else importance_rows(importance, shape)
    parts: dict[str, list[torch.Tensor]] = {"qdata": [], "scale": [], "qdata_hi": []}
    for sl in row_chunks(rows.shape[0], nb * BLOCK):
        xb = pad_last(rows[sl], BLOCK).view(-1, nb, BLOCK)
        wb = None if weight is None else pad_last(weight[sl], BLOCK).view_as(xb)
        _encode_chunk(xb, mask[sl], s2, spec, wb, parts)
    return {key: torch.cat(val) for key, val in parts.items()}


def _encode_chunk(xb: torch.Tensor, mask: torch.Tensor, s2: torch.Tensor, spec: FGMPSpec,
                  wb: torch.Tensor | None, parts: dict[str, list[torch.Tensor]]) -> None:
    """Blocks xb (r, B, 16) with mask (r, B): append low and high streams to `parts`."""
    lo, hi = xb[~mask], xb[mask]
    lo_w = None if wb is None else wb[~mask]
    sb = nvfp4.choose_scales(lo.unsqueeze(0), s2, spec, None if lo_w is None else lo_w.unsqueeze(0))[0]
    codes = e2m1_encode(lo / (sb * s2).unsqueeze(-1))
    parts["qdata"].append(pack_nibbles(codes))
    parts["scale"].append(sb.to(torch.float8_e4m3fn))
    step = E2M1_MAX * s2
    parts["qdata_hi"].append((hi / step).clamp(-448.0, 448.0).to(torch.float8_e4m3fn))


def _global_scale(x: torch.Tensor, global_amax: Any) -> torch.Tensor:
    amax = amax_of(x) if global_amax is None else torch.as_tensor(global_amax)
    return nvfp4.global_scale_for(amax)


def _check_mask(mask: Any, n_rows: int, nb: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise FormatError(f"fgmp mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}",
                          "pass mask=(scores > threshold) or a saved bool mask")
    if mask.numel() != n_rows * nb or (mask.ndim and mask.shape[-1] != nb):
        raise FormatError(f"fgmp mask of shape {tuple(mask.shape)} does not fit {n_rows} rows of "
                          f"{nb} blocks", f"give a bool mask of shape ({n_rows}, {nb})")
    return mask.reshape(n_rows, nb)
