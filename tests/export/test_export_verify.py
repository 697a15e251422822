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
