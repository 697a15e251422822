"""Random Hadamard rotation: orthogonal, seeded, recorded in the spec, undone on dequantize."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import get_format
from lpc.formats import rotation


def test_hadamard_is_orthonormal():
    h = rotation.hadamard()
    torch.testing.assert_close(h @ h.T, torch.eye(16), atol=1e-6, rtol=0)


def test_rotate_unrotate_identity(heavy):
    x = heavy((3, 5, 37), 1)
    y = rotation.rotate(x, seed=7)
    assert y.shape == (3, 5, 48)
    torch.testing.assert_close(rotation.unrotate(y, 7, 37), x, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(rotation.unrotate(y, 8, 37), x)  # another seed, another rotation


def test_signs_are_seeded():
    assert torch.equal(rotation.signs(3), rotation.signs(3))
    assert not torch.equal(rotation.signs(3), rotation.signs(4))
    assert set(rotation.signs(3).tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("name, spec", [("int", {"bits": 8, "scale_bits": 8}), ("fp8_e4m3", {}),
                                        ("mxfp8", {}), ("bf16", {})])
def test_fine_format_with_rotation_is_near_identity(name, spec, heavy, sqnr):
    x = heavy((8, 40), 2)
    fmt = get_format(name)
    if name == "bf16":  # bf16 has no rotate field: it must say so
        with pytest.raises(Exception, match="unknown key 'rotate'"):
            fmt.quantize(x, rotate=True)
        return
    q = fmt.quantize(x, rotate=True, rotate_seed=5, **spec)
    assert q.spec["rotate"] is True and q.spec["rotate_seed"] == 5 and q.shape == (8, 40)
    y = fmt.dequantize(q)
    assert y.shape == x.shape
    assert sqnr(x, y) > 28


def test_rotation_spreads_an_outlier(sqnr):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    x[:, 5] = 8.0  # one huge channel per block of 16
    plain = sqnr(x, get_format("int").fake_quantize(x, scale_format="bf16"))
    rotated = sqnr(x, get_format("int").fake_quantize(x, scale_format="bf16", rotate=True))
    assert rotated != plain
    y = get_format("nvfp4").dequantize(get_format("nvfp4").quantize(x, rotate=True))
    assert torch.isfinite(y).all()


def test_importance_is_averaged_per_block():
    imp = torch.arange(32, dtype=torch.float32)
    out = rotation.block_mean(imp, (2, 32))
    assert out[:16].unique().tolist() == [7.5] and out[16:].unique().tolist() == [23.5]
