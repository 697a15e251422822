"""The README's table "recipe -> export formats that hold it", one test per cell.

Each row is a recipe quantized on the aligned tiny Llama (once per module); each column an export
format. A "yes" cell exports and proves the export is the artifact's model:
  compressed-tensors  lpc.load (transformers' compressed-tensors loader, then ct_runtime.settle) gives
                      lpc's float32 logits (NVFP4/MX weights at the bf16 the library decompresses to)
  modelopt            every quantized layer reads back (modelopt's formula) to lpc's weights exactly;
                      excluded layers hold lpc's dequantized weights; input and KV scales present
  lpc                 transformers' from_pretrained (lpc's registered quantizer) gives lpc's logits
  dense               from_pretrained gives the logits of lpc's weights (low-rank paths merged) without
                      simulated activations or KV cache
  peft                the base plus the LoRA adapter give the compensated artifact's logits
  auto                the export picks the format the table names
A refused cell raises an ArtifactError/InputError whose one-line message says why.
"""
from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
from lpc.pipeline.errors import LpcError
from lpc.pipeline.export.modelopt import dequantize_layer
from lpc.recipes import load_recipe

CALIB = ["calibrate.samples=4", "calibrate.seq_len=24"]
MIXED = ['quantize.overrides=[{match: "*mlp*", weights: {format: fp8_e4m3}}, {match: "*o_proj", weights: {format: mxfp8}}]']
MO_MIX = ['quantize.overrides=[{match: "*mlp*", weights: {format: fp8_e4m3, spec: {granularity: tensor}}}]']
VAPR_VLLM = CALIB + ["allocate.refine=false", "allocate.pareto_budgets=[]", "allocate.engine=vllm", "allocate.budget_bits=8.0",
                     "allocate.candidates=[{format: bf16}, {format: fp8_e4m3, spec: {granularity: tensor}}, {format: nvfp4}]"]
INT8 = ["quantize.weights.spec.bits=8", "quantize.weights.spec.vector=32", "quantize.weights.spec.scale_format=e4m3"]
FP8_TENSOR = ["quantize.weights.spec.granularity=tensor"]
KV = ["kv_cache={format: fp8_e4m3, spec: {granularity: tensor}, scales: tensor}"]
FORMATS = ["auto", "compressed-tensors", "modelopt", "lpc", "dense", "peft"]
NO_LOWRANK = "no low-rank paths"
# row -> (recipe, --set, {format: "yes" | regex of the refusal}, the format `auto` picks)
ROWS = {
    "nvfp4": ("nvfp4", [], {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "nvfp4_w4a4": ("nvfp4_w4a4", CALIB, {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "fp8": ("fp8", [], {"modelopt": "FP8 with a scale per channel", "peft": NO_LOWRANK}, "compressed-tensors"),
    "fp8_tensor": ("fp8", FP8_TENSOR, {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "fp8_block": ("fp8", ["quantize.weights.spec.granularity=block"],
                  {"modelopt": "FP8 with a scale per 128x128 block", "peft": NO_LOWRANK}, "compressed-tensors"),
    "mxfp4": ("mxfp4", [], {"modelopt": "format 'mxfp4'", "peft": NO_LOWRANK}, "compressed-tensors"),
    "mxfp8": ("mxfp8", [], {"modelopt": "format 'mxfp8'", "peft": NO_LOWRANK}, "compressed-tensors"),
    "int4": ("int4", [], {"modelopt": "format 'int'", "peft": NO_LOWRANK}, "compressed-tensors"),
    "int8": ("int4", INT8, {"modelopt": "format 'int'", "peft": NO_LOWRANK}, "compressed-tensors"),
    "mix_nvfp4_fp8_mxfp8": ("nvfp4", MIXED, {"modelopt": "scale per channel", "peft": NO_LOWRANK}, "compressed-tensors"),
    "mix_nvfp4_fp8tensor": ("nvfp4", MO_MIX, {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "vapr_engine_vllm": ("vapr", VAPR_VLLM, {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "kv_fp8": ("kv_fp8", CALIB, {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "fp8_tensor_kv_fp8": ("fp8", CALIB + FP8_TENSOR + KV, {"modelopt": "yes", "peft": NO_LOWRANK}, "compressed-tensors"),
    "kv_nvfp4": ("kv_nvfp4", CALIB, {"compressed-tensors": "KV cache .* no engine form",
                                     "modelopt": "KV cache .* no engine form", "peft": NO_LOWRANK}, "lpc"),
    "bcq": ("bcq", [], {"compressed-tensors": "format 'bcq'", "modelopt": "format 'bcq'", "peft": NO_LOWRANK}, "lpc"),
    "fgmp_nvfp4a16": ("fgmp_nvfp4a16", CALIB + ["quantize.method=rtn"],
                      {"compressed-tensors": "FGMP block mix", "modelopt": "format 'fgmp'", "peft": NO_LOWRANK}, "lpc"),
    "nvfp4_eora": ("nvfp4_eora", CALIB + ["compensate.rank=4"],
                   {"compressed-tensors": "low-rank residual path", "modelopt": "low-rank residual path"}, "lpc"),
}
CELLS = [(row, fmt) for row in ROWS for fmt in FORMATS]
_cache: dict[str, Path] = {}


def expected(row: str, fmt: str) -> str:
    return ROWS[row][2].get(fmt, "yes")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, aligned_dir, text_files):
    """row -> the lpc artifact of its recipe (quantized once per module, on first use)."""
    base = tmp_path_factory.mktemp("matrix")

    def get(row: str) -> Path:
        if row in _cache and _cache[row].is_dir():
            return _cache[row]
        name, sets, _, _ = ROWS[row]
        recipe, d = load_recipe(name, sets), base / row
        calib = plan = None
        if any(s.startswith("calibrate.") for s in sets):
            calib = d / "calib"
            stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), calib, recipe)
        if recipe.allocate is not None:
            plan = d / "alloc"
            stages.allocate(calib, recipe, plan)
        stages.quantize(str(aligned_dir), recipe, d / "q", calib=calib, plan=plan)
        out = d / "q"
        if recipe.compensate is not None:
            stages.compensate(d / "q", calib, recipe, d / "comp")
            out = d / "comp"
        _cache[row] = out
        return out

    return get


def _ids(tok) -> torch.Tensor:
    return tok("once upon a time there was a little girl who liked to play", return_tensors="pt").input_ids


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _check_ct(quant: Path, out: Path) -> None:
    ct_model, _ = load(out, dtype=torch.float32)
    ref, tok = load(quant, dtype=torch.float32)
    for name, meta in read_qconfig(quant)["layers"].items():  # CT decompresses NVFP4/MX exactly to bf16
        if meta["format"] in ("nvfp4", "mxfp4", "mxfp8"):
            w = ref.get_submodule(name).weight
            w.data = w.data.to(torch.bfloat16).float()
    ids = _ids(tok)
    got, want = _logits(ct_model, ids), _logits(ref, ids)
    if read_qconfig(quant).get("activations"):  # activation codes times scale/global vs scale*s2: one f32 rounding
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want), (got - want).abs().max().item()


def _check_modelopt(quant: Path, out: Path) -> None:
    qconfig = read_qconfig(quant)
    qtensors, _ = read_qtensors(quant, qconfig)
    tensors = load_file(str(out / "model.safetensors"))
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    for name, q in qtensors.items():
        want = get_format(q.format).dequantize(q)
        if f"{name}.weight_scale" in tensors:
            assert torch.equal(dequantize_layer({k: tensors[f"{name}.{k}"] for k in ("weight", "weight_scale",
                                                 "weight_scale_2") if f"{name}.{k}" in tensors}), want), name
        else:
            assert name in hq["exclude_modules"] and torch.equal(tensors[f"{name}.weight"].float(), want), name
    for name in (qconfig.get("activations") or {}).get("layers") or {}:
        assert tensors[f"{name}.input_scale"] > 0
    if qconfig.get("kv_cache"):
        assert hq["kv_cache_quant_algo"] == "FP8" and tensors["model.layers.1.self_attn.v_proj.v_scale"] > 0


def _check_hf(quant: Path, out: Path, activations: bool) -> None:
    """lpc export: lpc's model with its hooks; dense: lpc's weights, low-rank paths merged, no hooks."""
    from transformers import AutoModelForCausalLM

    ref, tok = load(quant, dtype=torch.float32, activations=activations, merge_lowrank=not activations)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = _ids(tok)
    assert torch.equal(_logits(hf, ids), _logits(ref, ids))


def _check_peft(quant: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref, tok = load(quant, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = _ids(tok)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, out / "adapter"), ids), _logits(ref, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
@pytest.mark.parametrize("row,fmt", CELLS, ids=[f"{r}-{f}" for r, f in CELLS])
def test_cell(artifact, tmp_path, row, fmt):
    quant, want = artifact(row), expected(row, fmt)
    out = tmp_path / "export"
    if want != "yes":
        with pytest.raises(LpcError, match=want) as err:
            stages.export(quant, out, fmt)
        assert "\n" not in str(err.value) and not out.exists()
        return
    result = stages.export(quant, out, fmt)
    if fmt == "auto":
        assert result.manifest["summary"]["format"] == ROWS[row][3]
        assert result.manifest["summary"]["format_reason"]
    elif fmt == "compressed-tensors":
        _check_ct(quant, out)
    elif fmt == "modelopt":
        _check_modelopt(quant, out)
    elif fmt == "lpc":
        _check_hf(quant, out, activations=True)
    elif fmt == "dense":
        _check_hf(quant, out, activations=False)
        lost = " ".join(result.manifest["summary"].get("dropped", []))
        assert ("KV cache" in lost) == bool(read_qconfig(quant).get("kv_cache"))
    else:
        _check_peft(quant, out)
