"""The registry: every format is covered by the tests, describes itself, and counts its bits."""
from __future__ import annotations

import json

import pytest
import torch

from lpc.formats import get_format, list_formats

EXPECTED = {"nvfp4", "mxfp4", "mxfp8", "fp8_e4m3", "fp8_e5m2", "int", "bcq", "fgmp"}
# Fields beyond the per-element stream and per-block scales: a large tensor amortizes them.
FIXED_BITS = {"nvfp4": 32, "fgmp": 32, "bcq": 32 + 16 * 16 * 8, "fp8_e4m3": 32, "fp8_e5m2": 32}


def test_every_mission_format_is_registered(cases):
    assert EXPECTED <= set(list_formats())
    assert set(list_formats()) <= set(cases), "add the new format's specs to conftest.CASES"


def test_format_describes_itself(fmt_name):
    fmt = get_format(fmt_name)
    assert fmt.name == fmt_name and fmt.description


def test_meta_is_json(fmt_case, heavy):
    name, spec = fmt_case
    q = get_format(name).quantize(heavy((4, 64)), **spec)
    meta = json.loads(json.dumps(q.meta()))
    assert meta["format"] == name and meta["shape"] == [4, 64]


@pytest.mark.parametrize("name, spec", [
    ("nvfp4", {}), ("mxfp4", {}), ("mxfp8", {}), ("fp8_e4m3", {"granularity": "tensor"}),
    ("fp8_e5m2", {"granularity": "tensor"}), ("int", {"scale_format": "bf16"}), ("int", {"bits": 8}),
    ("int", {"scale_bits": 4}), ("bcq", {}), ("bcq", {"codebooks": 8}), ("fgmp", {"high_fraction": 0.0}),
])
def test_nominal_bits_match_stored_bits(name, spec, heavy):
    """On a (256, 1024) tensor the stored bits equal the nominal bits plus the fixed fields."""
    fmt = get_format(name)
    x = heavy((256, 1024), 1)
    q = fmt.quantize(x, **spec)
    fixed = FIXED_BITS.get(name, 0)
    if name == "bcq":
        fixed = 32 + q.data["codebook"].numel() * 8
    if name == "int":
        fixed = {"two_level": 32 * 256, "e4m3": 32, "bf16": 0}[q.spec["scale_format"]]
    assert q.bits_per_weight() == pytest.approx(fmt.bits_per_weight(**spec) + fixed / x.numel(), abs=1e-12)


def test_int4_packs_two_per_byte():
    q = get_format("int").quantize(torch.randn(4, 64))
    assert q.data["qdata"].dtype == torch.uint8 and q.data["qdata"].shape == (4, 32)


WIDTH = {"nvfp4": 16, "fgmp": 16, "mxfp4": 32, "mxfp8": 32, "bcq": 64}


def test_block_width_is_where_scales_change(fmt_case, heavy):
    """Over the registry: a block format names its scale-block width along the input dimension
    (None for per-channel/per-tensor scales); with its pinned context, changing values inside the
    first block leaves every other block as it was, and the first block is changed."""
    name, spec = fmt_case
    fmt = get_format(name)
    width = fmt.block_width(**spec)
    if width is None:
        assert name in {"fp8_e4m3", "fp8_e5m2", "bf16"}
        return
    assert width == (spec.get("vector", 16) if name == "int" else WIDTH[name])
    x = heavy((6, 3 * 64))
    ctx = fmt.pinned_context(x, spec, {})
    y = x.clone()
    y[:, : width // 2] *= 3.0
    a = fmt.dequantize(fmt.quantize(x, **spec, **ctx))
    b = fmt.dequantize(fmt.quantize(y, **spec, **ctx))
    assert torch.equal(a[:, width:], b[:, width:])
    assert not torch.equal(a[:, :width], b[:, :width])


def test_stored_bits_counts_tensors_and_qtensors(fmt_case, heavy):
    from lpc.formats import FormatError, stored_bits

    name, spec = fmt_case
    q = get_format(name).quantize(heavy((8, 40)), **spec)
    fields = sum(t.numel() * t.element_size() * 8 for t in q.data.values())
    assert stored_bits(q) == q.storage_bits() == fields == stored_bits(*q.data.values())
    assert stored_bits(q, torch.zeros(3, 5, dtype=torch.bfloat16)) == fields + 15 * 16
    assert stored_bits() == 0
    with pytest.raises(FormatError, match="tensors and QTensors"):
        stored_bits([1, 2])
