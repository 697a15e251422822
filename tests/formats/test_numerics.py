"""E2M1 encoding by counted comparisons gives exactly the codes of the bucketize definition."""
from __future__ import annotations

import torch

from lpc.formats.numerics import _E2M1_BOUNDS, e2m1_encode


def _reference(y: torch.Tensor) -> torch.Tensor:
    idx = torch.bucketize(y.abs().float(), _E2M1_BOUNDS, right=False).to(torch.uint8)
    return idx | (torch.signbit(y).to(torch.uint8) << 3)


def test_codes_equal_bucketize_at_every_boundary_and_special_value():
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    near = torch.cat([_E2M1_BOUNDS, torch.nextafter(_E2M1_BOUNDS, up), torch.nextafter(_E2M1_BOUNDS, down),
                      torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e30, float("inf"),
                                    float("nan"), 1e-45])])
    g = torch.Generator().manual_seed(0)
    y = torch.cat([near, -near, torch.randn(200_000, generator=g) * 4])
    assert torch.equal(e2m1_encode(y), _reference(y))
    assert int(e2m1_encode(torch.tensor([float("nan")]))) == 7  # as bucketize: NaN sorts last
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(e2m1_encode(y.to(dtype)), _reference(y.to(dtype))), dtype
