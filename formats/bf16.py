"""bf16: weights kept in bfloat16 (round-to-nearest-even), no scale; 16 bits per weight.

The "keep it high precision" choice of a format search, stored like any other format.
"""
from __future__ import annotations

from typing import Any

import torch

from lpc.formats.qtensor import QTensor
from lpc.formats.registry import Format, FormatSpec, register


@register
class BF16(Format):
    name = "bf16"
    Spec = FormatSpec
    description = "bfloat16 cast, no scale (16 bits)"

    def _quantize(self, x: torch.Tensor, spec: FormatSpec, **context: Any) -> QTensor:
        """x: (..., K) float -> qdata bf16 of x's shape."""
        return QTensor(self.name, tuple(x.shape), spec.model_dump(), {"qdata": x.to(torch.bfloat16).contiguous()})

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        return q.data["qdata"].to(torch.float32).reshape(q.shape)

    def _bits_per_weight(self, spec: FormatSpec) -> float:
        return 16.0
