"""Scaled FP8 casts shared by `fp8_e4m3` and `fp8_e5m2`: x ~ cast(x / s) * s, s = amax / max.

Scales per tensor (1,), per channel (R, 1), or per block of BLOCK x BLOCK (rows x inputs; the weight
zero-padded to whole blocks for the amax only): (ceil(R/BLOCK), ceil(K/BLOCK)), the layout of
DeepSeek-style FP8 checkpoints and of compressed-tensors' `block` strategy.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from lpc.formats import fast, kernels
from lpc.formats.clipping import block_error, multipliers, search_block_scales
from lpc.formats.errors import FormatError
from lpc.formats.numerics import amax_of, as_rows, blocks_of, importance_rows, row_chunks
from lpc.formats.qtensor import QTensor
from lpc.formats.registry import BlockSpec, Format


BLOCK = 128  # rows and input columns per scale of granularity "block"


class ScaledFloatSpec(BlockSpec):
    granularity: Literal["tensor", "channel", "block"] = "channel"


class ScaledFloat(Format):
    """Elements cast to `dtype` after division by a per-tensor or per-row FP32 scale."""

    Spec = ScaledFloatSpec
    dtype: ClassVar[torch.dtype]
    max_value: ClassVar[float]
    context_keys = ("global_amax", "importance")

    def _quantize(self, x: torch.Tensor, spec: ScaledFloatSpec, global_amax: Any = None,
                  importance: Any = None) -> QTensor:
        """x: (..., K) -> qdata fp8 x.shape, scale f32 (R, 1) per channel, (1,) per tensor, or
        (ceil(R/BLOCK), ceil(K/BLOCK)) per block."""
        if spec.granularity == "block":
            return self._quantize_blocks(x, spec)
        if spec.clip == "none" and x.shape[-1] % 16 == 0:
            return self._quantize_plain(x, spec, global_amax)
        rows = as_rows(x)
        weight = None
        if spec.clip == "sensitivity":
            weight = importance_rows(importance, tuple(x.shape))
        if spec.granularity == "tensor":
            amax = rows.abs().amax() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
            scale = self._tensor_scale(rows, amax.reshape(1), spec, weight)
        else:
            scale = self._row_scales(rows, spec, weight)
        qdata = torch.empty(rows.shape, dtype=self.dtype, device=x.device)
        for sl in row_chunks(*rows.shape):
            qdata[sl] = self.cast(rows[sl] / (scale if scale.numel() == 1 else scale[sl]))
        return QTensor(self.name, tuple(x.shape), spec.model_dump(),
                       {"qdata": qdata.reshape(x.shape), "scale": scale})

    def _quantize_plain(self, x: torch.Tensor, spec: ScaledFloatSpec, global_amax: Any) -> QTensor:
        """Amax scaling through the fused kernels (K a multiple of 16, so rows split in blocks)."""
        xb = blocks_of(x, 16)
        if spec.granularity == "tensor":
            amax = amax_of(x) if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
            scale = self.scale_of(amax.reshape(1)).to(x.device)
            (qdata,) = fast.run(kernels.scaled_given, xb, scale, self.max_value, self.dtype)
        else:
            qdata, scale = fast.run(kernels.scaled_rows, xb, self.max_value, self.dtype)
        return QTensor(self.name, tuple(x.shape), spec.model_dump(),
                       {"qdata": qdata.reshape(x.shape), "scale": scale})

    def _quantize_blocks(self, x: torch.Tensor, spec: ScaledFloatSpec) -> QTensor:
        if spec.clip != "none":
            raise FormatError(f"{self.name}: granularity 'block' takes clip 'none', not '{spec.clip}'",
                              "drop clip, or use granularity 'channel' for clipped scales")
        rows = as_rows(x)
        r, k = rows.shape
        rb, kb = -(-r // BLOCK), -(-k // BLOCK)
        padded = torch.zeros(rb * BLOCK, kb * BLOCK, dtype=torch.float32, device=x.device)
        padded[:r, :k] = rows
        amax = padded.view(rb, BLOCK, kb, BLOCK).abs().amax(dim=(1, 3))
        scale = self.scale_of(amax)
        qdata = self.cast(rows / _expand(scale, r, k))
        return QTensor(self.name, tuple(x.shape), spec.model_dump(), {"qdata": qdata.reshape(x.shape), "scale": scale})

    def cast(self, y: torch.Tensor) -> torch.Tensor:
        """Scaled values -> `dtype`; clamped first because an out-of-range E4M3 cast gives NaN."""
        return y.clamp(-self.max_value, self.max_value).to(self.dtype)

    def scale_of(self, amax: torch.Tensor) -> torch.Tensor:
        """amax -> FP32 scale amax / max (an all-zero tensor or row gets 1)."""
        return torch.where(amax > 0, amax / self.max_value, torch.ones_like(amax))

    def fake(self, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Blocks (R, B, L) with scales (R, B) -> quantized-dequantized blocks."""
        s = scale.unsqueeze(-1)
        return self.cast(v / s).to(torch.float32) * s

    def _row_scales(self, rows: torch.Tensor, spec: ScaledFloatSpec,
                    weight: torch.Tensor | None) -> torch.Tensor:
        out = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        for sl in row_chunks(*rows.shape):
            amax = rows[sl].abs().amax(-1, keepdim=True)
            if spec.clip == "none":
                out[sl] = self.scale_of(amax)
                continue
            wb = None if weight is None else weight[sl].unsqueeze(1)
            out[sl] = search_block_scales(rows[sl].unsqueeze(1), amax, self.scale_of, self.fake,
                                          wb, spec.clip_grid, spec.clip_min)
        return out

    def _tensor_scale(self, rows: torch.Tensor, amax: torch.Tensor, spec: ScaledFloatSpec,
                      weight: torch.Tensor | None) -> torch.Tensor:
        if spec.clip == "none":
            return self.scale_of(amax)
        cands = [self.scale_of(amax * m) for m in multipliers(spec.clip_grid, spec.clip_min)]
        errs = torch.zeros(len(cands), dtype=torch.float64)
        for sl in row_chunks(*rows.shape):
            v = rows[sl].unsqueeze(1)
            wb = None if weight is None else weight[sl].unsqueeze(1)
            for i, s in enumerate(cands):
                errs[i] += block_error(v, self.fake(v, s.expand(v.shape[0], 1)), wb).sum().double()
        # argmin returns the first minimum, so ties keep the larger multiplier.
        return cands[int(torch.argmin(errs))]

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        qdata = q.data["qdata"]
        rows = qdata.reshape(-1, qdata.shape[-1]).to(torch.float32)
        scale = q.data["scale"].to(torch.float32)
        if q.spec.get("granularity") == "block":
            scale = _expand(scale, *rows.shape)
        rows = rows * scale
        return rows.reshape(q.shape)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        return ("qdata", "scale")

    def _bits_per_weight(self, spec: ScaledFloatSpec) -> float:
        return 8.0 + (32 / BLOCK ** 2 if spec.granularity == "block" else 0.0)


def _expand(scale: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """Block scales (ceil(r/BLOCK), ceil(k/BLOCK)) -> one per element (r, k)."""
    return scale.repeat_interleave(BLOCK, 0)[:r].repeat_interleave(BLOCK, 1)[:, :k]
