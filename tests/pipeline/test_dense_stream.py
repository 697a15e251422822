"""`--format dense` written one layer at a time equals the dense model saved from the loaded artifact."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from lpc.pipeline import stages
from lpc.pipeline.artifact.shards import ModelTensors
from lpc.recipes import load_recipe

dense = importlib.import_module("lpc.pipeline.export.dense")


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8", "int4"])
def test_streamed_dense_equals_loaded_model(tmp_path, tiny_model_dir, monkeypatch, recipe):
    stages.quantize(str(tiny_model_dir), load_recipe(recipe), tmp_path / "q")
    calls = []
    write = dense._write_streamed
    monkeypatch.setattr(dense, "_write_streamed", lambda *a: (calls.append(1), write(*a)))
    stages.export(tmp_path / "q", tmp_path / "s", "dense")
    assert calls  # the streamed writer ran
    monkeypatch.setattr(dense, "_streamable", lambda q: False)
    stages.export(tmp_path / "q", tmp_path / "w", "dense")
    a, b = ModelTensors(tmp_path / "s"), ModelTensors(tmp_path / "w")
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        ta, tb = a.get(k), b.get(k)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "s", tmp_path / "w"))
    assert {k: v for k, v in ca.items() if k != "transformers_version"} == \
        {k: v for k, v in cb.items() if k != "transformers_version"}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(p.name for p in (tmp_path / "w").iterdir())
