"""Edges of family support: GPTQ never zeroes weights whose calibrated inputs are all zero, encoder-decoder
models are refused with one line (exit code 1, nothing written), `--calib` pointing at
nothing is a one-line input error, and Conv1D layers round-trip through state dicts in GPT-2's layout."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lpc.formats import get_format
from lpc.pipeline.errors import InputError
from lpc.pipeline.io.families import TransposedLinear, linearize
from lpc.pipeline.io.models import resolve_model
from lpc.pipeline.quantization.gptq import gptq_quantize


def _cli(*args: object):
    from lpc.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_gptq_on_a_layer_that_saw_no_input_is_plain_rounding_not_zero():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    fmt = get_format("nvfp4")
    ctx = fmt.pinned_context(w, {}, {})
    q = gptq_quantize(w, torch.zeros(64, 64), "nvfp4", {}, dict(ctx))
    got = fmt.dequantize(q)
    assert torch.equal(got, fmt.dequantize(fmt.quantize(w, **ctx)))
    assert got.abs().sum() > 0.5 * w.abs().sum()


def test_gptq_keeps_the_weights_of_dead_input_channels():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0.0  # an input channel that never fires
    q = gptq_quantize(w, x.T @ x / x.shape[0], "nvfp4", {}, {})
    got = get_format("nvfp4").dequantize(q)
    assert torch.isfinite(got).all()
    col = got[:, 5]
    assert (col != 0).sum() >= 12 and torch.nn.functional.cosine_similarity(col, w[:, 5], dim=0) > 0.9


def test_encoder_decoder_models_are_refused_in_one_line(family_dir, tmp_path):
    src = family_dir("t5")
    with pytest.raises(InputError, match="is an encoder-decoder model \\(t5\\)"):
        resolve_model(src)
    res = _cli("quantize", src, "--recipe", "nvfp4", "-o", tmp_path / "q")
    assert res.exit_code == 1 and "decoder-only causal language models and encoders" in res.output
    assert len(res.output.strip().splitlines()) <= 2 and "Traceback" not in res.output
    assert not (tmp_path / "q").exists()


def test_quantize_with_a_missing_calibration_is_one_line(family_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _cli("quantize", family_dir("llama"), "--recipe", "nvfp4", "--calib", "missing/", "-o", tmp_path / "q")
    assert res.exit_code == 1, res.output
    assert "missing is not a directory" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "q").exists()


def test_conv1d_becomes_a_linear_with_gpt2_state_dict_layout(family_dir):
    from transformers import AutoModelForCausalLM

    src = family_dir("gpt2")
    native = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        want = native(ids).logits
    before = {k: v.clone() for k, v in native.state_dict().items()}
    names = linearize(native)
    assert names and all(isinstance(native.get_submodule(n), TransposedLinear) for n in names)
    conv = before[f"{names[0]}.weight"]
    assert tuple(native.get_submodule(names[0]).weight.shape) == tuple(conv.shape[::-1])
    after = native.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.allclose(native(ids).logits, want, atol=1e-5)
    native.load_state_dict(before)
    assert torch.equal(native.get_submodule(names[0]).weight, conv.t())
    assert json.loads((src / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.parametrize("family,groups", [("llama", [["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]]),
                                           ("opt", [["k_proj", "q_proj", "v_proj"]]),  # fc1 -> fc2: not siblings
                                           ("phi3", []), ("gpt2", [])])  # fused already: one Linear each
def test_fuse_groups_come_from_shared_inputs_not_names(family, groups, family_dir):
    from lpc.pipeline.io.families import derive_fuse_groups
    from lpc.pipeline.io.models import find_targets, load_hf_model

    model = load_hf_model(family_dir(family))
    assert derive_fuse_groups(model, find_targets(model, ["*"], ["lm_head"])) == groups



def test_from_pretrained_of_lpc_artifacts_gpt2_exact_moe_refused_loudly(family_dir, tmp_path):
    """With lpc imported, transformers loads a GPT-2 lpc artifact (Conv1D layers) with lpc's logits; an MoE
    artifact (per-expert tensors) is refused with an error, never loaded with wrong experts."""
    from transformers import AutoModelForCausalLM

    from lpc.pipeline import stages
    from lpc.pipeline.artifact.load import load
    from lpc.recipes import load_recipe

    stages.quantize(str(family_dir("gpt2")), load_recipe("nvfp4"), tmp_path / "gpt2")
    lpc_model, tok = load(tmp_path / "gpt2")
    ids = tok("once upon a time there was a little girl", return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2"))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, lpc_model(ids).logits)
    stages.quantize(str(family_dir("qwen2_moe")), load_recipe("nvfp4"), tmp_path / "moe")
    with pytest.raises(RuntimeError, match="mismatch|size"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"))
