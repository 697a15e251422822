"""Data-free rounding (no statistics read) calibrates nothing: no forward pass, no data file read,
and the quantized weights equal those quantized with a real calibration."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lpc.pipeline.artifact.store import read_manifest
from lpc.pipeline.calibration.stats import needs_statistics
from lpc.pipeline.stages.calibrate import calibrate
from lpc.pipeline.stages.quantize import quantize
from lpc.recipes import load_recipe


@pytest.mark.parametrize("recipe, sets, free", [
    ("nvfp4", ["quantize.weights.spec.scale_search=0"], True),
    ("nvfp4", [], False),                                              # scale search weighs by E[x^2]
    ("nvfp4", ["quantize.weights.spec.scale_search=2", "quantize.importance=none"], True),
    ("fp8", [], True),
    ("fp8", ["quantize.weights.spec.clip=sensitivity"], False),
    ("nvfp4", ["quantize.weights.spec.scale_search=0", "quantize.method=gptq"], False),
    ("fgmp_nvfp4", [], False),
])
def test_which_recipes_need_statistics(recipe, sets, free):
    assert needs_statistics(load_recipe(recipe, sets)) is (not free)


def _weights(d):
    with safe_open(str(d / "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_data_free_calibration_runs_no_forward(tiny_model_dir, text_files, tmp_path, monkeypatch):
    import importlib

    cal = importlib.import_module("lpc.pipeline.stages.calibrate")
    free = load_recipe("nvfp4", ["quantize.weights.spec.scale_search=0"])
    monkeypatch.setattr(cal, "collect_input_stats", lambda *a, **k: pytest.fail("a forward pass ran"))
    missing = tmp_path / "no-such-data.txt"  # no data is read
    calibrate(str(tiny_model_dir), str(missing), tmp_path / "c0", free)
    assert read_manifest(tmp_path / "c0", "calibrate")["summary"]["samples"] == 0
    monkeypatch.undo()
    calibrate(str(tiny_model_dir), str(text_files["txt"]), tmp_path / "c1", load_recipe("nvfp4"))  # real statistics
    assert read_manifest(tmp_path / "c1", "calibrate")["summary"]["samples"] > 0
    q0 = quantize(str(tiny_model_dir), free, tmp_path / "q0", calib=tmp_path / "c0").out
    q1 = quantize(str(tiny_model_dir), free, tmp_path / "q1", calib=tmp_path / "c1").out
    a, b = _weights(q0), _weights(q1)
    assert a.keys() == b.keys() and any(k.endswith(".qdata") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
