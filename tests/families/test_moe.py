"""MoE models whose experts transformers 5 stores as fused 3-D parameters (Mixtral, Qwen2-MoE, Qwen3-MoE):
every expert matrix is quantized as its own tensor and counted in bits per weight, routers and gates stay
in high precision, lpc's artifact loads with the logits of the original model carrying the artifact's
expert weights, experts no calibration token reached get stand-in statistics (never zeroed by GPTQ),
modelopt exports are refused with a one-line reason (compressed-tensors: test_moe_engine.py), and a layout lpc does not reach is warned about."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from families.zoo import MOE, build_family
from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.io.experts import expert_names
from lpc.pipeline.io.families import routers
from lpc.pipeline.io.models import find_targets, load_hf_model
from lpc.recipes import load_recipe

PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"
SMALL = ["calibrate.samples=2", "calibrate.seq_len=8"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _native(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _sqnr(w: torch.Tensor, wq: torch.Tensor) -> float:
    return 10 * torch.log10(w.square().sum() / (w - wq).square().sum()).item()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, family_dir):
    out = {}
    for family in MOE:
        q = tmp_path_factory.mktemp(f"moe-{family}") / "q"
        result = stages.quantize(str(family_dir(family)), load_recipe("nvfp4"), q)
        out[family] = (q, result.manifest["summary"])
    return out


@pytest.mark.parametrize("family", MOE)
def test_every_expert_is_quantized_and_counted_routers_stay(family, family_dir, quantized):
    src = family_dir(family)
    q, summary = quantized[family]
    model = load_hf_model(src)
    layers = read_qconfig(q)["layers"]
    experts = expert_names(model)
    assert len(experts) == 2 * 4 * 2  # 2 layers x 4 experts x (gate_up_proj, down_proj)
    assert set(experts) <= set(layers)
    assert not set(routers(model)) & set(layers)
    assert all(n.startswith("lm_head") is False for n in layers)
    # bits per weight over every matrix but embeddings, head and routers: the experts are nearly all of it
    matrices = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n in layers)
    assert summary["target_params"] == matrices and summary["quantized_layers"] == summary["target_layers"]
    assert 4.5 <= summary["bits_per_weight"] < 4.6


@pytest.mark.parametrize("family", MOE)
def test_lpc_logits_are_the_original_model_with_the_artifacts_expert_weights(family, family_dir, quantized):
    """The reference is transformers' own fused model, each expert slice set to the artifact's dequantized
    matrix: lpc's load puts expert e's tensor back at index e of the fused parameters."""
    src = family_dir(family)
    q, _ = quantized[family]
    qtensors, _ = read_qtensors(q, read_qconfig(q))
    ref = _native(src)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for name, qt in qtensors.items():
            deq = get_format(qt.format).dequantize(qt).to(torch.float32)
            block, _, leaf = name.rpartition(".")
            owner, _, index = block.rpartition(".")
            if owner.endswith(".experts") and index.isdigit():
                fused = ref.get_submodule(owner)
                getattr(fused, leaf)[int(index)] = deq
                assert _sqnr(original[f"{owner}.{leaf}"][int(index)], deq) > 15
            else:
                ref.get_submodule(name).weight.copy_(deq)
    lpc_model, tok = load(q)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    want = _logits(ref, ids)
    assert torch.equal(_logits(lpc_model, ids), want)
    assert not torch.equal(_logits(_native(src), ids), want)  # the experts did change


@pytest.mark.parametrize("family", MOE)
def test_modelopt_refused_dense_export_loads(family, quantized, tmp_path):
    """(compressed-tensors exports of the experts: test_moe_engine.py)"""
    q, _ = quantized[family]
    with pytest.raises(ArtifactError, match="MoE experts.*only in compressed-tensors"):
        stages.export(q, tmp_path / "modelopt", "modelopt")
    auto = stages.export(q, tmp_path / "auto", "auto")
    assert auto.manifest["summary"]["format"] == "compressed-tensors"  # the experts have an engine form now
    stages.export(q, tmp_path / "dense", "dense")
    lpc_model, tok = load(q)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(_logits(_native(tmp_path / "dense"), ids), _logits(lpc_model, ids))


def _two_idle_experts(model) -> None:
    """Top-1 routing over router rows (v, -v, 0, 0): experts 2 and 3 never win (max(x.v, -x.v) > 0)."""
    gen = torch.Generator().manual_seed(0)  # independent of the tests that ran before
    for layer in model.model.layers:
        w = layer.mlp.gate.weight
        v = torch.randn(w.shape[1], generator=gen)
        w.zero_()
        w[0], w[1] = v, -v


def test_idle_experts_get_stand_in_statistics_and_gptq_keeps_them(tmp_path, text_files, tokenizer_builder):
    src = build_family(tmp_path / "model", "mixtral", tokenizer_builder, edit=_two_idle_experts, num_experts_per_tok=1)
    recipe = load_recipe("nvfp4", SMALL + ["quantize.method=gptq"])
    calib = stages.calibrate(str(src), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    idle = sorted(calib.manifest["summary"]["experts_without_tokens"])
    assert idle == sorted(f"model.layers.{i}.mlp.experts.{e}.{m}" for i in range(2) for e in (2, 3)
                          for m in ("gate_up_proj", "down_proj"))
    assert all(calib.manifest["layers"][n]["rows"] == 0 for n in idle)
    assert all(calib.manifest["layers"][n.replace(".2.", ".0.")]["rows"] > 0 for n in idle if ".2." in n)
    stages.quantize(str(src), recipe, tmp_path / "q", calib=tmp_path / "calib")
    qtensors, _ = read_qtensors(tmp_path / "q", read_qconfig(tmp_path / "q"))  # refuses NaN / zero scales
    model = load_hf_model(src)
    for name in idle:
        w = model.get_submodule(name).weight.float()
        deq = get_format("nvfp4").dequantize(qtensors[name])
        assert torch.isfinite(deq).all() and (qtensors[name].data["scale"].float() > 0).all()
        assert _sqnr(w, deq) > 15, name


def test_routers_are_quantized_only_when_named(family_dir):
    model = load_hf_model(family_dir("qwen2_moe"))
    gates = [n for n in routers(model) if n.endswith("shared_expert_gate")]
    assert gates and not set(gates) & set(find_targets(model, ["*"], ["lm_head"]))
    assert set(gates) <= set(find_targets(model, ["*", "shared_expert_gate"], ["lm_head"]))


def test_unreached_layout_is_warned_with_its_share(caplog):
    class Odd(nn.Module):
        """A Linear next to a matrix held as a bare parameter (a layout lpc does not know)."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32, bias=False)
            self.table = nn.Parameter(torch.zeros(32, 96))

    with caplog.at_level(logging.WARNING, logger="lpc.pipeline.io.families"):
        found = find_targets(Odd(), ["*"], [])
    assert list(found) == ["proj"]
    assert "75.0% of the model's matrix parameters" in caplog.text and "table" in caplog.text


@pytest.mark.parametrize("family", MOE)
def test_fgmp_and_fp8_reach_every_expert(family, family_dir, text_files, tmp_path):
    src = family_dir(family)
    recipe = load_recipe("fgmp_nvfp4a16", SMALL + ["quantize.method=rtn"])
    stages.calibrate(str(src), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    stages.allocate(tmp_path / "calib", recipe, tmp_path / "alloc")
    stages.quantize(str(src), None, tmp_path / "fgmp", plan=tmp_path / "alloc")
    stages.quantize(str(src), load_recipe("fp8"), tmp_path / "fp8")
    experts = expert_names(load_hf_model(src))
    ids = None
    for kind, fmt in (("fgmp", "fgmp"), ("fp8", "fp8_e4m3")):
        layers = read_qconfig(tmp_path / kind)["layers"]
        assert set(experts) <= set(layers) and {layers[n]["format"] for n in experts} == {fmt}
        model, tok = load(tmp_path / kind)
        ids = tok(PROMPT, return_tensors="pt").input_ids if ids is None else ids
        got, want = _logits(model, ids), _logits(_native(src), ids)
        assert torch.isfinite(got).all()
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9


def test_stand_in_statistics_are_the_siblings_token_weighted_pool():
    from lpc.pipeline.calibration.stats import InputStats
    from lpc.pipeline.quantization.experts import stand_in_statistics

    torch.manual_seed(0)
    xs = {0: torch.randn(5, 8), 1: torch.randn(11, 8) * 2}
    stats = {}
    for e in range(3):
        s = InputStats.empty(8)
        if e in xs:
            s.update(xs[e])
            s.extra["act_fisher"] = torch.full((8,), float(e + 1))
        else:
            s.extra["act_fisher"] = torch.zeros(8)
        s.finish()
        stats[f"model.layers.0.mlp.experts.{e}.down_proj"] = s
    lonely = InputStats.empty(8)
    lonely.finish()
    stats["model.layers.1.mlp.experts.0.down_proj"] = lonely  # no sibling saw a token either
    filled = stand_in_statistics(stats)
    assert filled == ["model.layers.0.mlp.experts.2.down_proj", "model.layers.1.mlp.experts.0.down_proj"]
    both = torch.cat([xs[0], xs[1]])
    idle = stats["model.layers.0.mlp.experts.2.down_proj"]
    assert torch.allclose(idle.covariance(), both.T @ both / both.shape[0], atol=1e-5)
    assert torch.equal(idle.absmax, both.abs().amax(0)) and torch.equal(idle.extra["act_fisher"], torch.full((8,), 1.5))
    assert idle.count == 0  # the artifact keeps the truth
    assert torch.equal(lonely.covariance(), torch.eye(8)) and torch.equal(lonely.absmax, torch.ones(8))


def test_linears_a_recipe_leaves_out_are_not_warned_about(family_dir, caplog):
    model = load_hf_model(family_dir("llama"))
    with caplog.at_level(logging.WARNING, logger="lpc.pipeline.io.families"):
        found = find_targets(model, ["*mlp*"], ["lm_head"])
    assert found and all(".mlp." in n for n in found)
    assert "matrix parameters" not in caplog.text
