"""Fake quantization of K/V states as a cache would store them, with any lpc format.

States are (batch, kv_heads, tokens, head_dim), keys after RoPE. The format's blocks run along the
last dimension: per token across head_dim (values, and keys by default). With `kivi`, keys are
grouped per channel instead (KIVI, arXiv 2402.02750): blocks run along the token axis in groups of
`group` tokens; the most recent tokens that do not fill a group stay in full precision until it fills.
Static scales come from calibration: the amax of the layer (`scales: tensor`) or of each KV head
(`scales: head`) is passed to the format as its global amax. `scales: token` gives each token of each
head its own FP32 scale (its absmax, taken when written, as engines with per-token dynamic KV scales
do; 32 more bits per head_dim elements). `sinks` leading tokens of every sequence (the attention
sinks) stay in the cache's own precision. `rotate` stores Q(x H) with H the orthonormal Hadamard matrix
of head_dim (QuaRot/SpinQuant's online rotation: q.k = (qH).(kH), so an engine rotates the queries
and reads the stored keys as they are); it spreads the outlier channels of RoPE'd keys over the head.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from lpc.formats import get_format


@dataclass(frozen=True)
class KVSpec:
    """One layer's K or V quantization: format, spec, calibrated amax (scalar or (kv_heads,)), KIVI
    grouping, per-token scales, full-precision sink tokens."""

    format: str
    spec: dict[str, Any]
    amax: torch.Tensor | None = None
    per_channel: bool = False
    group: int = 32
    per_token: bool = False
    sinks: int = 0
    rotate: bool = False

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) -> Q(x) in x's dtype. With per_channel, T must be a multiple of `group`."""
        if self.rotate:  # stored as Q(x H); attention reads Q(x H) H^T (an engine rotates the queries instead)
            from lpc.formats.rotation import hadamard

            h = hadamard(x.shape[-1]).to(x.device)
            return (replace(self, rotate=False).fake(x.float() @ h).float() @ h.T).to(x.dtype)
        fmt = get_format(self.format)
        if self.per_token and "global_amax" in fmt.context_keys:
            # Every lpc format with a tensor scale is scale-equivariant: quantizing x / a with amax 1 and
            # multiplying by a is quantizing x with amax a, so one call serves every token's own scale.
            a = x.float().abs().amax(-1, keepdim=True)
            a = torch.where(a > 0, a, torch.ones_like(a))
            return (fmt.fake_quantize(x.float() / a, **self.spec, global_amax=torch.tensor(1.0)) * a).to(x.dtype)
        y = x.transpose(-1, -2) if self.per_channel else x
        if self.per_channel:  # (B, H, D, T) -> blocks of `group` tokens along the last axis
            b, h, d, t = y.shape
            y = y.reshape(b, h, d, t // self.group, self.group)
        static = self.amax is not None and "global_amax" in fmt.context_keys
        if not static:  # dynamic scales only (or a format without a tensor scale)
            out = fmt.fake_quantize(y.float(), **self.spec)
        elif self.amax.ndim == 0:
            out = fmt.fake_quantize(y.float(), **self.spec, global_amax=self.amax)
        else:  # one amax per KV head: quantize head by head
            out = torch.stack([fmt.fake_quantize(y[:, i].float(), **self.spec, global_amax=self.amax[i])
                               for i in range(y.shape[1])], dim=1)
        if self.per_channel:
            out = out.reshape(b, h, d, t).transpose(-1, -2)
        return out.to(x.dtype)

    def bits_per_element(self, head_dim: int = 64) -> float:
        """Stored bits per K/V element: the format's own, plus a per-token FP32 scale over head_dim."""
        bits = get_format(self.format).bits_per_weight(**self.spec)
        return bits + (32.0 / head_dim if self.per_token else 0.0)
