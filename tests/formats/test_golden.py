"""Tier 1: golden values for corner cases (zero blocks, max values, negative zero, ties)."""
from __future__ import annotations

import torch

from lpc.formats import get_format
from lpc.formats.mx import scale_exponent
from lpc.formats.numerics import e2m1_decode, e2m1_encode

NVFP4_BLOCK = 0.875 * torch.tensor([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -6])


def test_nvfp4_golden_block():
    q = get_format("nvfp4").quantize(NVFP4_BLOCK, global_amax=6 * 448 * 2 ** -9)
    assert float(q.data["global_scale"]) == 2 ** -9
    assert q.data["scale"].float().tolist() == [[448.0]]
    assert bytes(q.data["qdata"].flatten().tolist()).hex() == "00212243446566f7"


def test_e2m1_ties_go_to_even_and_saturate():
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, -0.25, -5.0])
    assert e2m1_decode(e2m1_encode(y)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -4.0]


def test_negative_zero_keeps_its_sign_bit():
    codes = e2m1_encode(torch.tensor([-0.0, 0.0, -0.1]))
    assert codes.tolist() == [8, 0, 8]
    assert torch.signbit(e2m1_decode(codes)).tolist() == [True, False, True]


def test_zero_blocks_get_unit_scales(fmt_case, same_bits):
    name, spec = fmt_case
    fmt = get_format(name)
    x = torch.zeros(3, 64)
    y = fmt.dequantize(fmt.quantize(x, **spec))
    assert same_bits(y.abs(), x)  # exactly zero (possibly -0.0 after a rotation)
    for field in ("scale", "global_scale", "row_scale"):
        t = fmt.quantize(x, **spec).data.get(field)
        if t is not None and t.dtype != torch.uint8:
            assert (t.float() > 0).all(), field  # 0 -> 1, never a zero scale


def test_nvfp4_max_values_are_exact():
    x = torch.tensor([[6.0] * 8 + [-6.0] * 8, [448 * 6.0] + [0.0] * 15])
    y = get_format("nvfp4").fake_quantize(x)
    assert torch.equal(y, x)


def test_mx_scale_is_floor_log2_minus_emax():
    amax = torch.tensor([1.0, 1.5, 1.9999999, 2.0, 6.0, 0.0, 2.0 ** -130, 3e38])
    assert scale_exponent(amax, 2).tolist() == [-2, -2, -2, -1, 0, 0, -127, 125]
    q = get_format("mxfp4").quantize(torch.tensor([7.5] + [0.0] * 31))
    assert q.data["scale"].tolist() == [[127 + 0]]  # floor(log2 7.5) - 2 = 0 -> biased 127
    assert get_format("mxfp4").dequantize(q)[0].item() == 6.0  # saturates at the E2M1 max


def test_mxfp8_saturates_instead_of_nan():
    x = torch.tensor([511.0] + [1.0] * 31)  # floor(log2) - 8 = 0: 511 > 448 must clamp, not NaN
    y = get_format("mxfp8").fake_quantize(x)
    assert y[0].item() == 448.0 and y[1].item() == 1.0


def test_fp8_clamps_before_the_cast():
    x = torch.tensor([[480.0, 1.0]])
    q = get_format("fp8_e4m3").quantize(x, granularity="tensor", global_amax=448.0)
    assert q.data["qdata"].float().tolist() == [[448.0, 1.0]]
    y = get_format("fp8_e5m2").fake_quantize(torch.tensor([[57344.0, 1.0, -3.0]]))
    assert y.tolist() == [[57344.0, 1.0, -3.0]]


def test_int4_golden_codes_and_two_level_scales():
    x = torch.tensor([[7.0, -7.0, 3.5, -0.5, 2.5, 1.5] + [0.0] * 10])
    q = get_format("int").quantize(x, bits=4, vector=16, scale_format="bf16")
    assert q.data["scale"].float().tolist() == [[1.0]]
    # codes 7, -7, 4 (3.5 -> 4 even), -0 -> 0, 2 (2.5 -> 2 even), 2 (1.5 -> 2): two's complement nibbles
    assert q.data["qdata"][0, :3].tolist() == [0x97, 0x04, 0x22]
    x2 = torch.tensor([[1.4] * 16 + [0.7] * 16 + [0.0] * 16])
    q2 = get_format("int").quantize(x2, scale_format="two_level", scale_bits=4)
    gamma = 1.4 / 7 / 15
    assert abs(float(q2.data["row_scale"][0]) - gamma) < 1e-9
    ints = q2.data["scale"][0].tolist()  # 4-bit scales 15, 8 (0.7/7/gamma = 7.5 -> 8), 1 (zero)
    assert ints == [15 | 8 << 4, 1]


def test_bcq_golden_block_with_known_codebook():
    book = torch.arange(-8, 8, dtype=torch.int8).repeat(16, 1) * 2  # entries -16..14, step 2
    book[1] = torch.arange(-31, 32, 4, dtype=torch.int8)[:16]
    x = torch.tensor([31.0, 3.0, -3.0, 0.0, 1.0, 2.0, -16.0, 14.0] + [0.0] * 56)
    q = get_format("bcq").quantize(x, codebook=book)
    assert float(q.data["scale"].float() * q.data["global_scale"]) == 1.0  # amax 31 -> unit scale
    y = get_format("bcq").dequantize(q)
    # codebook 0 can't reach 31 (error 17^2); codebook 1 = -31,-27,...,29 reaches 29; the tie
    # of 3.0 between entries 1 and 5 goes to the lower entry
    assert y[:8].tolist() == [29.0, 1.0, -3.0, 1.0, 1.0, 1.0, -15.0, 13.0]
    assert q.data["selector"][0, 0].item() & 0x0F == 1


def test_fgmp_golden_mix():
    x = torch.cat([NVFP4_BLOCK, NVFP4_BLOCK * 0.01]).reshape(1, 32)
    mask = torch.tensor([[False, True]])
    fmt = get_format("fgmp")
    q = fmt.quantize(x, mask=mask)
    assert q.data["mask"].tolist() == [[0b10]]
    assert bytes(q.data["qdata"].flatten().tolist()).hex() == "00212243446566f7"
    hi = q.data["qdata_hi"].float() * (6 * q.data["global_scale"])
    assert torch.equal(fmt.dequantize(q)[0, 16:], hi[0])
