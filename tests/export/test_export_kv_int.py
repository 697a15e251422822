"""compressed-tensors layouts beyond the float formats: VS-Quant integers as group-quantized
"pack-quantized" (decompressed by the library to lpc's values), the FP8 KV cache (kv_cache_scheme +
k_scale/v_scale, and modelopt's kv_cache_quant_algo), and W4A4 loaded in float32; verify on each."""
from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.artifact.inspect import verify_artifact
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.artifact.store import finish_manifest, read_manifest
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.export.ct_layouts import int_tensors, pack_int32
from lpc.pipeline.export.ct_runtime import settle
from lpc.pipeline.kvcache import KVSpec
from lpc.recipes import load_recipe

needs_ct = pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"
CALIB = ["calibrate.samples=4", "calibrate.seq_len=24"]


# ---- integers: pack-quantized ------------------------------------------------------------------

@needs_ct
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(8, 32), (5, 96)])
def test_packing_is_compressed_tensors_own(bits, shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    torch.manual_seed(bits)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, shape, dtype=torch.int8)
    codes[0, :3] = torch.tensor([-qmax, 0, qmax], dtype=torch.int8)  # both ends and zero
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))
    assert torch.equal(unpack_from_int32(pack_int32(codes, bits), bits, torch.Size(shape)), codes)


@needs_ct
@pytest.mark.parametrize("spec", [{"bits": 4, "vector": 16, "scale_format": "two_level", "clip": "octav"},
                                  {"bits": 4, "vector": 32, "scale_format": "e4m3"},
                                  {"bits": 8, "vector": 64, "scale_format": "bf16"},
                                  {"bits": 8, "vector": 16, "scale_format": "two_level", "scale_bits": 8}])
@pytest.mark.parametrize("shape", [(8, 64), (33, 128)])
def test_library_decompresses_lpc_int_to_lpc_values(spec, shape):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(shape[0])
    x = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    q = get_format("int").quantize(x, **spec)
    fields, key = int_tensors(q)
    assert key == f"w{spec['bits']}a16_g{spec['vector']}"
    args = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=True, strategy="group",
                            group_size=spec["vector"])
    w = PackedQuantizationCompressor.decompress(dict(fields), QuantizationScheme(targets=["Linear"], weights=args))
    assert w["weight"].dtype == torch.float32
    assert torch.equal(w["weight"], get_format("int").dequantize(q))


def test_unaligned_int_layers_are_written_dense(tmp_path, tiny_model_dir):
    """The tiny Llama's down_proj has 40 inputs, not a multiple of 16: dense, ignored, reported."""
    stages.quantize(str(tiny_model_dir), load_recipe("int4"), tmp_path / "q")
    result = stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    dense = result.manifest["summary"]["dense_layers"]
    assert dense and all(n.endswith("down_proj") for n in dense)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert set(dense) <= set(qc["ignore"]) and qc["format"] == "pack-quantized"


# ---- FP8 KV cache -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kv(tmp_path_factory, aligned_dir, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kv")
    recipe = load_recipe("kv_fp8", CALIB)
    stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), d / "calib", recipe)
    stages.quantize(str(aligned_dir), recipe, d / "q", calib=d / "calib")
    for fmt in ("compressed-tensors", "modelopt"):
        stages.export(d / "q", d / fmt, fmt)
    return {"q": d / "q", "ct": d / "compressed-tensors", "mo": d / "modelopt"}


def _amax(quant: Path, layer: int, part: str) -> torch.Tensor:
    return load_file(str(quant / "model.safetensors"))[f"lpc.kv.{layer}.{part}_amax"].float().amax()


@needs_ct
def test_ct_kv_cache_scheme_and_scales(kv):
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((kv["ct"] / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)
    assert cfg.kv_cache_scheme.num_bits == 8 and cfg.kv_cache_scheme.type == "float"
    assert cfg.kv_cache_scheme.strategy == "tensor" and not cfg.kv_cache_scheme.dynamic
    assert cfg.config_groups == {} and "dequantize" not in qc  # bf16 weights: every Linear ignored
    tensors = load_file(str(kv["ct"] / "model.safetensors"))
    for i in range(2):
        for part in ("k", "v"):
            s = tensors[f"model.layers.{i}.self_attn.{part}_scale"]
            assert s.dtype == torch.float32 and s.shape == (1,)
            assert torch.equal(s, (_amax(kv["q"], i, part) / 448).reshape(1))
    assert not any(k.startswith("lpc.") for k in tensors)


@needs_ct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_kv_quantization_with_the_exported_scale_is_lpcs(kv, dtype):
    """compressed-tensors' own fake quantization of key/value states with the exported scale equals lpc's."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    qc = json.loads((kv["ct"] / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs.model_validate(qc["kv_cache_scheme"])
    tensors = load_file(str(kv["ct"] / "model.safetensors"))
    torch.manual_seed(0)
    for part in ("k", "v"):
        amax = _amax(kv["q"], 1, part)
        x = (torch.randn(1, 2, 7, 8) * amax / 2).to(dtype)
        scale = tensors[f"model.layers.1.self_attn.{part}_scale"]  # f32, as vLLM keeps it
        got = fake_quantize(x, scale, None, args).to(dtype)
        assert torch.equal(got, KVSpec("fp8_e4m3", {"granularity": "tensor"}, amax).fake(x))


@needs_ct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ct_kv_export_loads_with_lpcs_quantized_cache(kv, dtype):
    lpc_model, tok = load(kv["q"], dtype=dtype)
    ct_model, _ = load(kv["ct"], dtype=dtype)
    plain, _ = load(kv["q"], dtype=dtype, activations=False)  # the same weights, unquantized cache
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = lpc_model(ids).logits
        assert torch.equal(ct_model(ids).logits, want)
        assert not torch.equal(plain(ids).logits, want)  # the cache quantization is visible


def test_modelopt_kv_cache_quant_algo_and_scales(kv):
    hq = json.loads((kv["mo"] / "hf_quant_config.json").read_text())["quantization"]
    assert hq["kv_cache_quant_algo"] == "FP8" and hq["quant_algo"] is None
    assert json.loads((kv["mo"] / "config.json").read_text())["quantization_config"]["kv_cache_quant_algo"] == "FP8"
    tensors = load_file(str(kv["mo"] / "model.safetensors"))
    for i in range(2):
        for part in ("k", "v"):
            s = tensors[f"model.layers.{i}.self_attn.{part}_proj.{part}_scale"]
            assert s.shape == () and s.item() == (_amax(kv["q"], i, part) / 448).item()


@pytest.mark.parametrize("key", ["ct", "mo"])
def test_verify_checks_kv_scales(kv, tmp_path, key):
    assert verify_artifact(kv[key])["kv_layers"] == 2
    d = tmp_path / key
    shutil.copytree(kv[key], d)
    tensors = load_file(str(d / "model.safetensors"))
    victim = next(k for k in tensors if k.endswith("v_scale"))
    tensors[victim] = torch.zeros_like(tensors[victim])
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = read_manifest(d)
    finish_manifest(d, {k: v for k, v in m.items() if k not in ("files", "lpc_version", "schema_version")})
    with pytest.raises(ArtifactError, match="KV cache scale .* not finite and positive"):
        verify_artifact(d)


def test_kv_only_artifact_without_stats_is_refused(kv, tmp_path):
    from lpc.pipeline.export.kv_scales import kv_scales

    with pytest.raises(ArtifactError, match=r"no lpc\.kv\.0\.k_amax"):
        kv_scales({}, {0: "model.layers.0.self_attn"})


# ---- W4A4 in float32 ------------------------------------------------------------------------------

@needs_ct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a4_export_loads_in_float32_and_bf16(tmp_path_factory, aligned_dir, text_files, dtype):
    """compressed-tensors' W4A4 run-time path in a float32 model (after settle): lpc's logits to one f32
    rounding (the library multiplies activation codes by scale/global_scale, lpc by scale*s2)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("w4a4")
    recipe = load_recipe("nvfp4_w4a4", CALIB)
    stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), d / "calib", recipe)
    stages.quantize(str(aligned_dir), recipe, d / "q", calib=d / "calib")
    stages.export(d / "q", d / "ct", "compressed-tensors")
    lpc_model, tok = load(d / "q", dtype=dtype)
    for name in read_qconfig(d / "q")["layers"]:  # NVFP4 weights decompress exactly to bf16
        w = lpc_model.get_submodule(name).weight
        w.data = w.data.to(torch.bfloat16).to(dtype)
    ct_model = settle(AutoModelForCausalLM.from_pretrained(str(d / "ct"), dtype=dtype))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = ct_model(ids).logits.float(), lpc_model(ids).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # the library fake-quantizes the bf16 activations in bf16, lpc in float32
        assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_verify_checks_int_layouts(tmp_path, aligned_dir):
    stages.quantize(str(aligned_dir), load_recipe("int4"), tmp_path / "q")
    stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    result = verify_artifact(tmp_path / "ct")
    assert result["ok"] and result["layout"] == "compressed-tensors" and result["layers"] == 14
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight_shape"
    tensors[key] = tensors[key] * 2  # claims twice the inputs the packed words hold
    save_file(tensors, str(tmp_path / "ct" / "model.safetensors"), metadata={"format": "pt"})
    m = read_manifest(tmp_path / "ct")
    finish_manifest(tmp_path / "ct", {k: v for k, v in m.items() if k not in ("files", "lpc_version", "schema_version")})
    with pytest.raises(ArtifactError, match=r"up_proj: packed weight .* do not match"):
        verify_artifact(tmp_path / "ct")
