"""FP8 E5M2 (max 57344) with a per-tensor or per-channel FP32 scale: 8 bits per weight."""
from __future__ import annotations

import torch

from lpc.formats.numerics import E5M2_MAX
from lpc.formats.registry import register
from lpc.formats.scaled_float import ScaledFloat


@register
class FP8E5M2(ScaledFloat):
    name = "fp8_e5m2"
    description = "FP8 E5M2, per-channel or per-tensor FP32 scale (8 bits)"
    dtype = torch.float8_e5m2
    max_value = E5M2_MAX
