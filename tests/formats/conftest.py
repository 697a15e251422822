"""Shared helpers of the format tests: spec cases per format, seeded tensors, SQNR."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lpc.formats import list_formats

# Every registered format with the specs its tests run (the first is the default spec).
# A new format must add itself here: test_registry checks that every format has cases.
CASES: dict[str, list[dict]] = {
    "nvfp4": [{}, {"clip": "mse"}, {"scale_search": 1}, {"rotate": True}],
    "mxfp4": [{}, {"clip": "mse"}],
    "mxfp8": [{}],
    "fp8_e4m3": [{}, {"granularity": "tensor"}, {"clip": "mse"}],
    "fp8_e5m2": [{}, {"granularity": "tensor"}],
    "int": [{}, {"bits": 8}, {"scale_format": "e4m3"}, {"scale_format": "bf16", "vector": 32},
            {"scale_bits": 4, "vector": 64}, {"clip": "octav"}, {"scale_bits": 8, "bits": 8}],
    "bcq": [{}, {"codebooks": 8}, {"clip": "mse", "clip_grid": 4}],
    "fgmp": [{}, {"high_fraction": 0.5}, {"clip": "mse", "high_fraction": 0.25}],
    "bf16": [{}],
}

# Spec-less element kind of each format: 4-bit grids and 8-bit grids get different SQNR floors.
FOUR_BIT = {"nvfp4", "mxfp4", "bcq"}

STORIES = Path(os.environ.get("LPC_ASSETS", Path(__file__).resolve().parents[3] / "shared" / "assets")
               ) / "models" / "stories260K" / "model.safetensors"


def all_cases() -> list[tuple[str, dict]]:
    """(format, spec) pairs over the registry, for pytest.mark.parametrize."""
    return [(name, spec) for name in list_formats() for spec in CASES.get(name, [{}])]


def case_id(case: tuple[str, dict]) -> str:
    name, spec = case
    return name + "".join(f"-{k}={v}" for k, v in spec.items())


def student_t(shape: tuple[int, ...], seed: int = 0, dof: float = 4.0) -> torch.Tensor:
    """Seeded heavy-tailed float32 tensor (LLM weights have such tails)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((*shape, int(dof)), generator=gen).square().sum(-1)
    return z / torch.sqrt(chi2 / dof)


def gaussian(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB (float64 sums)."""
    x64, e = x.double(), (x.double() - y.double())
    return float(10 * torch.log10(x64.square().sum() / e.square().sum().clamp_min(1e-300)))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`fmt_case` runs a test over every (format, spec) case; `fmt_name` over every format."""
    if "fmt_case" in metafunc.fixturenames:
        cases = all_cases()
        metafunc.parametrize("fmt_case", cases, ids=[case_id(c) for c in cases])
    if "fmt_name" in metafunc.fixturenames:
        metafunc.parametrize("fmt_name", list_formats())


@pytest.fixture
def sqnr():
    return sqnr_db


@pytest.fixture
def heavy():
    """student_t(shape, seed=0) -> seeded heavy-tailed tensor."""
    return student_t


@pytest.fixture
def normal():
    return gaussian


@pytest.fixture
def same_bits():
    return bitwise_equal


@pytest.fixture
def cases():
    return CASES


@pytest.fixture(scope="session")
def stories_weights() -> list[torch.Tensor]:
    """The Linear weights of the real stories260K model (skipped only when the asset is absent)."""
    if not STORIES.exists():
        pytest.skip(f"real model asset not present at {STORIES}")
    from safetensors.torch import load_file

    state = load_file(str(STORIES))
    return [t.float() for k, t in sorted(state.items())
            if t.ndim == 2 and "embed" not in k and "lm_head" not in k]
