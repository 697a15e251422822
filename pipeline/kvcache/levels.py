"""Precision levels a KV cache policy stores a chunk of tokens at, with the exact bytes each holds.

A chunk is `n` consecutive held tokens of one layer: keys and values (H, n, D). `compress(level, k, v)`
returns the fake-quantized K/V (what attention reads back) and the bytes the chunk's scales occupy;
the elements themselves cost `payload_bits(level)` each. Levels:

- `bf16`: the cache's own precision, 16 bits, no scale.
- `fp8`: FP8 E4M3 with one FP32 scale per token and head (K and V).
- `nvfp4`: lpc's NVFP4 (E2M1, an E4M3 scale per 16 elements) with one FP32 scale per token and head.
- `int4`, `int2`: KIVI (arXiv 2402.02750): asymmetric integers, keys per channel over groups of up to
  `group` tokens, values per token over groups of `group` channels, an FP16 scale and zero per group.
"""
from __future__ import annotations

import math

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.quantizer import KVSpec

LEVELS = ("bf16", "fp8", "nvfp4", "int4", "int2")
PAYLOAD_BITS = {"bf16": 16, "fp8": 8, "nvfp4": 4, "int4": 4, "int2": 2}
KIVI_GROUP = 32


def check_level(name: str) -> str:
    if name not in PAYLOAD_BITS:
        raise InputError(f"unknown KV precision level '{name}'", f"use one of: {', '.join(LEVELS)}")
    return name


def payload_bits(level: str) -> int:
    return PAYLOAD_BITS[check_level(level)]


def kivi_fake(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Asymmetric `bits`-bit quantization of x (H, n, D) in groups of `group` along `dim` (1: tokens,
    per channel; 2: channels, per token); the last group may be shorter. Returns x's dtype."""
    y = x.float().movedim(dim, -1)
    size = y.shape[-1]
    pad = (-size) % group
    if pad:  # edge-replicate so the padding never widens a group's range
        y = torch.cat([y, y[..., -1:].expand(*y.shape[:-1], pad)], dim=-1)
    g = y.reshape(*y.shape[:-1], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    lo, hi = lo.half().float(), hi.half().float()  # scale and zero are stored in FP16
    step = ((hi - lo) / (2 ** bits - 1)).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((g - lo) / step), 0, 2 ** bits - 1)
    out = (q * step + lo).reshape(*y.shape)[..., :size]
    return out.movedim(-1, dim).to(x.dtype)


def kivi_scale_bytes(heads: int, n: int, head_dim: int, group: int = KIVI_GROUP) -> int:
    """FP16 scale + zero: keys one pair per channel per token group, values one per token per channel group."""
    return 4 * heads * (math.ceil(n / group) * head_dim + n * math.ceil(head_dim / group))


def compress(level: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """k, v (H, n, D) -> (fake-quantized k, v in their dtype, bytes of the chunk's scales)."""
    h, n, d = k.shape
    check_level(level)
    if level == "bf16":
        return k, v, 0
    if level in ("int4", "int2"):
        bits = payload_bits(level)
        return kivi_fake(k, bits, KIVI_GROUP, 1), kivi_fake(v, bits, KIVI_GROUP, 2), scale_bytes(level, h, n, d)
    spec = KVSpec("fp8_e4m3", {"granularity": "tensor"}, per_token=True) if level == "fp8" \
        else KVSpec("nvfp4", {}, per_token=True)
    return spec.fake(k.unsqueeze(0))[0], spec.fake(v.unsqueeze(0))[0], scale_bytes(level, h, n, d)


def scale_bytes(level: str, heads: int, n: int, head_dim: int) -> int:
    """Bytes of the scales of one chunk of `n` tokens stored at `level` (K and V)."""
    if check_level(level) == "bf16":
        return 0
    if level in ("int4", "int2"):
        return kivi_scale_bytes(heads, n, head_dim)
    per_token = 2 * 4 * heads * n  # FP32 per token and head, K and V
    blocks = 2 * heads * n * math.ceil(head_dim / 16) if level == "nvfp4" else 0  # one E4M3 byte per 16 elements
    return per_token + blocks


def token_bytes(level: str, heads: int, head_dim: int) -> int:
    """Bytes of one token's K and V elements at `level` in one layer (scales not included)."""
    return 2 * heads * head_dim * payload_bits(level) // 8
