"""NVFP4: E2M1 elements in blocks of 16 sharing an E4M3 scale, times a per-tensor FP32 scale.

s2 = amax / (6 * 448); s_b = e4m3(block_amax / (6 * s2)) (0 -> 1, clamped to 448);
q = E2M1(x / (s_b * s2)) with round-to-nearest-even and saturation at 6; x ~ q * s_b * s2.
Codes are sign<<3 | index, two per byte, element 2j in the low nibble. 4.5 bits per weight.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from lpc.formats import fast, kernels
from lpc.formats.clipping import keep_least, multipliers, search_block_scales
from lpc.formats.numerics import (
    E2M1_MAX, E4M3_MAX, amax_of, as_rows, blocks_of, e2m1_decode, e2m1_encode, importance_rows,
    pack_nibbles, pad_last, padded, round_e4m3, row_chunks, unpack_nibbles,
)
from lpc.formats.qtensor import QTensor
from lpc.formats.registry import BlockSpec, Format, register

BLOCK = 16
_E4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN in float8_e4m3fn


class NVFP4Spec(BlockSpec):
    scale_search: int = Field(0, ge=0, le=8, description=(
        "try this many neighbouring E4M3 values on each side of every block scale and keep the "
        "one with the least (importance-weighted) squared error; 0 = plain amax scaling"))


@register
class NVFP4(Format):
    name = "nvfp4"
    Spec = NVFP4Spec
    description = "E2M1 x E4M3 scale per 16 x FP32 tensor scale (4.5 bits)"
    context_keys = ("global_amax", "importance")

    def _quantize(self, x: torch.Tensor, spec: NVFP4Spec, global_amax: Any = None,
                  importance: torch.Tensor | None = None) -> QTensor:
        """x: (..., K) -> qdata uint8 (R, Kp/2), scale f8e4m3 (R, Kp/16), global_scale f32 (1,).

        global_amax: amax to derive s2 from (shared by a fused group); default x's own amax.
        importance: (K,) or x's shape, non-negative weights of the squared error in scale search.
        """
        s2 = global_scale_for(amax_of(x) if global_amax is None else torch.as_tensor(global_amax))
        weight = None if importance is None else importance_rows(importance, tuple(x.shape))
        if spec.clip == "none":
            out = fast.run(kernels.nvfp4, blocks_of(x, BLOCK), s2.to(x.device)) if not spec.scale_search else \
                _fast_search(x, s2.to(x.device), spec.scale_search, weight)
            if out is not None:
                packed, sb = out
                return QTensor(self.name, tuple(x.shape), spec.model_dump(),
                               {"qdata": packed.view(packed.shape[0], -1),
                                "scale": sb.to(torch.float8_e4m3fn), "global_scale": s2.reshape(1)})
        rows = as_rows(x)
        n_rows, k = rows.shape
        kp = padded(k, BLOCK)
        qdata = torch.empty(n_rows, kp // 2, dtype=torch.uint8, device=x.device)
        scale = torch.empty(n_rows, kp // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
        for sl in row_chunks(n_rows, kp):
            xb = pad_last(rows[sl], BLOCK).view(-1, kp // BLOCK, BLOCK)
            wb = None if weight is None else pad_last(weight[sl], BLOCK).view_as(xb)
            sb = choose_scales(xb, s2, spec, wb)
            codes = e2m1_encode(xb / (sb * s2).unsqueeze(-1))
            qdata[sl] = pack_nibbles(codes.view(-1, kp))
            scale[sl] = sb.to(torch.float8_e4m3fn)
        return QTensor(self.name, tuple(x.shape), spec.model_dump(),
                       {"qdata": qdata, "scale": scale, "global_scale": s2.reshape(1)})

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        qdata, scale = q.data["qdata"], q.data["scale"]
        s2 = q.data["global_scale"].to(torch.float32)
        vals = e2m1_decode(unpack_nibbles(qdata)).view(qdata.shape[0], -1, BLOCK)
        x = (vals * (scale.to(torch.float32) * s2).unsqueeze(-1)).view(qdata.shape[0], -1)
        return x[:, : q.shape[-1]].reshape(q.shape)

    def _fake(self, x: torch.Tensor, spec: NVFP4Spec, global_amax: Any = None,
              importance: torch.Tensor | None = None) -> torch.Tensor | None:
        """Amax block scales (no clipping, no scale search): one fused pass, compiled whatever the
        size (simulated W4A4 activations and the NVFP4 KV cache run it on every forward)."""
        if spec.clip != "none" or spec.scale_search or importance is not None:
            return None
        s2 = global_scale_for(amax_of(x) if global_amax is None else torch.as_tensor(global_amax))
        xb = blocks_of(x, BLOCK)
        (out,) = fast.run(kernels.nvfp4_fake, xb, s2.to(x.device), compiled=fast.enabled())
        return out.view(xb.shape[0], -1)[:, : x.shape[-1]].reshape(x.shape)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        return ("qdata", "scale", "global_scale")

    def _block_width(self, spec: NVFP4Spec) -> int:
        return BLOCK

    def _bits_per_weight(self, spec: NVFP4Spec) -> float:
        return 4.0 + 8.0 / BLOCK


def global_scale_for(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP32 scale s2 = amax / (6 * 448); an all-zero tensor gets 1."""
    amax = amax.to(torch.float32).reshape(())
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def block_scales(xb: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """xb: (R, B, 16) float32 -> E4M3-rounded block scales (R, B) as float32 (0 -> 1)."""
    return scale_from_amax(xb.abs().amax(-1), s2)


def scale_from_amax(amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Block amax (R, B) float32 -> E4M3 block scale e4m3(amax / (6 * s2)) as float32 (0 -> 1)."""
    sb = round_e4m3(amax / (E2M1_MAX * s2))
    return torch.where(sb > 0, sb, torch.ones_like(sb))


def fake_blocks(xb: torch.Tensor, sb: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """xb: (R, B, 16) float32, block scales (R, B) -> NVFP4-dequantized blocks (R, B, 16)."""
    step = (sb * s2).unsqueeze(-1)
    return e2m1_decode(e2m1_encode(xb / step)) * step


def choose_scales(xb: torch.Tensor, s2: torch.Tensor, spec: NVFP4Spec,
                  weight: torch.Tensor | None) -> torch.Tensor:
    """Block scales (R, B) float32 for blocks xb (R, B, 16): amax, clip search, then scale search."""
    if spec.clip == "none":
        sb = block_scales(xb, s2)
    else:
        wb = weight if spec.clip == "sensitivity" else None
        sb = _fast_clip(xb, s2, spec, wb)
        if sb is None:
            sb = search_block_scales(xb, xb.abs().amax(-1), lambda a: scale_from_amax(a, s2),
                                     lambda v, s: fake_blocks(v, s, s2), wb, spec.clip_grid, spec.clip_min)
    if spec.scale_search:
        found = _fast_rescale(xb, sb, s2, spec.scale_search, weight)
        sb = found if found is not None else search_scales(xb, sb, s2, spec.scale_search, weight)
    return sb


def _compiled_order(kernel, xb: torch.Tensor) -> str | None:
    """This machine's sum order when a search kernel should run compiled on xb (compiling works here and
    xb is worth it), else None: the eager search runs."""
    order = kernels.sum_order()
    return order if order is not None and fast.worth_compiling(kernel, xb) else None


def _fast_clip(xb: torch.Tensor, s2: torch.Tensor, spec: NVFP4Spec, weight: torch.Tensor | None
               ) -> torch.Tensor | None:
    """The clip search as one compiled kernel (kernels.nvfp4_clip, the same scales), or None where it
    cannot run (not compiled here, too small to be worth compiling, this machine's sum order unknown)."""
    order = _compiled_order(kernels.nvfp4_clip, xb)
    if order is None:
        return None
    mults = torch.tensor(multipliers(spec.clip_grid, spec.clip_min), dtype=torch.float32, device=xb.device)
    out = fast.run_compiled(kernels.nvfp4_clip, xb, s2.to(xb.device), mults, weight, order)
    return None if out is None else out[0]


def _fast_rescale(xb: torch.Tensor, sb: torch.Tensor, s2: torch.Tensor, radius: int,
                  weight: torch.Tensor | None) -> torch.Tensor | None:
    """`search_scales` around the block scales sb as one compiled kernel (kernels.nvfp4_search), or None."""
    order = _compiled_order(kernels.nvfp4_search, xb)
    if order is None:
        return None
    cands = torch.stack(candidate_scales(sb, radius), dim=-1)
    out = fast.run_compiled(kernels.nvfp4_search, xb, s2.to(xb.device), cands, weight, order)
    return None if out is None else out[1]


def search_scales(xb: torch.Tensor, sb: torch.Tensor, s2: torch.Tensor, radius: int,
                  weight: torch.Tensor | None) -> torch.Tensor:
    """Among the E4M3 values within `radius` codes of each block scale, keep the one with the least
    weighted squared error. Ties keep the amax scale (it is tried first)."""
    best = best_err = None
    for cand in candidate_scales(sb, radius):
        deq = e2m1_decode(e2m1_encode(xb / (cand * s2).unsqueeze(-1))) * (cand * s2).unsqueeze(-1)
        err = (xb - deq).square()
        best, best_err = keep_least(best, best_err, cand, (err if weight is None else err * weight).sum(-1))
    return best


def candidate_scales(sb: torch.Tensor, radius: int) -> list[torch.Tensor]:
    """The scales scale search tries for block scales sb (R, B): sb itself, then the E4M3 values
    1, 1, 2, 2, ... codes below and above it (clamped to the positive finite codes); a block whose
    scale is 1 because it is all zero keeps 1 in every candidate."""
    base = sb.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    out = []
    for step in [0] + [d for r in range(1, radius + 1) for d in (-r, r)]:
        code = (base + step).clamp(1, _E4M3_MAX_CODE).to(torch.uint8)
        cand = code.view(torch.float8_e4m3fn).to(torch.float32)
        out.append(torch.where(sb == 1.0, sb, cand) if step else cand)
    return out


def _fast_search(x: torch.Tensor, s2: torch.Tensor, radius: int, weight: torch.Tensor | None):
    """Amax scales + scale search + encode as one compiled kernel over the whole tensor
    (kernels.nvfp4_search), or None where it cannot run (not compiled here, too small to be worth
    compiling, or this machine's sum order unknown): the caller then runs the eager search."""
    xb = blocks_of(x, BLOCK)
    order = _compiled_order(kernels.nvfp4_search, xb)
    if order is None:
        return None
    sb = scale_from_amax(xb.abs().amax(-1).to(torch.float32), s2)
    cands = torch.stack(candidate_scales(sb, radius), dim=-1)
    wb = None
    if weight is not None:  # (R, K) rows, often one row broadcast (a per-input-channel importance)
        rows = weight[:1] if weight.shape[0] > 1 and weight.stride(0) == 0 else weight
        wb = pad_last(rows, BLOCK).reshape(rows.shape[0], -1, BLOCK)
    return fast.run_compiled(kernels.nvfp4_search, xb, s2, cands, wb, order)
