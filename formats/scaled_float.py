"""Scaled FP8 casts shared by `fp8_e4m3` and `fp8_e5m2`: x ~ cast(x / s) * s, s = amax / max."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from lpc.formats.qtensor import QTensor
from lpc.formats.registry import Format, FormatSpec


class ScaledFloatSpec(FormatSpec):
    granularity: Literal["tensor", "channel"] = "channel"


class ScaledFloat(Format):
    """Elements cast to `dtype` after division by a per-tensor or per-row FP32 scale."""

    Spec = ScaledFloatSpec
    dtype: ClassVar[torch.dtype]
    max_value: ClassVar[float]
    context_keys = ("global_amax", "importance")

    def _quantize(self, x: torch.Tensor, spec: ScaledFloatSpec, global_amax: Any = None,
                  importance: Any = None) -> QTensor:
        """x: (..., K) -> qdata fp8 x.shape, scale f32 (R, 1) per channel or (1,) per tensor."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if spec.granularity == "tensor":
            amax = rows.abs().amax() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
            amax = amax.reshape(1)
        else:
            amax = rows.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / self.max_value, torch.ones_like(amax))
        # Clamp before the cast: an out-of-range E4M3 cast gives NaN, not the max.
        qdata = (rows / scale).clamp(-self.max_value, self.max_value).to(self.dtype)
        return QTensor(self.name, tuple(x.shape), spec.model_dump(),
                       {"qdata": qdata.reshape(x.shape), "scale": scale.to(torch.float32)})

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qdata = q.data["qdata"]
        rows = qdata.reshape(-1, qdata.shape[-1]).to(torch.float32) * q.data["scale"].to(torch.float32)
        return rows.reshape(q.shape).to(dtype)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        return ("qdata", "scale")

    def _bits_per_weight(self, spec: ScaledFloatSpec) -> float:
        return 8.0
