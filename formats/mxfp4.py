"""MXFP4 (OCP MX): E2M1 elements in blocks of 32 sharing an E8M0 scale, 4.25 bits per weight.

qdata uint8 (R, Kp/2) two E2M1 codes per byte (element 2j low nibble); scale uint8 (R, Kp/32).
"""
from __future__ import annotations

from lpc.formats.mx import MXFP4Base
from lpc.formats.registry import register


@register
class MXFP4(MXFP4Base):
    name = "mxfp4"
    description = "OCP MXFP4: E2M1 x E8M0 scale per 32 (4.25 bits)"
