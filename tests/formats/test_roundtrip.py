"""Tier 2: exact round trips: packing helpers, pack/unpack of every format, safetensors bytes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from lpc.formats import get_format, kernels
from lpc.formats.numerics import (
    e2m1_encode, pack_bits, pack_nibbles, unpack_bits, unpack_nibbles,
)

SHAPES = [(1,), (172,), (1, 1), (3, 33), (5, 64), (2, 3, 172), (4, 1, 48), (7, 16)]


@pytest.mark.parametrize("shape", [(1, 2), (3, 8), (2, 5, 34), (4, 64)])
def test_nibbles_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_nibbles(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_nibbles(packed), codes)
    assert torch.equal(packed[..., 0] & 0x0F, codes[..., 0])  # element 0 in the low nibble


@pytest.mark.parametrize("nbits", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("n", [1, 5, 8, 17, 64])
def test_bits_round_trip(nbits, n):
    vals = torch.randint(0, 2 ** nbits, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_bits(vals, nbits)
    assert packed.shape == (3, -(-n * nbits // 8))
    assert torch.equal(unpack_bits(packed, nbits, n), vals)


def test_pack_bits_order_is_little_endian():
    assert pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.uint8), 1).tolist() == [[0x81, 0x01]]
    assert pack_bits(torch.tensor([[5, 3]], dtype=torch.uint8), 3).tolist() == [[5 | 3 << 3]]


@pytest.mark.parametrize("shape", [(2, 16), (3, 7, 32), (1, 64)])
def test_kernel_pack_pairs_equals_pack_nibbles(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(kernels.pack_pairs(codes), pack_nibbles(codes))


def test_kernel_e2m1_codes_equal_bucketize_codes():
    # Every float32 step around every E2M1 threshold and tie, both signs, zeros and huge values.
    ties = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    near = torch.cat([ties, torch.nextafter(ties, torch.zeros(1)), torch.nextafter(ties, torch.full((1,), 9.0))])
    y = torch.cat([near, -near, torch.tensor([0.0, -0.0, 7.0, 1e30, -1e30, 1e-40])])
    y = torch.cat([y, torch.linspace(-8, 8, 4001)])
    assert torch.equal(kernels.e2m1_codes(y), e2m1_encode(y))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_format_round_trip(fmt_case, shape, heavy, same_bits):
    name, spec = fmt_case
    fmt = get_format(name)
    x = heavy(shape, seed=len(shape))
    q = fmt.quantize(x, **spec)
    y = fmt.dequantize(q)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # pack -> safetensors bytes -> unpack rebuilds a QTensor that dequantizes to the same bits
    blob = save({k: v.contiguous() for k, v in fmt.pack(q).items()})
    q2 = fmt.unpack(load(blob), q.meta())
    assert same_bits(fmt.dequantize(q2), y)
    assert set(fmt.fields(q.meta())) <= set(q.data)
    # the input is never modified and the same input gives the same bytes
    assert torch.equal(x, heavy(shape, seed=len(shape)))
    q3 = fmt.quantize(x, **spec)
    assert all(same_bits(q3.data[k], q.data[k]) for k in q.data)


def test_dequantize_dtype_and_fake_quantize(fmt_case, heavy):
    name, spec = fmt_case
    fmt = get_format(name)
    x = heavy((4, 48)).to(torch.bfloat16)
    y = fmt.fake_quantize(x, **spec)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_padding_is_invisible(fmt_case, heavy, same_bits):
    """A last dimension that is not a multiple of the block is zero-padded: quantizing the
    padded tensor gives the same values on the original columns."""
    name, spec = fmt_case
    fmt = get_format(name)
    x = heavy((6, 33))
    padded = torch.nn.functional.pad(x, (0, 128 - 33))
    if name == "bcq":  # the same codebook for both (a fit would see the padding)
        spec = {**spec, "codebook": get_format("bcq").quantize(x, **spec).data["codebook"]}
    if name == "fgmp":
        from lpc.formats.fgmp import block_scores, top_fraction_mask

        mask = top_fraction_mask(block_scores(x), 0.3)
        spec = {**spec, "mask": mask}
        pmask = torch.zeros(6, 8, dtype=torch.bool)
        pmask[:, :3] = mask
        y_pad = fmt.dequantize(fmt.quantize(padded, **{**spec, "mask": pmask}))
    else:
        y_pad = fmt.dequantize(fmt.quantize(padded, **spec))
    y = fmt.dequantize(fmt.quantize(x, **spec))
    if spec.get("rotate") or (name.startswith("fp8") and spec.get("clip") == "mse"):
        torch.testing.assert_close(y, y_pad[:, :33])  # rotation mixes padding in; floats differ
    else:
        assert same_bits(y, y_pad[:, :33].contiguous())
