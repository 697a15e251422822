"""Fused per-chunk quantization kernels: the plain (amax-scaled) path of every format.

Each kernel takes a chunk of rows already viewed as (rows, blocks, block) in the caller's
dtype and returns packed fields with `rows` first. `lpc.formats.fast.run` runs them eagerly
over row chunks or compiled over the whole tensor; both run this code, so they agree bit for
bit. Written for inductor: branch-free element math along a constant block length.
"""
from __future__ import annotations

import sys

import torch

from lpc.formats.clipping import keep_least
from lpc.formats.numerics import E2M1_MAX, E4M3_MAX, pack_nibbles

_LITTLE = sys.byteorder == "little"


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """float32 scaled values -> uint8 codes sign<<3 | index; equals numerics.e2m1_encode.

    Counting thresholds passed is the same bucketize with ties to even: '>' where a tie goes
    down (0.25, 1.25, 2.5, 5) and '>=' where it goes up (0.75, 1.75, 3.5). The sign comes
    from the float's top bit (so -0.0 -> 8). Counting in int32 keeps every lane the width of
    a float lane, which is what lets inductor vectorize it.
    """
    a, i32 = y.abs(), torch.int32
    idx = (((a > 0.25).to(i32) + (a >= 0.75).to(i32)) + ((a > 1.25).to(i32) + (a >= 1.75).to(i32))
           + (((a > 2.5).to(i32) + (a >= 3.5).to(i32)) + (a > 5.0).to(i32)))
    return (idx | ((y.contiguous().view(i32) >> 28) & 8)).to(torch.uint8)


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles (..., 2n) -> bytes (..., n), element 2j low; equals numerics.pack_nibbles.

    On little-endian machines four codes are one int32 c0 | c1<<8 | c2<<16 | c3<<24; t = v | v>>4
    holds c0 | c1<<4 in byte 0 and c2 | c3<<4 in byte 2, which are gathered into an int16.
    Contiguous int32 math vectorizes; strided pair loads do not.
    """
    if not _LITTLE or codes.shape[-1] % 4:
        return pack_nibbles(codes)
    v = codes.contiguous().view(torch.int32)
    t = v | (v >> 4)
    return ((t & 0xFF) | ((t >> 8) & 0xFF00)).to(torch.int16).view(torch.uint8)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest E4M3 value (RNE, saturating at 448) as float32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def nonzero_or_one(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def amax_scales(xf: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """float32 blocks (r, nb, 16) -> NVFP4 amax block scales e4m3(amax / (6 * s2)) (r, nb), 0 -> 1."""
    return nonzero_or_one(round_e4m3(xf.abs().amax(-1) / (E2M1_MAX * s2)))


def e2m1_round(xf: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest E2M1 value times `step` (broadcast), i.e. decode(encode(xf / step)) * step."""
    y = xf / step
    return torch.copysign(e2m1_magnitude(y.abs()), y) * step


def e4m3_round(xf: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest E4M3 value (saturating) times `step`."""
    return round_e4m3(xf / step) * step


def nvfp4(xb: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xb: (r, nb, 16), s2: () float32 -> packed codes (r, nb, 8) uint8, block scales (r, nb) f32."""
    xf = xb.to(torch.float32)
    sb = amax_scales(xf, s2)
    codes = e2m1_codes(xf / (sb * s2).unsqueeze(-1))
    return pack_pairs(codes), sb


def nvfp4_fake(xb: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor]:
    """xb: (r, nb, 16), s2: () float32 -> the NVFP4 value of every element (amax block scales), f32
    (r, nb, 16): dequantize(nvfp4(xb)) without packing the codes."""
    xf = xb.to(torch.float32)
    return (e2m1_round(xf, (amax_scales(xf, s2) * s2).unsqueeze(-1)),)


def frozen_grid(xb: torch.Tensor, lo_step: torch.Tensor, high: torch.Tensor, hi_step: torch.Tensor
                ) -> tuple[torch.Tensor]:
    """Rounding on a frozen NVFP4/FGMP grid (pipeline/quantization/frozen.py): blocks (r, nb, 16) ->
    (r, nb, 16) f32, E2M1 on each block's step lo_step (r, nb, 1), or E4M3 under hi_step (0-d) where
    high (r, nb, 1) is set."""
    xf = xb.to(torch.float32)
    return (torch.where(high, e4m3_round(xf, hi_step), e2m1_round(xf, lo_step)),)


def fgmp(xb: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xb: (r, nb, 16) -> NVFP4 packed (r, nb, 8) and scales (r, nb) plus FP8 (r, nb, 16) of
    every block; the caller keeps the kind its mask chooses."""
    packed, sb = nvfp4(xb, s2)
    hi = (xb.to(torch.float32) / (E2M1_MAX * s2)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return packed, sb, hi


def _fgmp_lo_hi_scores(xb: torch.Tensor, s2: torch.Tensor, weight: torch.Tensor, order: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks (r, nb, 16) -> NVFP4 with amax block scales and FP8 under 6 * s2, dequantized (r, nb, 16)
    f32, and the block scores sum(w ((x - Q_lo)^2 - (x - Q_hi)^2)) (r, nb), summed in `order`."""
    xf = xb.to(torch.float32)
    lo = e2m1_round(xf, (amax_scales(xf, s2) * s2).unsqueeze(-1))
    hi = e4m3_round(xf, E2M1_MAX * s2)
    return lo, hi, sum16(((xf - lo).square() - (xf - hi).square()) * weight, order)


def fgmp_scores(xb: torch.Tensor, s2: torch.Tensor, weight: torch.Tensor, order: str) -> tuple[torch.Tensor]:
    """FGMP block scores of blocks (r, nb, 16) -> (r, nb) f32; weight: (nb, 16) f32 (importance per
    channel); order: `sum_order()`. Equals fgmp.block_scores' eager loop."""
    return (_fgmp_lo_hi_scores(xb, s2, weight, order)[2],)


def fgmp_act(xb: torch.Tensor, s2: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor,
             order: str) -> tuple[torch.Tensor]:
    """FGMP activations at run time: (r, nb, 16) -> dequantized blocks (r, nb, 16) f32, each block FP8
    when its score exceeds `threshold` (0-d f32), else NVFP4 with its amax scale. Equals
    fgmp.fake_by_threshold's eager loop (the same operations, the sum in ATen's order)."""
    lo, hi, scores = _fgmp_lo_hi_scores(xb, s2, weight, order)
    return (torch.where((scores > threshold).unsqueeze(-1), hi, lo),)


def scaled_rows(xb: torch.Tensor, max_value: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """xb: (r, nb, 16) rows in blocks -> per-row FP8 `dtype` (r, nb, 16) and scales (r, 1) f32."""
    xf = xb.to(torch.float32)
    amax = xf.abs().amax(-1).amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / max_value, torch.ones_like(amax))
    return scaled_cast(xf, scale, max_value, dtype), scale


def scaled_given(xb: torch.Tensor, scale: torch.Tensor, max_value: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor]:
    """xb: (r, nb, 16), scale () f32 -> FP8 `dtype` (r, nb, 16) (one per-tensor scale)."""
    return (scaled_cast(xb.to(torch.float32), scale.reshape(1, 1), max_value, dtype),)


def scaled_cast(xf: torch.Tensor, scale: torch.Tensor, max_value: float, dtype: torch.dtype) -> torch.Tensor:
    """(r, nb, 16) float32 / scale (r, 1) -> `dtype`, clamped first (an E4M3 cast of 480 is NaN)."""
    return (xf / scale.unsqueeze(-1)).clamp(-max_value, max_value).to(dtype)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 -> int32 floor(log2 a), exact, subnormals included (0 -> -191).

    Read from the exponent bits; a subnormal is first scaled by 2^64 (exact) to be normal.
    """
    small = a < 2.0 ** -126
    an = torch.where(small, a * 2.0 ** 64, a)
    biased = (an.view(torch.int32) >> 23) & 0xFF
    return biased - 127 - torch.where(small, 64, 0).to(torch.int32)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """int32 exponents in [-127, 127] -> float32 2^e, exact (2^-127 is the subnormal 0x00400000)."""
    bits = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 0x00400000))
    return bits.to(torch.int32).view(torch.float32)


def mx_exponent(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """Block amax (float32) -> int32 E8M0 exponent floor(log2 amax) - emax in [-127, 127] (0 -> 0)."""
    e = (floor_log2(amax) - emax).clamp(-127, 127)
    return torch.where(amax > 0, e, torch.zeros_like(e))


def mxfp4(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xb: (r, nb, 32) -> packed E2M1 codes (r, nb, 16) uint8, biased exponents (r, nb) uint8."""
    xf = xb.to(torch.float32)
    e = mx_exponent(xf.abs().amax(-1), 2)
    codes = e2m1_codes(xf / pow2(e).unsqueeze(-1))
    return pack_pairs(codes), (e + 127).to(torch.uint8)


def mxfp8(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xb: (r, nb, 32) -> E4M3 elements (r, nb, 32), biased exponents (r, nb) uint8."""
    xf = xb.to(torch.float32)
    e = mx_exponent(xf.abs().amax(-1), 8)
    q = (xf / pow2(e).unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, (e + 127).to(torch.uint8)


def int_codes(xf: torch.Tensor, step: torch.Tensor, qmax: int, bits: int) -> torch.Tensor:
    """Values (r, nv, V) / step (r, nv) -> int8 codes, or packed two's-complement nibbles."""
    codes = torch.round(xf / step.unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
    return pack_pairs((codes & 0x0F).to(torch.uint8)) if bits == 4 else codes


def int_two_level(xb: torch.Tensor, bits: int, scale_bits: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xb: (r, nv, V) -> codes, stored M-bit scales (r, nv) f32 (integers), gamma (r, 1) f32."""
    qmax, top = 2 ** (bits - 1) - 1, 2 ** scale_bits - 1
    xf = xb.to(torch.float32)
    amax = xf.abs().amax(-1)
    smax = amax.amax(-1, keepdim=True) / qmax
    gamma = torch.where(smax > 0, smax / top, torch.ones_like(smax))
    st = torch.round(amax / (qmax * gamma)).clamp(1, top)
    return int_codes(xf, st * gamma, qmax, bits), st, gamma


def int_float_scale(xb: torch.Tensor, unit: torch.Tensor, bits: int, e4m3: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """xb: (r, nv, V), unit () f32 -> codes, stored E4M3 or BF16 scales (r, nv) as float32."""
    qmax = 2 ** (bits - 1) - 1
    xf = xb.to(torch.float32)
    s = xf.abs().amax(-1) / (qmax * unit)
    st = nonzero_or_one(round_e4m3(s) if e4m3 else s.to(torch.bfloat16).to(torch.float32))
    return int_codes(xf, st * unit, qmax, bits), st


def e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 -> the nearest E2M1 magnitude (ties to even, saturating at 6), float32.

    The same thresholds as `e2m1_codes`, counted in half steps: 0.5, 1, 1.5, 2 are one half step
    apart, 2 -> 3 -> 4 two, 4 -> 6 four. Every sum is a small integer, so the value is exact.
    """
    i32 = torch.int32
    halves = (((a > 0.25).to(i32) + (a >= 0.75).to(i32)) + ((a > 1.25).to(i32) + (a >= 1.75).to(i32))
              + 2 * ((a > 2.5).to(i32) + (a >= 3.5).to(i32)) + 4 * (a > 5.0).to(i32))
    return halves.to(torch.float32) * 0.5


# How ATen's CPU sum over a contiguous last dimension of 16 float32 orders its additions (found by
# `sum_order`): "halves" adds lane i and lane i + 8 first, then the eight partial sums left to
# right; "serial" adds all 16 left to right. None: neither matched (scale search stays eager).
_SUM_ORDER: list = []


def sum16(e: torch.Tensor, order: str) -> torch.Tensor:
    """(..., 16) -> (...) summed in `order` (see `sum_order`), written out so that a compiled
    kernel adds in exactly that order."""
    if order == "halves":
        e = e[..., :8] + e[..., 8:]
    s = e[..., 0]
    for i in range(1, e.shape[-1]):
        s = s + e[..., i]
    return s


def sum_order() -> str | None:
    """The addition order of `tensor.sum(-1)` over 16 contiguous float32 on this machine, probed
    once on values of very different magnitudes (so that any other order gives other roundings)."""
    if not _SUM_ORDER:
        g = torch.Generator().manual_seed(0)
        e = (torch.randn(1 << 14, 16, generator=g) * torch.exp(3 * torch.randn(1 << 14, 16, generator=g))).square()
        ref = e.sum(-1)
        found = [o for o in ("halves", "serial") if torch.equal(sum16(e, o), ref)]
        _SUM_ORDER.append(found[0] if found else None)
    return _SUM_ORDER[0]


def nvfp4_search(xb: torch.Tensor, s2: torch.Tensor, cands: torch.Tensor, weight: torch.Tensor | None,
                 order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 scale search fused with the final encode; equals nvfp4.search_scales + e2m1_encode.

    xb: (r, nb, 16); s2: () f32; cands: (r, nb, C) f32 candidate block scales, the amax scale
    first (it wins ties); weight: None or non-negative f32 broadcastable to xb; order: `sum_order()`.
    Each candidate's block error sum((x - deq)^2 * w) is computed with the very operations of the
    eager search, so the same scale wins. Returns packed codes (r, nb, 8) and the scales (r, nb).
    """
    xf = xb.to(torch.float32)
    best = best_err = None
    for c in range(cands.shape[-1]):
        cand = cands[..., c]
        deq = e2m1_round(xf, (cand * s2).unsqueeze(-1))
        err = (xf - deq).square()
        best, best_err = keep_least(best, best_err, cand, sum16(err if weight is None else err * weight, order))
    codes = e2m1_codes(xf / (best * s2).unsqueeze(-1))
    return pack_pairs(codes), best


def nvfp4_clip(xb: torch.Tensor, s2: torch.Tensor, mults: torch.Tensor, weight: torch.Tensor | None,
               order: str) -> tuple[torch.Tensor]:
    """NVFP4 clip search (MSE, or sensitivity-weighted with `weight`) as one fused pass; equals
    clipping.search_block_scales with nvfp4.scale_from_amax and nvfp4.fake_blocks.

    xb: (r, nb, 16); s2: () f32; mults: (M,) f32 multipliers of each block's amax, 1.0 first (the first
    wins ties); weight: None or non-negative f32 broadcastable to xb; order: `sum_order()`. Each
    multiplier's block error is computed with the very operations of the eager search, so the same
    scale wins. Returns the block scales (r, nb) f32.
    """
    xf = xb.to(torch.float32)
    amax = xf.abs().amax(-1)
    best = best_err = None
    for i in range(mults.shape[0]):
        scale = nonzero_or_one(round_e4m3(amax * mults[i] / (E2M1_MAX * s2)))
        err = (xf - e2m1_round(xf, (scale * s2).unsqueeze(-1))).square()
        best, best_err = keep_least(best, best_err, scale, sum16(err if weight is None else err * weight, order))
    return (best,)
