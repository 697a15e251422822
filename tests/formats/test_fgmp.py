"""FGMP: block scores, the mask is respected, bits come from the actual mix."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import get_format
from lpc.formats.fgmp import block_scores, fake_high, top_fraction_mask
from lpc.formats.nvfp4 import global_scale_for


def _nvfp4_and_fp8(x):
    lo = get_format("nvfp4").fake_quantize(x)
    s2 = global_scale_for(x.abs().amax())
    return lo, fake_high(x, s2)


def test_block_scores_formula(heavy):
    x = heavy((5, 40), 2)
    imp = torch.rand(40, generator=torch.Generator().manual_seed(1))
    lo, hi = _nvfp4_and_fp8(x)
    gain = imp * ((x - lo).square() - (x - hi).square())
    expected = torch.nn.functional.pad(gain, (0, 8)).view(5, 3, 16).sum(-1)
    torch.testing.assert_close(block_scores(x, imp), expected, rtol=1e-5, atol=1e-7)
    full = imp.expand(5, 40).clone()
    torch.testing.assert_close(block_scores(x, full), block_scores(x, imp))
    assert block_scores(x).shape == (5, 3) and block_scores(x).dtype == torch.float32


def test_mask_is_respected(heavy):
    x = heavy((8, 64), 3)
    mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(2)) < 0.4
    y = get_format("fgmp").fake_quantize(x, mask=mask)
    lo, hi = _nvfp4_and_fp8(x)
    elem = mask.repeat_interleave(16, dim=1)
    assert torch.equal(y[elem], hi[elem]) and torch.equal(y[~elem], lo[~elem])


def test_bits_are_exact_for_the_actual_mix(heavy):
    x = heavy((64, 256), 4)
    fmt = get_format("fgmp")
    for p in (0.0, 0.1, 0.5, 1.0):
        mask = top_fraction_mask(block_scores(x), p)
        q = fmt.quantize(x, mask=mask)
        n_hi = int(mask.sum())
        n_lo = mask.numel() - n_hi
        bits = n_lo * (16 * 4 + 8) + n_hi * 16 * 8 + mask.numel() + 32  # streams, mask, s2
        assert q.storage_bits() == bits
        assert q.spec["high_fraction"] == n_hi / mask.numel()
        nominal = fmt.bits_per_weight(high_fraction=q.spec["high_fraction"])  # all but s2
        assert abs(q.bits_per_weight() - nominal - 32 / x.numel()) < 1e-12


def test_top_fraction_mask_ties_by_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 3.0, 3.0]])
    assert top_fraction_mask(scores, 0.5).tolist() == [[False, True, True, False], [True, False, True, False]]


def test_default_mask_keeps_the_top_blocks(heavy):
    x = heavy((16, 64), 5)
    imp = torch.rand(64, generator=torch.Generator().manual_seed(3))
    q = get_format("fgmp").quantize(x, importance=imp, high_fraction=0.25)
    expected = top_fraction_mask(block_scores(x, imp), 0.25)
    from lpc.formats.numerics import unpack_bits
    assert torch.equal(unpack_bits(q.data["mask"], 1, 4).bool(), expected)


def test_high_blocks_improve_error(heavy, sqnr):
    x = heavy((32, 256), 6)
    fmt = get_format("fgmp")
    scores = block_scores(x)
    best = sqnr(x, fmt.fake_quantize(x, mask=top_fraction_mask(scores, 0.2)))
    worst = sqnr(x, fmt.fake_quantize(x, mask=top_fraction_mask(-scores, 0.2)))
    assert best > worst + 1.0


@pytest.mark.parametrize("shape,dtype,amax", [((3, 7, 576), torch.bfloat16, None), ((3, 7, 576), torch.bfloat16, 50.0),
                                              ((5, 200), torch.float32, None), ((2, 64), torch.float32, 50.0)])
@pytest.mark.parametrize("compiled", ["1", "0"])
def test_run_time_activation_path_equals_quantize_then_dequantize(shape, dtype, amax, compiled, monkeypatch):
    """The one-pass FGMP activation simulation (compiled kernel, or the eager loop with LPC_COMPILE=0)
    gives the very bits of packing with mask = scores > threshold and unpacking (outliers, all-zero
    blocks, a padded last block, a fixed global amax)."""
    from lpc.formats.fgmp import block_scores, fake_by_threshold

    monkeypatch.setenv("LPC_COMPILE", compiled)
    fmt = get_format("fgmp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * torch.rand(shape[-1], generator=g) * 5
    x[..., 3] = 80.0
    x[..., 20:36] = 0
    x = x.to(dtype)
    imp = torch.rand(shape[-1], generator=g)
    scores = block_scores(x, imp, amax)
    threshold = float(scores.flatten().quantile(0.7))
    ctx = {"global_amax": amax} if amax is not None else {}
    want = fmt.dequantize(fmt.quantize(x, mask=scores > threshold, importance=imp, **ctx), dtype=x.dtype)
    got = fake_by_threshold(x, imp, amax, threshold)
    assert got.dtype == x.dtype and torch.equal(got, want)
    assert 0 < int((scores > threshold).sum()) < scores.numel()


@pytest.mark.parametrize("shape,dtype,amax", [((3, 7, 576), torch.bfloat16, None), ((5, 200), torch.float32, 50.0)])
@pytest.mark.parametrize("importance", ["channel", "element", "none"])
def test_block_scores_compiled_equal_the_eager_loop(shape, dtype, amax, importance, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * torch.rand(shape[-1], generator=g) * 5).to(dtype)
    imp = {"channel": lambda: torch.rand(shape[-1], generator=g), "none": lambda: None,
           "element": lambda: torch.rand(shape, generator=g) ** 4}[importance]()  # the weight Fisher's shape
    monkeypatch.setenv("LPC_COMPILE", "0")
    eager = block_scores(x, imp, amax)
    monkeypatch.setenv("LPC_COMPILE", "1")
    assert torch.equal(block_scores(x, imp, amax), eager)
