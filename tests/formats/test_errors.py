"""Tier 4: bad specs, bad tensors and bad context raise FormatError saying what and how."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import FormatError, LpcError, get_format
from lpc.formats.codebooks import fit_codebooks


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(LpcError, match=r"unknown format 'nvfp5'.*known formats: .*bcq.*fgmp.*int.*mxfp4.*nvfp4"):
        get_format("nvfp5")


def test_names_are_normalized():
    assert get_format("FP8-E4M3") is get_format("fp8_e4m3")


def test_unknown_spec_key_names_the_valid_keys(fmt_name):
    with pytest.raises(FormatError, match=rf"bad {fmt_name} spec: unknown key 'blok'.*valid keys"):
        get_format(fmt_name).quantize(torch.ones(2, 16), blok=16)


@pytest.mark.parametrize("name, spec, match", [
    ("int", {"bits": 3}, r"bits=3"),
    ("int", {"vector": 8}, r"vector=8"),
    ("int", {"scale_format": "fp16"}, r"scale_format='fp16'"),
    ("bcq", {"codebooks": 4}, r"codebooks=4"),
    ("nvfp4", {"scale_search": -1}, r"scale_search=-1"),
    ("nvfp4", {"clip": "percentile"}, r"clip='percentile'"),
    ("mxfp4", {"clip_min": 1.5}, r"clip_min=1.5"),
    ("fgmp", {"high_fraction": 2}, r"high_fraction=2"),
    ("fp8_e4m3", {"granularity": "row"}, r"granularity='row'"),
])
def test_bad_spec_values(name, spec, match):
    with pytest.raises(FormatError, match=match):
        get_format(name).spec(**spec)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "mxfp8", "fp8_e4m3", "fp8_e5m2", "bcq", "fgmp"])
def test_octav_is_refused_for_non_integer_grids(name):
    with pytest.raises(FormatError, match=rf"{name} does not support clip='octav' \(OCTAV assumes a uniform "
                                          r"integer grid.*use clip in"):
        get_format(name).spec(clip="octav")


def test_sensitivity_needs_importance():
    with pytest.raises(FormatError, match=r"clip='sensitivity' needs importance=.*or use clip='mse'"):
        get_format("int").quantize(torch.ones(2, 16), clip="sensitivity")


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1.0, float("nan")]]), r"NaN or inf"),
    (torch.tensor([[1.0, float("inf")]]), r"NaN or inf"),
    (torch.tensor([[-float("inf"), 1.0]]), r"NaN or inf"),
    (torch.ones(2, 16, dtype=torch.int32), r"floating-point tensors, got torch.int32"),
    (torch.ones(0, 16), r"cannot quantize a tensor of shape \(0, 16\)"),
    (torch.ones(4, 0), r"cannot quantize a tensor of shape \(4, 0\)"),
    (torch.tensor(1.0), r"cannot quantize a tensor of shape \(\)"),
    ([1.0, 2.0], r"floating-point tensors, got <class 'list'>"),
])
def test_bad_tensors(fmt_name, bad, match):
    with pytest.raises(FormatError, match=match):
        get_format(fmt_name).quantize(bad)


@pytest.mark.parametrize("imp, match", [
    (torch.ones(7), r"importance of shape \(7,\) does not fit a tensor of shape \(2, 16\).*give \(16,\)"),
    (-torch.ones(16), r"negative, NaN or inf"),
])
def test_bad_importance(imp, match):
    with pytest.raises(FormatError, match=match):
        get_format("nvfp4").quantize(torch.ones(2, 16), scale_search=1, importance=imp)


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 1), r"mask must be a bool tensor, got torch.float32"),
    (torch.ones(3, 1, dtype=torch.bool), r"mask of shape \(3, 1\) does not fit 2 rows of 1 blocks.*\(2, 1\)"),
])
def test_bad_fgmp_mask(mask, match):
    with pytest.raises(FormatError, match=match):
        get_format("fgmp").quantize(torch.ones(2, 16), mask=mask)


@pytest.mark.parametrize("book, match", [
    (torch.zeros(16, 16), r"codebook must be an integer tensor, got torch.float32"),
    (torch.zeros(8, 16, dtype=torch.int8), r"codebook of shape \(8, 16\) does not match codebooks=16.*codebooks=8"),
    (torch.full((16, 16), 40, dtype=torch.int16), r"entries span \[40, 40\].*INT6 entries lie in \[-32, 31\]"),
])
def test_bad_bcq_codebook(book, match):
    with pytest.raises(FormatError, match=match):
        get_format("bcq").quantize(torch.ones(2, 64), codebook=book)


def test_fit_codebooks_bad_input():
    with pytest.raises(FormatError, match=r"codebooks=12 is not supported.*use 8 or 16"):
        fit_codebooks([torch.ones(4, 64)], codebooks=12)
    with pytest.raises(FormatError, match=r"got no tensors"):
        fit_codebooks([])


def test_unpack_reports_missing_fields():
    fmt = get_format("bcq")
    q = fmt.quantize(torch.randn(2, 64))
    tensors = fmt.pack(q)
    del tensors["codebook"]
    with pytest.raises(FormatError, match=r"missing fields \['codebook'\].*re-run the stage"):
        fmt.unpack(tensors, q.meta())
