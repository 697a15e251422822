"""VS-Quant (arXiv 2102.04503): N-bit signed symmetric integers, one scale per vector of V.

q = clamp(round_half_even(x / s_v), -(2^(N-1)-1), 2^(N-1)-1); x ~ q * s_v. The per-vector
scale s_v = c_v / (2^(N-1)-1) from the (clipped) vector amax c_v is stored as
  e4m3:      an E4M3 value times a per-tensor FP32 `global_scale` = amax / (qmax * 448);
  bf16:      a bfloat16 value;
  two_level: an M-bit unsigned integer times a per-row FP32 `row_scale`
             gamma = max_v s_v / (2^M - 1)  (M-bit integers bit-packed); a `row_scale` given as
             context (R,) is used instead (stored scales then clamp to 2^M - 1), which is how
             GPTQ keeps the row scale of the whole row while it quantizes column groups.
V = 0 is the per-channel baseline of the VS-Quant paper: one scale per row (the whole input width).
int4 codes are packed two per byte (two's complement nibbles, element 2j low); int8 as int8.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from lpc.formats import fast, kernels
from lpc.formats.clipping import octav_clip, search_block_scales
from lpc.formats.numerics import (
    amax_of, as_rows, blocks_of, importance_rows, pack_bits, pack_nibbles, pad_last, padded, round_e4m3, row_chunks,
    unpack_bits, unpack_nibbles,
)
from lpc.formats.errors import FormatError
from lpc.formats.qtensor import QTensor
from lpc.formats.registry import BlockSpec, Format, register


class IntSpec(BlockSpec):
    bits: Literal[4, 8] = Field(4, description="element bits N (signed symmetric)")
    vector: Literal[0, 16, 32, 64] = Field(16, description="elements per scale V (0: one scale per row, per channel)")
    scale_format: Literal["e4m3", "bf16", "two_level"] = Field(
        "two_level", description="how per-vector scales are stored")
    scale_bits: Literal[4, 6, 8] = Field(6, description="M, bits of a two-level scale")


@register
class Int(Format):
    name = "int"
    Spec = IntSpec
    description = "VS-Quant INT4/INT8, per-vector scale (two-level by default, 4.375 bits)"
    context_keys = ("importance", "global_amax", "row_scale")
    clip_methods = ("none", "mse", "octav", "sensitivity")

    def _quantize(self, x: torch.Tensor, spec: IntSpec, importance: Any = None,
                  global_amax: Any = None, row_scale: Any = None) -> QTensor:
        """x: (..., K) -> qdata (R, Kp/2) uint8 or (R, Kp) int8, scale (R, Kp/V) + unit fields.

        row_scale: optional (R,) positive float32 gamma of a two-level spec (default: from x's rows).
        """
        if spec.clip == "none" and row_scale is None:
            return self._quantize_plain(x, spec, global_amax)
        rows = as_rows(x)
        n_rows, k = rows.shape
        v = _vector(spec, k)
        kp = padded(k, v)
        qmax = 2 ** (spec.bits - 1) - 1
        weight = importance_rows(importance, tuple(x.shape)) if spec.clip == "sensitivity" else None
        unit = _units(rows, spec, qmax, global_amax) if row_scale is None else _given_rows(row_scale, spec, n_rows)
        qdata = torch.empty(n_rows, kp // 2 if spec.bits == 4 else kp,
                            dtype=torch.uint8 if spec.bits == 4 else torch.int8, device=x.device)
        stored = torch.empty(n_rows, kp // v, dtype=torch.float32, device=x.device)
        for sl in row_chunks(n_rows, kp):
            xb = pad_last(rows[sl], v).view(-1, kp // v, v)
            u = unit if unit.numel() == 1 else unit[sl]
            wb = None if weight is None else pad_last(weight[sl], v).view_as(xb)
            st = _choose_stored(xb, u, spec, qmax, wb)
            codes = _round(xb / (st * u).unsqueeze(-1), qmax).view(xb.shape[0], -1)
            qdata[sl] = pack_nibbles((codes & 0x0F).to(torch.uint8)) if spec.bits == 4 else codes
            stored[sl] = st
        data = {"qdata": qdata, **_store_scales(stored, unit, spec)}
        return QTensor(self.name, tuple(x.shape), spec.model_dump(), data)

    def _quantize_plain(self, x: torch.Tensor, spec: IntSpec, global_amax: Any) -> QTensor:
        """Amax scaling through the fused kernels of lpc.formats.kernels."""
        xb = blocks_of(x, _vector(spec, x.shape[-1]))
        if spec.scale_format == "two_level":
            codes, stored, unit = fast.run(kernels.int_two_level, xb, spec.bits, spec.scale_bits)
        else:
            qmax = 2 ** (spec.bits - 1) - 1
            unit = _units(x.reshape(-1, x.shape[-1]), spec, qmax, global_amax).reshape(())
            codes, stored = fast.run(kernels.int_float_scale, xb, unit, spec.bits,
                                     spec.scale_format == "e4m3")
        data = {"qdata": codes.reshape(codes.shape[0], -1), **_store_scales(stored, unit, spec)}
        return QTensor(self.name, tuple(x.shape), spec.model_dump(), data)

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        spec = self.Spec(**q.spec)
        qdata = q.data["qdata"]
        if spec.bits == 4:
            codes = unpack_nibbles(qdata).to(torch.int8)
            codes = torch.where(codes >= 8, codes - 16, codes)
        else:
            codes = qdata
        n_rows = qdata.shape[0]
        v = spec.vector or codes.shape[-1]
        step = _load_scales(q.data, spec, n_rows, codes.shape[-1] // v)
        vals = codes.to(torch.float32).view(n_rows, -1, v) * step.unsqueeze(-1)
        return vals.view(n_rows, -1)[:, : q.shape[-1]].reshape(q.shape)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        scale_format = meta.get("spec", {}).get("scale_format", "two_level")
        extra = {"e4m3": ("global_scale",), "bf16": (), "two_level": ("row_scale",)}[scale_format]
        return ("qdata", "scale", *extra)

    def _block_width(self, spec: IntSpec) -> int | None:
        return spec.vector or None  # per channel: no blocks along the input

    def pinned_context(self, x: torch.Tensor, spec: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Adds the two-level per-row scale of the whole x: `row_scale` (R,) float32."""
        ctx = super().pinned_context(x, spec, context)
        if self.spec(**spec).scale_format == "two_level" and ctx.get("row_scale") is None:
            ctx["row_scale"] = self.quantize(x, **spec, **ctx).data["row_scale"]
        return ctx

    def _bits_per_weight(self, spec: IntSpec) -> float:
        scale_bits = {"e4m3": 8, "bf16": 16, "two_level": spec.scale_bits}[spec.scale_format]
        return spec.bits + (scale_bits / spec.vector if spec.vector else 0.0)  # per channel: ~0 per weight


def _given_rows(row_scale: Any, spec: IntSpec, n_rows: int) -> torch.Tensor:
    """A caller's per-row gamma (R,) or (R, 1) -> (R, 1) float32, checked."""
    if spec.scale_format != "two_level":
        raise FormatError(f"int: row_scale= applies to scale_format='two_level', not '{spec.scale_format}'",
                          "drop row_scale or use scale_format='two_level'")
    gamma = torch.as_tensor(row_scale, dtype=torch.float32)
    if gamma.numel() != n_rows or not bool((gamma > 0).all()) or not bool(torch.isfinite(gamma).all()):
        raise FormatError(f"int: row_scale of shape {tuple(gamma.shape)} does not give {n_rows} positive "
                          "finite row scales", f"pass a float tensor of shape ({n_rows},), e.g. a QTensor's row_scale")
    return gamma.reshape(n_rows, 1)


def _vector(spec: IntSpec, k: int) -> int:
    """Elements per scale for a row of k: the spec's V, or the whole (even-padded) row when per channel."""
    return spec.vector or padded(k, 2)


def _round(y: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scaled values -> int8 codes, round half to even, clamped to [-qmax, qmax]."""
    return torch.round(y).clamp(-qmax, qmax).to(torch.int8)


def _clipped_amax(xb: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """(R, B, V) -> (R, B) vector clip values c_v (OCTAV or amax)."""
    if spec.clip == "octav":
        return octav_clip(xb.abs(), spec.bits)
    return xb.abs().amax(-1)


def _units(rows: torch.Tensor, spec: IntSpec, qmax: int, global_amax: Any) -> torch.Tensor:
    """FP32 unit of the stored scales: (1,) global (e4m3), 1 (bf16) or (R, 1) gamma (two-level)."""
    if spec.scale_format == "bf16":
        return torch.ones(1, device=rows.device)
    if spec.scale_format == "e4m3":
        amax = amax_of(rows) if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
        amax = amax.reshape(1).to(rows.device)
        return torch.where(amax > 0, amax / (qmax * 448.0), torch.ones_like(amax))
    top = max(2 ** spec.scale_bits - 1, 1)
    gamma = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    v = _vector(spec, rows.shape[1])
    kp = padded(rows.shape[1], v)
    for sl in row_chunks(*rows.shape):
        xb = pad_last(rows[sl], v).view(-1, kp // v, v)
        smax = _clipped_amax(xb, spec).amax(-1, keepdim=True) / qmax
        gamma[sl] = torch.where(smax > 0, smax / top, torch.ones_like(smax))
    return gamma


def _quantize_scale(s: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Scale in units (any shape) -> its stored value as float32 (never 0)."""
    if spec.scale_format == "two_level":
        return torch.round(s).clamp(1, 2 ** spec.scale_bits - 1)
    if spec.scale_format == "e4m3":
        r = round_e4m3(s)
    else:
        r = s.to(torch.bfloat16).to(torch.float32)
    return torch.where(r > 0, r, torch.ones_like(r))


def _choose_stored(xb: torch.Tensor, unit: torch.Tensor, spec: IntSpec, qmax: int,
                   wb: torch.Tensor | None) -> torch.Tensor:
    """Blocks (R, B, V), unit (1,) or (R, 1) -> stored scales (R, B) float32."""
    if spec.clip in ("none", "octav"):
        return _quantize_scale(_clipped_amax(xb, spec) / (qmax * unit), spec)

    def fake(v: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        step = (st * unit).unsqueeze(-1)
        return _round(v / step, qmax).to(torch.float32) * step

    return search_block_scales(xb, xb.abs().amax(-1), lambda a: _quantize_scale(a / (qmax * unit), spec),
                               fake, wb if spec.clip == "sensitivity" else None,
                               spec.clip_grid, spec.clip_min)


def _store_scales(stored: torch.Tensor, unit: torch.Tensor, spec: IntSpec) -> dict[str, torch.Tensor]:
    if spec.scale_format == "e4m3":
        return {"scale": stored.to(torch.float8_e4m3fn), "global_scale": unit.reshape(1)}
    if spec.scale_format == "bf16":
        return {"scale": stored.to(torch.bfloat16)}
    return {"scale": pack_bits(stored.to(torch.uint8), spec.scale_bits), "row_scale": unit.reshape(-1)}


def _load_scales(data: dict[str, torch.Tensor], spec: IntSpec, n_rows: int, nv: int) -> torch.Tensor:
    """Stored fields -> (R, nv) float32 effective scales."""
    if spec.scale_format == "e4m3":
        return data["scale"].to(torch.float32) * data["global_scale"].to(torch.float32)
    if spec.scale_format == "bf16":
        return data["scale"].to(torch.float32)
    ints = unpack_bits(data["scale"], spec.scale_bits, nv).to(torch.float32)
    return ints * data["row_scale"].to(torch.float32).view(n_rows, 1)
