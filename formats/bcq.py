"""LO-BCQ (arXiv 2502.05376): block-clustered codebook quantization, 4.5 or 4.625 bits.

Arrays of 64 scalars share an E4M3 scale (times a per-tensor FP32 `global_scale`); each block
of 8 inside an array selects one of Nc codebooks (log2(Nc) selector bits) and stores a 4-bit
index per scalar into that codebook of 16 INT6 entries. Fields: qdata uint8 (R, Kp/2) indices
(element 2j low nibble), selector uint8 (R, ceil(Kp/8 * log2(Nc) / 8)) packed bits, scale
f8e4m3 (R, Kp/64), global_scale f32 (1,), codebook int8 (Nc, 16).

Pass `codebook=` (e.g. `fit_codebooks(all_weights).codebook`, fitted once per model) to reuse
one codebook; without it the codebook is fitted on this tensor alone.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from lpc.formats import codebooks as cbk
from lpc.formats import fast
from lpc.formats.clipping import search_block_scales
from lpc.formats.numerics import (
    amax_of, as_rows, blocks_of, importance_rows, pack_bits, pack_nibbles, pad_last, row_chunks, unpack_bits,
    unpack_nibbles,
)
from lpc.formats.qtensor import QTensor
from lpc.formats.registry import BlockSpec, Format, register

LB, LA = cbk.LB, cbk.LA


class BCQSpec(BlockSpec):
    codebooks: Literal[8, 16] = Field(16, description="Nc, codebooks of 16 INT6 entries")
    fit_iters: int = Field(50, ge=1, le=500, description="Lloyd-Max iterations when fitting per tensor")


@register
class BCQ(Format):
    name = "bcq"
    Spec = BCQSpec
    description = "LO-BCQ: 8-scalar blocks pick 1 of Nc INT6 codebooks, E4M3 scale per 64 (4.625 bits)"
    context_keys = ("codebook", "importance", "global_amax")

    def _quantize(self, x: torch.Tensor, spec: BCQSpec, codebook: Any = None,
                  importance: Any = None, global_amax: Any = None) -> QTensor:
        """x: (..., K) -> fields above; codebook: int (Nc, 16) INT6 (default: fitted on x)."""
        if codebook is None:
            codebook = cbk.fit_codebooks([x], spec.codebooks, max_iters=spec.fit_iters).codebook
        cb = cbk.check_codebook(codebook, spec.codebooks)
        vals, idxs = cbk.tables(cb)
        amax = amax_of(x) if global_amax is None else torch.as_tensor(global_amax)
        s2 = cbk.global_scale_for(amax).to(x.device)
        if spec.clip == "none":
            packed, sel, sa = fast.run(cbk.kernel, blocks_of(x, LA), s2, vals, idxs, chunk=1 << 18)
            return self._record(x, spec, packed.reshape(packed.shape[0], -1),
                                sel.reshape(sel.shape[0], -1), sa, s2, cb)
        rows = as_rows(x)
        n_rows, kp = rows.shape[0], cbk.padded_k(rows.shape[1])
        weight = importance_rows(importance, tuple(x.shape)) if spec.clip == "sensitivity" else None
        qdata = torch.empty(n_rows, kp // 2, dtype=torch.uint8, device=x.device)
        sel_all = torch.empty(n_rows, kp // LB, dtype=torch.uint8, device=x.device)
        scale = torch.empty(n_rows, kp // LA, dtype=torch.float32, device=x.device)
        for sl in row_chunks(n_rows, kp, budget=1 << 20):
            xa = pad_last(rows[sl], LA).view(-1, kp // LA, LA)
            wa = None if weight is None else pad_last(weight[sl], LA).view_as(xa)
            sa = self._array_scales(xa, s2, spec, wa, (vals, idxs, cb))
            sel, idx, _ = cbk.encode((xa / (sa * s2).unsqueeze(-1)).reshape(-1, LB), vals, idxs)
            qdata[sl] = pack_nibbles(idx.view(xa.shape[0], -1))
            sel_all[sl] = sel.view(xa.shape[0], -1).to(torch.uint8)
            scale[sl] = sa
        return self._record(x, spec, qdata, sel_all, scale, s2, cb)

    def _record(self, x: torch.Tensor, spec: BCQSpec, qdata: torch.Tensor, sel: torch.Tensor,
                sa: torch.Tensor, s2: torch.Tensor, cb: torch.Tensor) -> QTensor:
        """Selectors (R, Kp/8) uint8 and array scales (R, Kp/64) float32 -> the packed QTensor."""
        data = {"qdata": qdata, "selector": pack_bits(sel, _sel_bits(spec)),
                "scale": sa.to(torch.float8_e4m3fn), "global_scale": s2.reshape(1), "codebook": cb}
        return QTensor(self.name, tuple(x.shape), spec.model_dump(), data)

    def _array_scales(self, xa: torch.Tensor, s2: torch.Tensor, spec: BCQSpec,
                      wa: torch.Tensor | None, book: tuple) -> torch.Tensor:
        """Arrays (R, A, 64) -> E4M3 array scales (R, A) float32 (amax or clip search)."""
        amax = xa.abs().amax(-1)
        if spec.clip == "none":
            return cbk.array_scales(amax, s2)
        vals, idxs, cb = book

        def fake(v: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
            step = (sa * s2).unsqueeze(-1)
            sel, idx, _ = cbk.encode((v / step).reshape(-1, LB), vals, idxs)
            return cbk.decode(sel, idx, cb).view_as(v) * step

        return search_block_scales(xa, amax, lambda a: cbk.array_scales(a, s2), fake,
                                   wa if spec.clip == "sensitivity" else None,
                                   spec.clip_grid, spec.clip_min)

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        spec = self.Spec(**q.spec)
        qdata = q.data["qdata"]
        n_rows, kp = qdata.shape[0], qdata.shape[1] * 2
        sel = unpack_bits(q.data["selector"], _sel_bits(spec), kp // LB).reshape(-1)
        idx = unpack_nibbles(qdata).reshape(-1, LB)
        u = cbk.decode(sel, idx, q.data["codebook"]).view(n_rows, kp // LA, LA)
        step = q.data["scale"].to(torch.float32) * q.data["global_scale"].to(torch.float32)
        x = (u * step.unsqueeze(-1)).view(n_rows, kp)
        return x[:, : q.shape[-1]].reshape(q.shape)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        return ("qdata", "selector", "scale", "global_scale", "codebook")

    def _block_width(self, spec: BCQSpec) -> int:
        return LA

    def pinned_context(self, x: torch.Tensor, spec: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Adds the codebook fitted on the whole x (int8 (Nc, 16)) when none is given."""
        ctx = super().pinned_context(x, spec, context)
        if ctx.get("codebook") is None:
            ctx["codebook"] = self.quantize(x, **spec, **ctx).data["codebook"]
        return ctx

    def _bits_per_weight(self, spec: BCQSpec) -> float:
        return 4.0 + _sel_bits(spec) / LB + 8.0 / LA


def _sel_bits(spec: BCQSpec) -> int:
    return int(math.log2(spec.codebooks))
