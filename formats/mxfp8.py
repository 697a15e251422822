"""MXFP8 (OCP MX): E4M3 elements in blocks of 32 sharing an E8M0 scale, 8.25 bits per weight.

qdata float8_e4m3fn (R, Kp); scale uint8 (R, Kp/32) biased exponents.
"""
from __future__ import annotations

from lpc.formats.mx import MXFP8Base
from lpc.formats.registry import register


@register
class MXFP8(MXFP8Base):
    name = "mxfp8"
    description = "OCP MXFP8: E4M3 x E8M0 scale per 32 (8.25 bits)"
