"""Tier 3: SQNR floors on random data, and the orderings the formats exist for."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import get_format
from lpc.formats.codebooks import fit_codebooks


def floor_db(bits: float) -> float:
    """4-bit grids >= 15 dB (NVFP4 values are ~20 dB), 8-bit >= 24 dB, bf16 >= 50 dB."""
    return 50.0 if bits >= 16 else 24.0 if bits >= 8 else 20.0 if bits >= 5 else 15.0


@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_sqnr_floor(fmt_case, dist, normal, heavy, sqnr):
    name, spec = fmt_case
    fmt = get_format(name)
    x = (normal if dist == "normal" else heavy)((64, 512), 5)
    got = sqnr(x, fmt.dequantize(fmt.quantize(x, **spec)))
    assert got >= floor_db(fmt.bits_per_weight(**spec)), f"{name} {spec}: {got:.2f} dB"


def _db(name, x, sqnr, **spec):
    fmt = get_format(name)
    return sqnr(x, fmt.dequantize(fmt.quantize(x, **spec)))


@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_format_orderings(dist, normal, heavy, sqnr):
    x = (normal if dist == "normal" else heavy)((128, 512), 6)
    nv = _db("nvfp4", x, sqnr)
    assert nv > _db("mxfp4", x, sqnr) + 0.5
    assert _db("bcq", x, sqnr) > nv + 1.0
    assert _db("int", x, sqnr, clip="octav") > _db("int", x, sqnr)
    assert _db("fgmp", x, sqnr, high_fraction=0.25) > nv + 1.0
    assert _db("mxfp8", x, sqnr) > _db("fp8_e5m2", x, sqnr)


@pytest.mark.parametrize("name, spec", [
    ("nvfp4", {}), ("mxfp4", {}), ("fp8_e4m3", {}), ("fp8_e4m3", {"granularity": "tensor"}),
    ("int", {}), ("int", {"scale_format": "e4m3"}), ("bcq", {"clip_grid": 4}), ("fgmp", {}),
])
def test_mse_clip_never_worse_than_amax(name, spec, heavy):
    """mse tries the amax scale too and keeps the best per block, so no block gets worse."""
    fmt = get_format(name)
    x = heavy((32, 256), 7)
    if name == "bcq":
        spec = {**spec, "codebook": fmt.quantize(x).data["codebook"]}
    err_none = (x - fmt.dequantize(fmt.quantize(x, **spec))).square().sum()
    err_mse = (x - fmt.dequantize(fmt.quantize(x, clip="mse", **spec))).square().sum()
    assert err_mse <= err_none * (1 + 1e-6)


def test_real_model_orderings(stories_weights, sqnr):
    """On every Linear weight of stories260K together: bcq (model-wide codebook) beats NVFP4 by
    >= 1 dB, NVFP4 beats MXFP4, OCTAV int4 beats amax int4."""
    flat = torch.cat([w.reshape(-1) for w in stories_weights])

    def total(name, **spec):
        fmt = get_format(name)
        return sqnr(flat, torch.cat([fmt.dequantize(fmt.quantize(w, **spec)).reshape(-1) for w in stories_weights]))

    book = fit_codebooks(stories_weights).codebook
    nv = total("nvfp4")
    assert total("bcq", codebook=book) >= nv + 1.0
    assert nv > total("mxfp4")
    assert total("int", clip="octav") > total("int")
