"""`lpc verify` on every artifact kind: lpc (fuse groups as recorded), compressed-tensors, modelopt, PEFT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lpc.pipeline import stages
from lpc.pipeline.artifact.inspect import verify_artifact
from lpc.pipeline.artifact.store import finish_manifest, read_manifest
from lpc.pipeline.errors import ArtifactError
from lpc.recipes import load_recipe


def test_verify_uses_the_fuse_groups_quantize_recorded(tmp_path, tiny_model_dir):
    """Issue 9 defect 3: with fuse_groups=[] each layer has its own global scale, and that is valid."""
    quant = tmp_path / "q"
    stages.quantize(str(tiny_model_dir), load_recipe("nvfp4", ["quantize.fuse_groups=[]"]), quant)
    qc = json.loads((quant / "config.json").read_text())["quantization_config"]
    assert qc["fuse_groups"] == []
    assert verify_artifact(quant)["ok"]


def test_verify_still_refuses_unshared_scales_of_recorded_groups(tmp_path, tiny_model_dir):
    quant = tmp_path / "q"
    stages.quantize(str(tiny_model_dir), load_recipe("nvfp4"), quant)
    tensors = load_file(str(quant / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.global_scale"] = tensors["model.layers.0.self_attn.k_proj.global_scale"] * 2
    save_file(tensors, str(quant / "model.safetensors"), metadata={"format": "pt"})
    _rehash(quant)
    with pytest.raises(ArtifactError, match="different global scales"):
        verify_artifact(quant)


def _rehash(directory: Path) -> None:
    """Re-write the manifest's hashes after a deliberate change (so verify reaches the content checks)."""
    m = read_manifest(directory)
    finish_manifest(directory, {k: v for k, v in m.items() if k not in ("files", "lpc_version", "schema_version")})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, build_llama, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("verify-exports")
    model = d / "model"
    build_llama(model, intermediate=64)
    stages.quantize(str(model), load_recipe("nvfp4"), d / "q")
    out = {}
    for fmt in ("compressed-tensors", "modelopt", "dense"):
        stages.export(d / "q", d / fmt, fmt)
        out[fmt] = d / fmt
    recipe = load_recipe("nvfp4_eora", ["compensate.rank=4", "calibrate.samples=3", "calibrate.seq_len=16"])
    stages.calibrate(str(model), str(text_files["jsonl"]), d / "calib", recipe)
    stages.compensate(d / "q", d / "calib", recipe, d / "comp")
    stages.export(d / "comp", d / "peft", "peft")
    out["peft"] = d / "peft"
    return out


@pytest.mark.parametrize("fmt,layers", [("compressed-tensors", 14), ("modelopt", 14), ("dense", 0), ("peft", 0)])
def test_verify_checks_each_export_layout(exported, fmt, layers):
    result = verify_artifact(exported[fmt])
    assert result["ok"] and result["layout"] == ("peft" if fmt == "peft" else fmt) and result["layers"] == layers


def test_peft_adapter_records_its_base_model(exported):
    cfg = json.loads((exported["peft"] / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(exported["peft"].resolve())
    assert verify_artifact(exported["peft"])["adapter_modules"] == 14


@pytest.mark.parametrize("fmt,field", [("compressed-tensors", "weight_global_scale"), ("modelopt", "weight_scale_2")])
def test_verify_refuses_unshared_global_scales_of_fused_layers(exported, tmp_path, fmt, field):
    import shutil

    d = tmp_path / fmt
    shutil.copytree(exported[fmt], d)
    tensors = load_file(str(d / "model.safetensors"))
    key = f"model.layers.0.self_attn.v_proj.{field}"
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _rehash(d)
    with pytest.raises(ArtifactError, match=f"different {field}"):
        verify_artifact(d)


def test_verify_refuses_a_zero_block_scale_in_an_engine_export(exported, tmp_path):
    import shutil

    d = tmp_path / "ct"
    shutil.copytree(exported["compressed-tensors"], d)
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight_scale"
    tensors[key] = torch.zeros_like(tensors[key].float()).to(tensors[key].dtype)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _rehash(d)
    with pytest.raises(ArtifactError, match="zero, NaN or inf weight_scale"):
        verify_artifact(d)
