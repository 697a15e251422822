"""An lpc artifact never loads as a wrong model: with lpc imported, transformers' from_pretrained gives
lpc's logits (the registered lpc quantizer); without it, the load fails loudly (weight markers)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.recipes import load_recipe

PROMPT = "once upon a time there was a little girl who liked to play in the park"


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hf-load")
    recipe = load_recipe("nvfp4_w4a4", ["calibrate.samples=4", "calibrate.seq_len=24"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), d / "calib", recipe)
    stages.quantize(str(tiny_model_dir), recipe, d / "w4a4", calib=d / "calib")
    stages.quantize(str(tiny_model_dir), load_recipe("int4"), d / "int4")
    eora = load_recipe("nvfp4_eora", ["compensate.rank=4", "calibrate.samples=4", "calibrate.seq_len=24"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), d / "calib-eora", eora)  # its own statistics
    stages.quantize(str(tiny_model_dir), eora, d / "q-eora", calib=d / "calib-eora")
    stages.compensate(d / "q-eora", d / "calib-eora", eora, d / "eora")
    return {"w4a4": d / "w4a4", "int4": d / "int4", "eora": d / "eora"}


@pytest.mark.parametrize("kind", ["w4a4", "int4", "eora"])
def test_from_pretrained_with_lpc_imported_gives_lpc_logits(quant_dirs, kind):
    from transformers import AutoModelForCausalLM

    lpc_model, tok = load(quant_dirs[kind])
    hf_model = AutoModelForCausalLM.from_pretrained(str(quant_dirs[kind]))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, lpc_model(ids).logits)
    assert hf_model.config.quantization_config.quant_method == "lpc"


def test_from_pretrained_without_lpc_fails_loudly(quant_dirs):
    """A fresh interpreter that never imports lpc: transformers refuses instead of random weights."""
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(quant_dirs['int4'])!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, "transformers loaded an lpc artifact without lpc"
    assert "RuntimeError" in run.stderr and "mismatch" in (run.stderr + run.stdout).lower()


def test_import_lpc_first_is_enough(quant_dirs):
    """`import lpc`, then transformers: the lpc quantizer is registered when transformers is imported,
    and from_pretrained gives lpc.load's logits (a fresh interpreter, nothing else of lpc imported)."""
    code = ("import lpc, sys, torch\n"
            "assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"d = {str(quant_dirs['int4'])!r}\n"
            "hf = AutoModelForCausalLM.from_pretrained(d)\n"
            "ref, tok = lpc.load(d)\n"
            f"ids = tok({PROMPT!r}, return_tensors='pt').input_ids\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(hf(ids).logits, ref(ids).logits)\n"
            "print('same')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "same" in run.stdout, run.stderr[-2000:]
