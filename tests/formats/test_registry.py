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
