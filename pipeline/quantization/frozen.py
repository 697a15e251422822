"""Rounding on a frozen grid: the straight-through quantizer of layer-wise tuning for NVFP4 and FGMP.

The format's own quantizer searches every block's scale (sensitivity-weighted clipping, scale search),
which costs about 5x the rounding itself; re-running it at every optimizer step would dominate the
tuning. While a layer is tuned its grid is therefore frozen at the one plain rounding chose for the
original weight: the per-tensor scale, the FGMP mask and the E4M3 block scales of the stored fields
(`global_scale`, `mask`, `scale`, as DESIGN section 4 defines them). Only the elements are rounded
at each step: E2M1 in NVFP4 blocks, E4M3 of x / (6 * global_scale) in FGMP's FP8 blocks. For the
original weight this equals the format's fake quantization exactly (tested). The artifact is then
written by the format's own quantizer from the tuned weight, and the tuning checks that rounding
on held-out samples (tune.py).
"""
from __future__ import annotations

from typing import Any

import torch

from lpc.formats import fast, kernels
from lpc.formats.numerics import E2M1_MAX, as_rows, pad_last, padded, unpack_bits
from lpc.pipeline.quantization.ste import Quantizer, fake_quantizer

BLOCK = 16
FROZEN_FORMATS = ("nvfp4", "fgmp")


def grid_quantizer(fmt: Any, spec: dict[str, Any], ctx: dict[str, Any], w: torch.Tensor,
                   dtype: torch.dtype) -> Quantizer:
    """v -> v rounded on the grid that plain rounding of `w` (out, in) chose (NVFP4, FGMP), in `dtype`;
    other formats: their own fake quantization (ste.fake_quantizer)."""
    if fmt.name not in FROZEN_FORMATS:
        return fake_quantizer(fmt, spec, ctx, dtype)
    c = {k: (v.to(w.device) if hasattr(v, "to") else v) for k, v in ctx.items()}
    q = fmt.quantize(w.to(dtype), **spec, **c)
    shape, k = tuple(w.shape), w.shape[-1]
    nb = padded(k, BLOCK) // BLOCK
    rows = w.numel() // k
    s2 = q.data["global_scale"].to(torch.float32).reshape(())
    if fmt.name == "fgmp":
        high = unpack_bits(q.data["mask"], 1, nb).bool().reshape(rows, nb)
    else:
        high = torch.zeros(rows, nb, dtype=torch.bool, device=w.device)
    # every block's NVFP4 step (FP8 blocks: 1, unused), so a step rounds in one fused pass, no gathers
    lo_step = torch.ones(rows, nb, dtype=torch.float32, device=w.device)
    lo_step[~high] = q.data["scale"].to(torch.float32).reshape(-1).to(w.device) * s2
    lo_step, high = lo_step.unsqueeze(-1), high.unsqueeze(-1)
    hi_step = (E2M1_MAX * s2).reshape(())

    def rounded(v: torch.Tensor) -> torch.Tensor:
        xb = pad_last(as_rows(v.to(dtype)), BLOCK).view(rows, nb, BLOCK)
        got = fast.run_compiled(kernels.frozen_grid, xb, lo_step, high, hi_step)
        out = (got or kernels.frozen_grid(xb, lo_step, high, hi_step))[0]
        return out.view(rows, -1)[:, :k].reshape(shape).to(dtype)

    return rounded
