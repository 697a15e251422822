"""The Python API: `import lpc` gives compress / load / evaluate / __version__, and `python -m lpc`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lpc

SMALL = dict(calibrate__samples=2, calibrate__seq_len=16)


def test_version_and_entry_points():
    assert lpc.__version__ and lpc.__version__[0].isdigit()
    res = subprocess.run([sys.executable, "-m", "lpc", "--version"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == f"lpc {lpc.__version__}"


def test_compress_load_evaluate_from_a_path(tmp_path, tiny_model_dir, text_files):
    summary = lpc.compress(tiny_model_dir, "nvfp4", text_files["jsonl"], tmp_path / "run", **SMALL)
    assert [s["stage"] for s in summary["stages"]] == ["calibrate", "quantize", "export"]
    assert summary["stages"][0]["samples"] == 2  # the override reached the recipe
    model, tok = lpc.load(summary["artifact"])
    ids = tok("the sun was warm", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    report = lpc.evaluate(summary["artifact"], ppl=str(text_files["jsonl"]), seq_len=16, baseline=tiny_model_dir)
    assert report["recovery"] > 0.5 and report["perplexity"][str(text_files["jsonl"])] > 1


def test_compress_an_in_memory_model(tmp_path, tiny_model_dir, text_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    summary = lpc.compress(model, "nvfp4", text_files["jsonl"], tmp_path / "run", tokenizer=tok,
                           **{"calibrate.samples": 2, "calibrate.seq_len": 16})
    assert 4.5 < summary["bits_per_weight"] < 5.0
    assert (Path(summary["artifact"]) / "tokenizer.json").is_file()


def test_bad_arguments_are_lpc_errors(tmp_path, text_files):
    from lpc.pipeline.errors import LpcError

    with pytest.raises(LpcError, match="PreTrainedModel"):
        lpc.compress(42, "fp8", text_files["jsonl"], tmp_path / "x")
    with pytest.raises(LpcError, match="unknown key"):
        lpc.compress("unused", "fp8", text_files["jsonl"], tmp_path / "x", calibrate__sampels=2)
