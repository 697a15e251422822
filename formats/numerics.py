"""Shared numerics of the block formats: element grids, scale rounding, padding, nibble packing.

Everything here is a pure function of tensors; no state, no devices chosen.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
E2M1_MAX = 6.0
# Non-negative E2M1 magnitudes, indexed by the 3-bit code.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Round-to-nearest-even thresholds between consecutive E2M1 magnitudes. A tie goes to the
# even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4. `bucketize`
# (right=False) sends a value equal to a boundary down, so the boundaries whose tie goes up
# are moved one ulp below the tie.
_TIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_TIE_UP = torch.tensor([False, True, False, True, False, True, False])
# One float32 ulp below the tie (a float64 nextafter would round back to the tie in float32).
_E2M1_BOUNDS = torch.where(_TIE_UP, torch.nextafter(_TIES, torch.zeros_like(_TIES)), _TIES)


_BOUNDS = [float(b) for b in _E2M1_BOUNDS]  # float32 values, exact as Python floats


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """y: float32 already divided by its scale -> uint8 codes sign<<3 | index (saturates at 6).

    The index is the number of boundaries below |y| (what `bucketize(|y|, bounds, right=False)` gives,
    NaN included as 7), counted with seven vectorised comparisons: about 3x faster than bucketize's
    per-element search on CPU, the same codes (tests/formats/test_numerics.py)."""
    a = y.abs()
    if a.dtype != torch.float64:
        a = a.float()
    idx = (a > _BOUNDS[0]).to(torch.uint8)
    for b in _BOUNDS[1:]:
        idx += a > b
    idx.masked_fill_(torch.isnan(a), len(_BOUNDS))
    return idx | (torch.signbit(y).to(torch.uint8) << 3)


# Signed E2M1 values indexed by the whole 4-bit code (code 8 is negative zero).
_E2M1_SIGNED = torch.cat([E2M1_VALUES, -E2M1_VALUES])


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 values (negative zero for code 8)."""
    return _E2M1_SIGNED.to(codes.device)[(codes & 15).to(torch.int32)]


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest E4M3 value (RNE), saturating at +-448; returns float32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (..., 2n) in [0, 16) -> bytes (..., n); element 2j goes in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("pack_nibbles needs an even last dimension")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes (..., n) -> uint8 codes (..., 2n); inverse of `pack_nibbles`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def pad_last(x: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad the last dimension up to a multiple of `block` (no copy when already aligned)."""
    rem = x.shape[-1] % block
    if rem == 0:
        return x
    return torch.nn.functional.pad(x, (0, block - rem))


def padded(k: int, block: int) -> int:
    """Length of a last dimension of k after zero-padding to a multiple of `block`."""
    return -(-k // block) * block


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (R, K) float32 view/copy; formats work on rows of the last dimension."""
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


def amax_of(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d float32: one pass in x's own dtype (exact; no |x| or float32 copy)."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi).to(torch.float32)


def blocks_of(x: torch.Tensor, block: int) -> torch.Tensor:
    """x: (..., K) in its own dtype -> (R, Kp/block, block), zero-padded (a view when aligned)."""
    rows = x.reshape(-1, x.shape[-1])
    xp = pad_last(rows, block)
    return xp.view(rows.shape[0], -1, block)


def row_chunks(rows: int, cols: int, budget: int = 1 << 22):
    """Yield row slices so that one chunk holds about `budget` elements (bounded temporaries)."""
    step = max(1, budget // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 values (R, n) each < 2**nbits -> bytes (R, ceil(n*nbits/8)), little-endian bit order.

    Bit b of value j lands at stream position j*nbits + b; byte i holds positions 8i..8i+7.
    """
    if nbits == 8:
        return values.to(torch.uint8)
    if nbits == 4 and values.shape[-1] % 2 == 0:
        return pack_nibbles(values)  # the same bytes, without a tensor of bits
    shifts = torch.arange(nbits, dtype=torch.uint8, device=values.device)
    bits = ((values.unsqueeze(-1) >> shifts) & 1).reshape(values.shape[0], -1)
    bits = pad_last(bits, 8).reshape(values.shape[0], -1, 8)
    weights = (1 << torch.arange(8, device=values.device)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    """bytes (R, m) -> uint8 values (R, n); inverse of `pack_bits`."""
    if nbits == 8:
        return packed[:, :n]
    if nbits == 4 and n % 2 == 0:
        return unpack_nibbles(packed)[:, :n]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)[:, : n * nbits]
    weights = (1 << torch.arange(nbits, device=packed.device)).to(torch.uint8)
    return (bits.reshape(packed.shape[0], n, nbits) * weights).sum(-1, dtype=torch.uint8)


def importance_rows(importance: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Importance (K,) or `shape` -> float32 (R, K) rows matching `as_rows` of a tensor of `shape`."""
    from lpc.formats.errors import FormatError  # numerics stays import-light

    k = shape[-1]
    imp = torch.as_tensor(importance).to(torch.float32)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if tuple(imp.shape) == (k,):
        out = imp.expand(rows, k)
    elif tuple(imp.shape) == tuple(shape):
        out = imp.reshape(rows, k)
    else:
        raise FormatError(f"importance of shape {tuple(imp.shape)} does not fit a tensor of shape "
                          f"{tuple(shape)}", f"give ({k},) per input channel or the tensor's own shape")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise FormatError("importance holds negative, NaN or inf values",
                          "give finite non-negative weights (e.g. a Fisher diagonal)")
    return out
