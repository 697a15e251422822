"""FP8 E4M3 (max 448) with a per-tensor, per-channel or per-128x128-block FP32 scale: 8 bits per weight."""
from __future__ import annotations

import torch

from lpc.formats.numerics import E4M3_MAX
from lpc.formats.registry import register
from lpc.formats.scaled_float import ScaledFloat


@register
class FP8E4M3(ScaledFloat):
    name = "fp8_e4m3"
    description = "FP8 E4M3, per-channel, per-tensor or per-128x128-block FP32 scale (8 bits)"
    dtype = torch.float8_e4m3fn
    max_value = E4M3_MAX
