"""Engine formats from the recipe: every compressed-tensors layout lpc writes (NVFP4, FP8, MXFP4, MXFP8,
VS-Quant int4/int8, layer mixes), decompressed by the library and loaded by transformers with lpc's
logits in bf16 and float32; `auto`'s choice; modelopt read back; FGMP's block mix refused with a one-line
reason."""
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
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.export.compressed_tensors import check_exportable, mx_tensors
from lpc.pipeline.export.ct_runtime import settle
from lpc.pipeline.export.modelopt import dequantize_layer
from lpc.recipes import load_recipe

needs_ct = pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"
MIXED = ['quantize.overrides=[{match: "*mlp*", weights: {format: fp8_e4m3}}, {match: "*o_proj", weights: {format: mxfp8}}]']
INT8 = ["quantize.weights.spec.bits=8", "quantize.weights.spec.vector=32", "quantize.weights.spec.scale_format=e4m3"]
# recipe -> (recipe name, --set overrides, the compressed-tensors format of its export)
CT_CASES = {
    "nvfp4": ("nvfp4", [], "nvfp4-pack-quantized"),
    "fp8": ("fp8", [], "float-quantized"),
    "fp8_block": ("fp8", ["quantize.weights.spec.granularity=block"], "float-quantized"),
    "mxfp4": ("mxfp4", [], "mxfp4-pack-quantized"),
    "mxfp8": ("mxfp8", [], "mxfp8-quantized"),
    "int4": ("int4", [], "pack-quantized"),
    "int8": ("int4", INT8, "pack-quantized"),
    "mixed": ("nvfp4", MIXED, "mixed-precision"),
}
BF16_DECOMPRESSED = ("nvfp4", "mxfp4", "mxfp8")  # formats compressed-tensors decompresses in bf16


@pytest.fixture(scope="module")
def exports(tmp_path_factory, aligned_dir) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for key, (recipe, sets, _) in CT_CASES.items():
        quant = d / f"{key}-q"
        stages.quantize(str(aligned_dir), load_recipe(recipe, sets), quant)
        stages.export(quant, d / f"{key}-ct", "compressed-tensors")
        out[key] = {"quant": quant, "ct": d / f"{key}-ct"}
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _lpc_at_ct_precision(quant: Path, dtype: torch.dtype):
    """lpc's model in `dtype`, its NVFP4/MX weights rounded through bf16 (compressed-tensors decompresses
    them in bf16, exactly; FP8 and int in their scale's dtype) so float32 comparisons are exact."""
    model, tok = load(quant, dtype=dtype)
    for name, meta in read_qconfig(quant)["layers"].items():
        if meta["format"] in BF16_DECOMPRESSED:
            w = model.get_submodule(name).weight
            w.data = w.data.to(torch.bfloat16).to(dtype)
    return model, tok


@needs_ct
@pytest.mark.parametrize("key", list(CT_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_transformers_loads_each_ct_layout_with_lpc_logits(exports, key, dtype):
    """from_pretrained(dtype=...) then ct_runtime.settle (a no-op for single-format weight-only exports,
    which transformers dequantizes at load; for mixed-precision it decompresses and gives the bf16
    NVFP4/MX weights the float32 model's dtype) and lpc.load of the export give lpc's logits."""
    from transformers import AutoModelForCausalLM

    paths = exports[key]
    qc = json.loads((paths["ct"] / "config.json").read_text())["quantization_config"]
    assert qc["format"] == CT_CASES[key][2]
    ct_model = settle(AutoModelForCausalLM.from_pretrained(str(paths["ct"]), dtype=dtype))
    assert ct_model.dtype == dtype
    assert all(m.weight.dtype == dtype for m in ct_model.modules() if isinstance(m, torch.nn.Linear))
    lpc_model, tok = _lpc_at_ct_precision(paths["quant"], dtype)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    got, want = _logits(ct_model, ids), _logits(lpc_model, ids)
    if key in ("fp8", "mixed") and dtype == torch.bfloat16:  # CT keeps FP8 scales in bf16: one bf16 step
        assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    else:
        assert torch.equal(got, want), (got - want).abs().max().item()
    assert torch.equal(_logits(load(paths["ct"], dtype=dtype)[0], ids), got)  # lpc's loader: the same model


@needs_ct
def test_plain_float32_load_of_a_mixed_export_needs_settle(exports):
    """What the library alone does: the float32 model's first forward fails on the bf16 NVFP4/MX weights;
    settle is what makes it run (and the export declares bfloat16, which loads without it)."""
    from transformers import AutoModelForCausalLM

    ct = exports["mixed"]["ct"]
    assert json.loads((ct / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(RuntimeError, match="dtype"):
        _logits(AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32), ids)
    assert torch.isfinite(_logits(settle(AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32)), ids)).all()


@needs_ct
@pytest.mark.parametrize("fmt,shape", [("mxfp4", (8, 64)), ("mxfp4", (33, 160)), ("mxfp8", (8, 64)),
                                       ("mxfp8", (17, 96))])
def test_library_decompresses_lpc_mx_bytes_to_lpc_values(fmt, shape):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    torch.manual_seed(shape[0])
    x = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    q = get_format(fmt).quantize(x)
    fields, _ = mx_tensors(q)
    if fmt == "mxfp4":
        w = MXFP4PackedCompressor.decompress(dict(fields), preset_name_to_scheme("MXFP4A16", ["Linear"]))["weight"]
    else:
        w = MXFP8QuantizationCompressor.decompress(dict(fields), preset_name_to_scheme("MXFP8A16", ["Linear"]))["weight"]
    assert torch.equal(w.float(), get_format(fmt).dequantize(q).to(w.dtype).float())


@needs_ct
def test_mixed_export_is_one_config_group_per_format(exports):
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((exports["mixed"]["ct"] / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "dequantize"})
    formats = {g.format: g.targets for g in cfg.config_groups.values()}
    assert set(formats) == {"nvfp4-pack-quantized", "float-quantized", "mxfp8-quantized"}
    assert "model.layers.0.mlp.gate_proj" in formats["float-quantized"]
    assert "model.layers.1.self_attn.o_proj" in formats["mxfp8-quantized"]
    assert qc["ignore"] == ["lm_head"]


def test_auto_picks_compressed_tensors_when_it_holds_every_layer(tmp_path, aligned_dir):
    stages.quantize(str(aligned_dir), load_recipe("mxfp4"), tmp_path / "q")
    result = stages.export(tmp_path / "q", tmp_path / "out", "auto")
    assert result.manifest["summary"]["format"] == "compressed-tensors"
    assert "every quantized layer" in result.manifest["summary"]["format_reason"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_auto_falls_back_to_lpc_and_says_why(tmp_path, aligned_dir):
    stages.quantize(str(aligned_dir), load_recipe("bcq"), tmp_path / "q")
    result = stages.export(tmp_path / "q", tmp_path / "out", "auto")
    summary = result.manifest["summary"]
    assert summary["format"] == "lpc" and "format 'bcq'" in summary["format_reason"]
    assert read_qconfig(tmp_path / "out") is not None
    assert load_recipe("bcq").export.format == "auto"


@pytest.mark.parametrize("kv", [{"format": "nvfp4"}, {"format": "fp8_e4m3", "scales": "head"},
                                {"format": "fp8_e4m3", "kivi": True}, {"format": "fp8_e4m3", "scales": "dynamic"},
                                {"format": "fp8_e4m3", "scales": "tensor", "policy": "thinkv"}])
def test_kv_cache_without_engine_form_is_never_dropped(kv):
    from lpc.pipeline.export.compressed_tensors import expressible

    qc = {"layers": {"m.a": {"format": "nvfp4", "shape": [32, 32], "spec": {}}}, "kv_cache": kv}
    assert "KV cache" in expressible(qc)  # so `auto` keeps the lpc format
    assert expressible({**qc, "kv_cache": {"format": "fp8_e4m3", "scales": "tensor"}}) is None


def test_fgmp_block_mix_is_refused_with_one_line_reason():
    layer = {"format": "fgmp", "shape": [32, 32], "spec": {}}
    with pytest.raises(ArtifactError, match=r"FGMP block mix") as err:
        check_exportable({"layers": {"m.a": layer}})
    assert "\n" not in str(err.value) and "--format lpc" in err.value.hint and "--format dense" in err.value.hint


# ---- modelopt ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def modelopt_export(exports, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mo") / "mo"
    stages.export(exports["nvfp4"]["quant"], out, "modelopt")
    return out


def test_modelopt_export_reads_back_to_lpc_weights(modelopt_export, exports):
    quant = exports["nvfp4"]["quant"]
    qtensors, _ = read_qtensors(quant, read_qconfig(quant))
    tensors = load_file(str(modelopt_export / "model.safetensors"))
    ct = load_file(str(exports["nvfp4"]["ct"] / "model.safetensors"))
    for name, q in qtensors.items():
        fields = {k: tensors[f"{name}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2")}
        assert fields["weight"].dtype == torch.uint8 and fields["weight_scale"].dtype == torch.float8_e4m3fn
        assert fields["weight_scale_2"].shape == () and fields["weight_scale_2"].dtype == torch.float32
        assert torch.equal(dequantize_layer(fields), get_format("nvfp4").dequantize(q))
        # weight_scale_2 = amax/(6*448) = 1 / compressed-tensors' weight_global_scale
        assert fields["weight_scale_2"].item() == pytest.approx(1 / ct[f"{name}.weight_global_scale"].item(), rel=1e-7)
    hq = json.loads((modelopt_export / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["group_size"] == 16 and hq["exclude_modules"] == ["lm_head"]
    cfg = json.loads((modelopt_export / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt"


@pytest.mark.skipif(find_spec("modelopt") is None, reason="nvidia-modelopt is not installed (pip install nvidia-modelopt)")
def test_modelopt_own_dequantizer_reads_lpc_nvfp4(modelopt_export, exports):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    quant = exports["nvfp4"]["quant"]
    qtensors, _ = read_qtensors(quant, read_qconfig(quant))
    tensors = load_file(str(modelopt_export / "model.safetensors"))
    for name, q in qtensors.items():
        packed = NVFP4QTensor(q.shape, torch.float32, tensors[f"{name}.weight"])
        w = packed.dequantize(scale=tensors[f"{name}.weight_scale"], double_scale=tensors[f"{name}.weight_scale_2"],
                              block_sizes={-1: 16})
        assert torch.equal(w.float(), get_format("nvfp4").dequantize(q))


def test_modelopt_refuses_formats_it_cannot_hold(tmp_path, exports):
    with pytest.raises(ArtifactError, match=r"format 'mxfp4'.*modelopt"):
        stages.export(exports["mxfp4"]["quant"], tmp_path / "mo", "modelopt")


def test_modelopt_w4a4_carries_calibrated_input_scales(tmp_path, aligned_dir, text_files):
    recipe = load_recipe("nvfp4_w4a4", ["calibrate.samples=4", "calibrate.seq_len=24"])
    stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    stages.quantize(str(aligned_dir), recipe, tmp_path / "q", calib=tmp_path / "calib")
    stages.export(tmp_path / "q", tmp_path / "mo", "modelopt")
    tensors = load_file(str(tmp_path / "mo" / "model.safetensors"))
    acts = read_qconfig(tmp_path / "q")["activations"]["layers"]
    assert acts
    for name, entry in acts.items():
        assert tensors[f"{name}.input_scale"].item() == pytest.approx(entry["global_amax"] / (6 * 448), rel=1e-6)
