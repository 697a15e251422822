"""Rounding on a frozen grid: the straight-through quantizer of layer-wise tuning for NVFP4 and FGMP.

The format's own quantizer searches every block's scale (sensitivity-weighted clipping, scale search),
which costs about 5x the rounding itself; re-running it at every optimizer step would dominate the
tuning. While a layer is tuned its grid is therefore frozen at the one plain rounding chose for the
original weight: the per-tensor scale, the FGMP mask and the E4M3 block scales of the stored fields
(`global_scale`, `mask`, `scale`, as DESIGN section 4 defines them). Only the elements are rounded
at each step: E2M1 in NVFP4 blocks, E4M3 of x / (6 * global_scale) in FGMP's FP8 blocks. For the
original weight this equals the format's fake quantization exactly (tested). The tuned weight is
stored on the same grid (`FrozenGrid.encode`: plain rounding's scales, mask and global scale, the
tuned elements), so the artifact holds exactly what the tuning measured, without a second scale
search; the tuning checks that rounding on held-out samples (tune.py). Rotated blocks (`rotate`)
have their grid in the rotated basis: they tune through the format's own fake quantization.
"""
from __future__ import annotations

from typing import Any

import torch

from lpc.formats import fast, kernels
from lpc.formats.numerics import E2M1_MAX, E4M3_MAX, as_rows, e2m1_encode, pack_nibbles, pad_last, padded, unpack_bits
from lpc.formats.qtensor import QTensor
from lpc.pipeline.quantization.ste import Quantizer, fake_quantizer

BLOCK = 16
FROZEN_FORMATS = ("nvfp4", "fgmp")


def grid_quantizer(fmt: Any, spec: dict[str, Any], ctx: dict[str, Any], w: torch.Tensor,
                   dtype: torch.dtype) -> Quantizer:
    """v -> v rounded on the grid that plain rounding of `w` (out, in) chose (NVFP4, FGMP; a `FrozenGrid`),
    in `dtype`; other formats, and rotated blocks (whose grid lives in the rotated basis): their own fake
    quantization (ste.fake_quantizer)."""
    if fmt.name not in FROZEN_FORMATS or spec.get("rotate", False):
        return fake_quantizer(fmt, spec, ctx, dtype)
    return FrozenGrid(fmt, spec, ctx, w, dtype)


class FrozenGrid:
    """The frozen grid of one weight: `plain` is the format's own rounding of `w` (the QTensor plain
    rounding stores), calling it rounds other values on that grid (the tuning's quantizer), and
    `encode(v)` is the QTensor of v on that grid: the same fields as `plain` but the elements, a valid
    QTensor of the format (its block scales are ones the format can choose) whose dequantization is
    exactly what the tuning measured, so the tuned weight is stored without another scale search."""

    def __init__(self, fmt: Any, spec: dict[str, Any], ctx: dict[str, Any], w: torch.Tensor, dtype: torch.dtype):
        c = {k: (v.to(w.device) if hasattr(v, "to") else v) for k, v in ctx.items()}
        self.plain = q = fmt.quantize(w.to(dtype), **spec, **c)
        self.shape, self.dtype, k = tuple(w.shape), dtype, w.shape[-1]
        self.nb = padded(k, BLOCK) // BLOCK
        self.rows = w.numel() // k
        s2 = q.data["global_scale"].to(torch.float32).reshape(())
        if fmt.name == "fgmp":
            high = unpack_bits(q.data["mask"], 1, self.nb).bool().reshape(self.rows, self.nb)
        else:
            high = torch.zeros(self.rows, self.nb, dtype=torch.bool, device=w.device)
        # every block's NVFP4 step (FP8 blocks: 1, unused), so a step rounds in one fused pass, no gathers
        lo_step = torch.ones(self.rows, self.nb, dtype=torch.float32, device=w.device)
        lo_step[~high] = q.data["scale"].to(torch.float32).reshape(-1).to(w.device) * s2
        self.lo_step, self.high = lo_step.unsqueeze(-1), high.unsqueeze(-1)
        self.hi_step = (E2M1_MAX * s2).reshape(())

    def _blocks(self, v: torch.Tensor) -> torch.Tensor:
        return pad_last(as_rows(v.to(self.dtype)), BLOCK).view(self.rows, self.nb, BLOCK)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        xb = self._blocks(v)
        got = fast.run_compiled(kernels.frozen_grid, xb, self.lo_step, self.high, self.hi_step)
        out = (got or kernels.frozen_grid(xb, self.lo_step, self.high, self.hi_step))[0]
        return out.view(self.rows, -1)[:, :self.shape[-1]].reshape(self.shape).to(self.dtype)

    def encode(self, v: torch.Tensor) -> QTensor:
        """v (the weight's shape) rounded on the frozen grid, as the format stores it."""
        xf = self._blocks(v).to(torch.float32)
        low = ~self.high[..., 0]
        data = dict(self.plain.data)
        if self.plain.format == "fgmp":
            data["qdata"] = pack_nibbles(e2m1_encode(xf[low] / self.lo_step[low]))
            data["qdata_hi"] = (xf[~low] / self.hi_step).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        else:
            data["qdata"] = pack_nibbles(e2m1_encode(xf / self.lo_step).view(self.rows, -1))
        return QTensor(self.plain.format, self.plain.shape, dict(self.plain.spec), data)
