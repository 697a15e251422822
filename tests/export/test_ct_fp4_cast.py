"""lpc's CPU backend for compressed-tensors' FP4 activation rounding equals the library's own."""
from __future__ import annotations

import pytest
import torch

fp4_utils = pytest.importorskip("compressed_tensors.quantization.utils.fp4_utils")
from compressed_tensors.utils.impl_backend import ImplBackend  # noqa: E402

from lpc.pipeline.export.ct_runtime import fp4_cast_cpu, register_fast_fp4_cast  # noqa: E402

TIES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.5, 100.0]


def reference(x: torch.Tensor) -> torch.Tensor:
    return ImplBackend.call("cast_to_fp4", x.clone())  # compressed-tensors' eager fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tie_and_edge_rounds_as_compressed_tensors_does(dtype):
    near = [t + d for t in TIES for d in (-1e-3, 0.0, 1e-3)]
    x = torch.tensor(near + [-v for v in near] + [float("nan"), -0.0, 1e-30]).to(dtype)
    got = fp4_cast_cpu(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_activations_round_bit_for_bit(dtype):
    x = (torch.randn(64, 3, 4096, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    torch.testing.assert_close(fp4_cast_cpu(x), reference(x), rtol=0, atol=0)


def test_the_library_entrypoint_dispatches_cpu_tensors_to_it():
    assert register_fast_fp4_cast()
    assert fp4_cast_cpu in [fn for fn, _, _ in ImplBackend._backends["cast_to_fp4"]]
    x = torch.randn(1000) * 4
    torch.testing.assert_close(fp4_utils.cast_to_fp4(x), reference(x), rtol=0, atol=0)
