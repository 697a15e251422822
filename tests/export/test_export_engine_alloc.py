"""`allocate.engine: vllm`: VaPr restricted to engine layouts with one format per fused group, so the
searched mix exports to compressed-tensors (loaded by transformers with lpc's logits) and modelopt."""
from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lpc.pipeline import stages
from lpc.pipeline.allocation.engine import ENGINE_FORMATS, engine_groups
from lpc.pipeline.allocation.knapsack import Layer, Option, solve
from lpc.pipeline.artifact.load import load
from lpc.pipeline.io.models import fuse_groups
from lpc.recipes import load_recipe

SMALL = ["calibrate.samples=4", "calibrate.seq_len=24", "allocate.refine=false", "allocate.pareto_budgets=[]"]
ENGINE = SMALL + ["allocate.engine=vllm", "allocate.budget_bits=7.0"]
FUSED = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, build_llama, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("engine-alloc")
    build_llama(d / "model", intermediate=64)
    recipe = load_recipe("vapr", ENGINE)
    stages.calibrate(str(d / "model"), str(text_files["jsonl"]), d / "calib", recipe)
    stages.allocate(d / "calib", recipe, d / "alloc")
    stages.quantize(str(d / "model"), recipe, d / "quant", plan=d / "alloc", calib=d / "calib")
    return {"dir": d, "model": d / "model", "calib": d / "calib", "alloc": d / "alloc", "quant": d / "quant"}


def test_engine_plan_uses_engine_formats_one_per_fused_group(engine_run):
    layers = json.loads((engine_run["alloc"] / "plan.json").read_text())["layers"]
    assert {e["format"] for e in layers.values()} <= set(ENGINE_FORMATS)  # int4 / bcq of the recipe dropped
    for group in fuse_groups(sorted(layers), FUSED):
        assert len({layers[n]["label"] for n in group}) == 1, group


def test_fused_group_is_one_knapsack_item_with_exact_summed_costs():
    opt = lambda bits, loss: (Option("a", bits, loss),)  # noqa: E731
    layers = [Layer("m.q_proj", 3, opt(4.5, 1.0)), Layer("m.k_proj", 1, opt(8.0, 2.0)), Layer("m.o_proj", 2, opt(16, 0.0))]
    merged = engine_groups(layers, FUSED)
    assert [l.name for l in merged] == ["m.q_proj+m.k_proj", "m.o_proj"]
    assert merged[0].numel == 4 and merged[0].options[0].bits_per_weight * 4 == 3 * 4.5 + 8.0
    assert merged[0].options[0].loss == 3.0 and solve(merged, 16).exact


@pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
def test_engine_mix_exports_to_compressed_tensors_with_lpc_logits(engine_run):
    from transformers import AutoModelForCausalLM

    result = stages.export(engine_run["quant"], engine_run["dir"] / "auto", "auto")
    assert result.manifest["summary"]["format"] == "compressed-tensors"
    hf = AutoModelForCausalLM.from_pretrained(str(engine_run["dir"] / "auto"))
    ref, tok = load(engine_run["quant"], dtype=hf.dtype)
    ids = tok("once upon a time there was a little girl", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = hf(ids).logits.float(), ref(ids).logits.float()
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()  # bf16 FP8 scales: one bf16 step


def test_engine_mix_of_modelopt_layouts_exports_to_modelopt(engine_run, tmp_path):
    sets = ENGINE + ['allocate.candidates=[{format: bf16}, {format: fp8_e4m3, spec: {granularity: tensor}}, '
                     '{format: nvfp4}]', "allocate.budget_bits=8.0"]
    recipe = load_recipe("vapr", sets)
    stages.allocate(engine_run["calib"], recipe, tmp_path / "alloc")
    stages.quantize(str(engine_run["model"]), recipe, tmp_path / "q", plan=tmp_path / "alloc", calib=engine_run["calib"])
    stages.export(tmp_path / "q", tmp_path / "mo", "modelopt")
    hq = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    plan = json.loads((tmp_path / "alloc" / "plan.json").read_text())["layers"]
    algo = {"nvfp4": "NVFP4", "fp8_e4m3": "FP8"}
    for name, entry in plan.items():
        if entry["format"] == "bf16":
            assert name in hq["exclude_modules"]
        elif hq["quant_algo"] == "MIXED_PRECISION":
            assert hq["quantized_layers"][name]["quant_algo"] == algo[entry["format"]]
        else:
            assert hq["quant_algo"] == algo[entry["format"]]
