"""NVFP4 scale search as one compiled kernel gives the eager search's bytes exactly."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import fast, get_format, kernels
from lpc.formats.numerics import E2M1_VALUES, e2m1_decode, e2m1_encode


def _input(shape, heavy) -> torch.Tensor:
    """Heavy-tailed rows at very different scales, a zero row, -0.0 and a padded last block."""
    x = heavy(shape, 5) * torch.logspace(-4, 2, shape[0]).unsqueeze(1)
    x[1] = 0.0
    x[2, ::3] = -0.0
    return x.to(torch.bfloat16)


def test_e2m1_magnitude_equals_encode_decode():
    # every tie, one ulp either side of it, the grid itself, and values past saturation
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    pts = torch.cat([ties, torch.nextafter(ties, torch.zeros(7)), torch.nextafter(ties, torch.full((7,), 9.0)),
                     E2M1_VALUES, torch.tensor([6.5, 1e30, 0.0]), torch.rand(10000) * 7])
    assert torch.equal(kernels.e2m1_magnitude(pts), e2m1_decode(e2m1_encode(pts)))


def test_sum16_matches_torch_sum_in_the_probed_order():
    order = kernels.sum_order()
    if order is None:
        pytest.skip("this machine's sum order is neither known one: the eager search runs instead")
    e = torch.rand(4096, 16, dtype=torch.float32) * torch.logspace(-8, 8, 16)
    assert torch.equal(kernels.sum16(e, order), e.sum(-1))
    other = "serial" if order == "halves" else "halves"
    assert not torch.equal(kernels.sum16(e, other), e.sum(-1))  # the probe can tell them apart


@pytest.mark.parametrize("radius", [1, 2])
@pytest.mark.parametrize("importance", ["none", "channel", "full"])
def test_compiled_search_equals_eager(monkeypatch, heavy, same_bits, radius, importance):
    if not fast.enabled() or kernels.sum_order() is None:
        pytest.skip("compiled kernels are off (LPC_COMPILE=0) or the sum order is unknown here")
    fmt = get_format("nvfp4")
    for shape in [(48, 200), (7, 64)]:  # a padded last block; a second shape reuses the dynamic kernel
        x = _input(shape, heavy)
        g = torch.Generator().manual_seed(shape[0])
        imp = {"none": None, "channel": torch.rand(shape[1], generator=g) ** 3,
               "full": torch.rand(*shape, generator=g)}[importance]
        with monkeypatch.context() as m:
            m.setitem(fast._compiled, kernels.nvfp4_search, None)  # as after a failed compile: eager
            eager = fmt.quantize(x, scale_search=radius, importance=imp)
        monkeypatch.setattr(fast, "MIN_NUMEL", 0)
        compiled = fmt.quantize(x, scale_search=radius, importance=imp)
        assert fast._compiled.get(kernels.nvfp4_search) is not None, "the search kernel did not compile"
        for k in eager.data:
            assert same_bits(eager.data[k], compiled.data[k]), (shape, k)
        # the search did change some scales (else equality proves nothing about it)
        plain = fmt.quantize(x)
        assert not same_bits(plain.data["scale"], compiled.data["scale"])


@pytest.mark.parametrize("kind, clip, radius", [("nvfp4", "mse", 0), ("nvfp4", "sensitivity", 2),
                                                    ("fgmp", "sensitivity", 2), ("fgmp", "mse", 0)])
def test_compiled_clip_search_equals_eager(monkeypatch, heavy, same_bits, kind, clip, radius):
    """The clip search over 16 multipliers of each block's amax (then the scale search around the winner)
    compiled into one pass each gives the eager search's bytes, for NVFP4 and for FGMP's NVFP4 blocks."""
    if not fast.enabled() or kernels.sum_order() is None:
        pytest.skip("compiled kernels are off (LPC_COMPILE=0) or the sum order is unknown here")
    fmt = get_format(kind)
    for shape in [(48, 200), (9, 64)]:
        x = _input(shape, heavy)
        imp = torch.rand(shape[1], generator=torch.Generator().manual_seed(shape[0])) ** 3
        spec = {"clip": clip, "scale_search": radius, "importance": imp}
        with monkeypatch.context() as m:
            m.setitem(fast._compiled, kernels.nvfp4_clip, None)
            m.setitem(fast._compiled, kernels.nvfp4_search, None)
            eager = fmt.quantize(x, **spec)
        monkeypatch.setattr(fast, "MIN_NUMEL", 0)
        compiled = fmt.quantize(x, **spec)
        assert fast._compiled.get(kernels.nvfp4_clip) is not None, "the clip kernel did not compile"
        for k in eager.data:
            assert same_bits(eager.data[k], compiled.data[k]), (kind, shape, k)
        plain = fmt.quantize(x, importance=imp)
        assert not same_bits(plain.data["scale"], compiled.data["scale"])  # clipping moved some scales
