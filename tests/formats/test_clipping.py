"""Clipping: OCTAV's fixed point, the multiplier grid, sensitivity weighting."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import get_format
from lpc.formats.clipping import multipliers, octav_clip


def test_octav_fixed_point_known_answer():
    # 15 values of 0.1 and one of 1.0, B = 4: with 0.1 < s < 1 the fixed point is
    # s = 1 / (15 * 4^-4 / 3 + 1) = 768 / 783.
    x = torch.tensor([[0.1] * 15 + [1.0]])
    s = octav_clip(x.abs(), bits=4)
    assert s.item() == pytest.approx(768 / 783, rel=1e-6)


def test_octav_satisfies_its_equation_on_random_vectors(heavy):
    absx = heavy((64, 16), 3).abs()
    s = octav_clip(absx, bits=4)
    above = absx > s.unsqueeze(-1)
    rhs = (absx * above).sum(-1) / (4.0 ** -4 / 3 * (~above).sum(-1) + above.sum(-1))
    converged = above.any(-1)
    torch.testing.assert_close(s[converged], rhs[converged], rtol=1e-5, atol=0)
    assert (s <= absx.amax(-1)).all()


def test_octav_keeps_amax_for_flat_and_zero_vectors():
    x = torch.tensor([[2.0] * 16, [0.0] * 16])
    assert octav_clip(x, bits=4).tolist() == [2.0, 0.0]


def test_octav_int_scale_is_the_clip_over_qmax():
    x = torch.tensor([[0.1] * 15 + [1.0]])
    q = get_format("int").quantize(x, clip="octav", scale_format="bf16")
    expected = torch.tensor(768 / 783 / 7).to(torch.bfloat16).float()
    assert q.data["scale"].float().item() == expected.item()


def test_multiplier_grid_starts_at_one():
    m = multipliers(4, 0.4)
    assert m[0] == 1.0 and m[-1] == pytest.approx(0.4) and m == sorted(m, reverse=True)


@pytest.mark.parametrize("name", ["nvfp4", "int", "mxfp4", "fp8_e4m3", "bcq", "fgmp"])
def test_sensitivity_lowers_the_weighted_error(name, heavy):
    """With weights on a few channels, sensitivity clipping beats plain mse on the weighted error."""
    fmt = get_format(name)
    x = heavy((32, 128), 11)
    imp = torch.full((128,), 1e-3)
    imp[::9] = 10.0
    extra = {}
    if name == "bcq":
        extra["codebook"] = fmt.quantize(x).data["codebook"]

    def werr(**spec):
        y = fmt.dequantize(fmt.quantize(x, importance=imp, **extra, **spec))
        return float(((x - y).square() * imp).sum())

    assert werr(clip="sensitivity") <= werr(clip="mse") * (1 + 1e-6)
    assert werr(clip="sensitivity") <= werr() * (1 + 1e-6)


def test_mx_clip_tries_the_exponent_above():
    """amax / X in (6, 8) saturates under the OCP rule; mse may take the next exponent."""
    x = torch.tensor([[7.9, 7.8, 7.7, 7.6] * 8])
    plain = get_format("mxfp4").quantize(x)
    clipped = get_format("mxfp4").quantize(x, clip="mse")
    assert plain.data["scale"].item() == 127 and clipped.data["scale"].item() == 128
