"""Encoders (BERT): loaded with their own class (the one whose tensors the checkpoint holds), the tied MLM
decoder never quantized, Fisher from the MLM loss, fidelity (cosine of mean-pooled embeddings to the
original) instead of perplexity, a dense export holding exactly the original's tensors, and one-line
refusals where an encoder cannot go."""
from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.errors import InputError
from lpc.pipeline.io.models import load_hf_model
from lpc.recipes import load_recipe

SMALL = ["calibrate.samples=2", "calibrate.seq_len=8", "eval.seq_len=32"]
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"


def _keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())


def _tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return fh.get_tensor(key)


@pytest.mark.parametrize("family,cls", [("bert", "BertForMaskedLM"), ("bert_pretraining", "BertForPreTraining"),
                                        ("bert_encoder", "BertModel")])
def test_encoder_loads_with_the_class_its_checkpoint_holds(family, cls, family_dir):
    model = load_hf_model(family_dir(family))
    assert type(model).__name__ == cls and model.config.architectures == [cls]


@pytest.mark.parametrize("family", ["bert", "bert_pretraining"])
def test_nvfp4_leaves_tied_embeddings_and_dense_export_is_the_original_tensor_set(family, family_dir, tmp_path):
    src = family_dir(family)
    result = stages.quantize(str(src), load_recipe("nvfp4"), tmp_path / "q")
    layers = read_qconfig(tmp_path / "q")["layers"]
    model = load_hf_model(src)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layers) == linears - {"cls.predictions.decoder"}  # the decoder is the word-embedding table
    assert result.manifest["summary"]["target_params"] == sum(model.get_submodule(n).weight.numel() for n in layers)
    stages.export(tmp_path / "q", tmp_path / "dense", "dense")
    assert _keys(tmp_path / "dense") == _keys(src)  # pooler and NSP head kept when the original has them
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(_tensor(tmp_path / "dense", emb), _tensor(src, emb))
    changed = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(_tensor(tmp_path / "dense", changed), _tensor(src, changed))


@pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_compressed_tensors_export_of_bert_loads_with_lpc_logits(recipe, family_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    stages.quantize(str(family_dir("bert")), load_recipe(recipe), tmp_path / "q")
    stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    lpc_model, tok = load(tmp_path / "q", dtype=torch.float32)
    if recipe == "nvfp4":  # compressed-tensors decompresses NVFP4 in bf16
        for name in read_qconfig(tmp_path / "q")["layers"]:
            w = lpc_model.get_submodule(name).weight
            w.data = w.data.to(torch.bfloat16).float()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    hf = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    with torch.no_grad():
        got, want = hf(ids).logits, lpc_model(ids).logits
    # one bf16 step on a few NVFP4 weights at most (CT divides by 1/s2 where lpc multiplies by s2)
    assert (got - want).abs().max() <= (0.0 if recipe == "fp8" else 0.01 * want.abs().max())


def test_fgmp_compress_uses_the_mlm_fisher_and_reports_fidelity(family_dir, text_files, tmp_path):
    src = family_dir("bert")
    recipe = load_recipe("fgmp_nvfp4a16", SMALL + ["quantize.method=rtn"])
    stages.compress(str(src), recipe, str(text_files["jsonl"]), tmp_path / "out", ppl=[str(text_files["jsonl"])])
    calib = tmp_path / "out" / "stages" / "calib"
    with safe_open(str(calib / "stats.safetensors"), framework="pt") as fh:
        fisher = fh.get_tensor("bert.encoder.layer.0.attention.self.query.weight_fisher")
    assert torch.isfinite(fisher).all() and fisher.sum() > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    fid = summary["eval"]["fidelity"][str(text_files["jsonl"])]
    assert 0.9 < fid <= 1.0 + 1e-6 and summary["eval"]["recovery"] == fid and summary["eval"]["perplexity"] == {}
    layers = read_qconfig(tmp_path / "out" / "stages" / "quant")["layers"]
    assert {m["format"] for m in layers.values()} == {"fgmp"} and "cls.predictions.decoder" not in layers


def test_fidelity_is_one_for_the_original_and_needs_a_baseline(family_dir, text_files, tmp_path):
    from lpc.pipeline.stages.evaluate import evaluate_report

    src = family_dir("bert")
    same = evaluate_report(str(src), baseline=str(src), ppl=[str(text_files["txt"])], seq_len=16)
    assert abs(same["recovery"] - 1.0) < 1e-6 and same["details"][str(text_files["txt"])]["windows"] > 1
    with pytest.raises(InputError, match="is an encoder: it has no perplexity"):
        evaluate_report(str(src), ppl=[str(text_files["txt"])])
    with pytest.raises(InputError, match="lm-eval tasks score a causal LM"):
        evaluate_report(str(src), baseline=str(src), ppl=[str(text_files["txt"])], tasks=["arc_easy"])


def test_fisher_of_an_encoder_without_head_is_refused(family_dir, text_files, tmp_path):
    recipe = load_recipe("fgmp_nvfp4a16", SMALL)
    with pytest.raises(InputError, match="has no masked-LM head"):
        stages.calibrate(str(family_dir("bert_encoder")), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    assert not (tmp_path / "calib").exists()


# every built-in recipe on BERT (the README's family table): works with a fidelity > 0.9, or a one-line refusal
ENCODER_RECIPES = {
    "nvfp4": None, "nvfp4_w4a4": None, "nvfp4_eora": None, "fp8": None, "int4": None, "mxfp4": None,
    "mxfp8": None, "bcq": None, "fgmp_nvfp4": None, "fgmp_nvfp4a16": None, "vapr": None,
    "kv_fp8": "is an encoder: it keeps no KV cache", "kv_nvfp4": "is an encoder: it keeps no KV cache",
}
RECIPE_SETS = {"fgmp_nvfp4": ["quantize.method=rtn"], "fgmp_nvfp4a16": ["quantize.method=rtn"],
               "nvfp4_eora": ["compensate.rank=4"], "vapr": ["allocate.refine=false", "allocate.pareto_budgets=[]"]}


@pytest.mark.parametrize("recipe", sorted(ENCODER_RECIPES))
def test_every_recipe_on_bert(recipe, family_dir, text_files, tmp_path):
    from lpc.pipeline.errors import LpcError

    r = load_recipe(recipe, SMALL + RECIPE_SETS.get(recipe, []))
    refusal = ENCODER_RECIPES[recipe]
    try:
        stages.compress(str(family_dir("bert")), r, str(text_files["jsonl"]), tmp_path / "out",
                        ppl=[str(text_files["jsonl"])])
    except LpcError as e:
        assert refusal is not None and re.search(refusal, str(e)) and "\n" not in str(e), str(e)
        assert not (tmp_path / "out" / "model").exists()
        return
    assert refusal is None, f"expected a refusal matching {refusal!r}"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert 0.9 < summary["eval"]["fidelity"][str(text_files["jsonl"])] <= 1.0 + 1e-6
    layers = read_qconfig(tmp_path / "out" / "stages" / "quant")["layers"]
    assert layers and "cls.predictions.decoder" not in layers
    final = tmp_path / "out" / "stages" / ("comp" if r.compensate is not None else "quant")
    for fmt in ("lpc", "dense", "compressed-tensors", "modelopt", "peft"):
        _check_encoder_export(recipe, final, tmp_path / fmt, fmt)


def _mlm_logits(model) -> torch.Tensor:
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits.float()


def _check_encoder_export(recipe: str, quant: Path, out: Path, fmt: str) -> None:
    """One export of a BERT artifact: loads with lpc's masked-LM logits (modelopt: reads back to lpc's
    weights), or a one-line refusal the decoder families give too (test_recipe_matrix.NO_ENGINE)."""
    from transformers import AutoModelForMaskedLM

    from families.test_recipe_matrix import NO_ENGINE, VAPR_REFUSAL, _check_modelopt, _near
    from lpc.pipeline.errors import LpcError

    if fmt == "peft" and recipe != "nvfp4_eora":
        return
    try:
        stages.export(quant, out, fmt)
    except LpcError as e:
        allowed = NO_ENGINE.get(recipe, {}).get(fmt) or (VAPR_REFUSAL if recipe == "vapr" else None)
        assert allowed and re.search(allowed, str(e)) and "\n" not in str(e), (fmt, str(e))
        return
    if fmt == "modelopt":
        _check_modelopt(quant, out)
        return
    rounded = fmt == "compressed-tensors"  # NVFP4/MX decompressed in bf16
    ref = load(quant, dtype=torch.float32, activations=fmt != "dense", merge_lowrank=fmt == "dense")[0]
    if rounded:
        for name, meta in read_qconfig(quant)["layers"].items():
            if meta["format"] in ("nvfp4", "mxfp4", "mxfp8"):
                w = ref.get_submodule(name).weight
                w.data.copy_(w.data.to(torch.bfloat16).float())
    if fmt == "peft":
        from peft import PeftModel

        got = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(str(out), dtype=torch.float32),
                                        out / "adapter").eval()
    elif fmt == "compressed-tensors":
        got = load(out, dtype=torch.float32)[0]
    else:
        got = AutoModelForMaskedLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tol = 0.02 if read_qconfig(quant).get("activations") else 0.01
    _near(_mlm_logits(got), _mlm_logits(ref), f"{recipe} {fmt}", tol)
