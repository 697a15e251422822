"""`lpc verify` for exports in engine and library layouts: compressed-tensors, modelopt, PEFT, dense.

Checks, per quantized layer: the tensors the layout needs are present with their dtypes and shapes
consistent (packed width = in/2, one block scale per group), block and global scales finite and non-zero,
and fused siblings (the fuse groups the artifact was quantized with, from its manifest's recipe) sharing
one global scale, as engines that fuse q/k/v and gate/up need. Group-quantized integers (int32
`weight_packed`) must agree with their `weight_shape` and scales. An FP8 KV cache (kv_cache_scheme /
kv_cache_quant_algo) needs a finite positive k_scale and v_scale for every decoder layer. Every other
floating tensor must be finite.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.artifact import store as art
from lpc.pipeline.errors import ArtifactError

_FIX = "the export is damaged or was changed; re-export it with lpc export"
# per layout: (field holding the packed/quantized weight, per-tensor scale field or None)
CT_FIELDS = ("weight_packed", "weight_global_scale")
MODELOPT_FIELDS = ("weight", "weight_scale_2")


def verify_export(path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Check an engine/library export; returns {"layers", "layout"} or None when `path` is no such export."""
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    groups = _fuse_groups(manifest)
    if (path / "adapter" / "adapter_config.json").is_file():
        return {**_verify_peft(path), **_verify_plain(path, "peft")}
    if method == "compressed-tensors":
        return _verify_quantized(path, "compressed-tensors", groups, config)
    if method == "modelopt":
        return _verify_quantized(path, "modelopt", groups, config)
    if method is None and manifest.get("stage") == "export":
        return _verify_plain(path, "dense")
    return None


def _fuse_groups(manifest: dict[str, Any]) -> list[list[str]]:
    recipe = manifest.get("recipe") or {}
    groups = (recipe.get("quantize") or {}).get("fuse_groups")
    return [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] if groups is None else groups


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return art.load_tensors(path / "model.safetensors")


def _verify_plain(path: Path, layout: str) -> dict[str, Any]:
    for k, t in _tensors(path).items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise ArtifactError(f"{path}: tensor {k} holds NaN or inf", _FIX)
    return {"layout": layout, "layers": 0}


def _verify_quantized(path: Path, layout: str, groups: list[list[str]], config: dict[str, Any]) -> dict[str, Any]:
    tensors = _tensors(path)
    kv_layers = _check_kv(path, tensors, config)
    packed_field, global_field = CT_FIELDS if layout == "compressed-tensors" else MODELOPT_FIELDS
    layers = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
    for name in layers:
        _check_layer(path, name, tensors, packed_field, global_field)
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise ArtifactError(f"{path}: tensor {k} holds NaN or inf", _FIX)
    _check_fused(path, layers, tensors, global_field, groups)
    return {"layout": layout, "layers": len(layers), **({"kv_layers": kv_layers} if kv_layers else {})}


def _check_kv(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> int:
    """The FP8 KV cache's scales: one finite positive k_scale and v_scale per decoder layer."""
    qc = config.get("quantization_config") or {}
    kv = qc.get("kv_cache_scheme") or qc.get("kv_cache_quant_algo")
    scales = {k: t for k, t in tensors.items() if k.endswith((".k_scale", ".v_scale"))}
    for k, t in scales.items():
        if not torch.isfinite(t.float()).all() or (t.float() <= 0).any():
            raise ArtifactError(f"{path}: KV cache scale {k} is not finite and positive", _FIX)
    if not kv:
        return 0
    n = int(config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers") or 0)
    for part in ("k", "v"):
        found = len([k for k in scales if k.endswith(f".{part}_scale")])
        if found != n:
            raise ArtifactError(f"{path}: the config quantizes the KV cache but {found} of {n} layers have a "
                                f"{part}_scale", _FIX)
    return n


def _check_layer(path: Path, name: str, tensors: dict[str, torch.Tensor], packed_field: str,
                 global_field: str) -> None:
    scale = tensors[f"{name}.weight_scale"]
    weight = tensors.get(f"{name}.{packed_field}", tensors.get(f"{name}.weight"))
    if weight is None:
        raise ArtifactError(f"{path}: layer {name} has a weight_scale but no {packed_field} or weight", _FIX)
    s = scale.float() if scale.dtype != torch.uint8 else torch.ones(1)  # uint8: E8M0 exponents, never 0
    if not torch.isfinite(s).all() or (s == 0).any():
        raise ArtifactError(f"{path}: layer {name} has a zero, NaN or inf weight_scale", _FIX)
    if weight.dtype == torch.uint8 and scale.dim() == 2:  # 4-bit packed: two codes a byte, one scale per block
        cols = 2 * weight.shape[-1]
        if scale.shape[0] != weight.shape[0] or cols % scale.shape[-1] or cols // scale.shape[-1] not in (16, 32):
            raise ArtifactError(f"{path}: layer {name}: packed weight {tuple(weight.shape)} and block scales "
                                f"{tuple(scale.shape)} do not match (expected (out, in/16) or (out, in/32))", _FIX)
    if weight.dtype == torch.int32:
        _check_int_layer(path, name, weight, scale, tensors.get(f"{name}.weight_shape"))
    g = tensors.get(f"{name}.{global_field}")
    if g is not None and (not torch.isfinite(g.float()).all() or (g.float() == 0).any()):
        raise ArtifactError(f"{path}: layer {name} has a zero, NaN or inf {global_field}", _FIX)


def _check_int_layer(path: Path, name: str, packed: torch.Tensor, scale: torch.Tensor,
                     shape: torch.Tensor | None) -> None:
    """Group-quantized integers: (out, in*bits/32) int32 words, bits 4 or 8, (out, in/group) scales."""
    if shape is None or shape.numel() != 2:
        raise ArtifactError(f"{path}: layer {name} has an int32 weight_packed but no (out, in) weight_shape", _FIX)
    out, cols = (int(v) for v in shape.tolist())
    bits = packed.shape[-1] * 32 // max(cols, 1)
    ok = (packed.shape[0] == out == scale.shape[0] and bits in (4, 8) and packed.shape[-1] * 32 == bits * cols
          and scale.dim() == 2 and cols % scale.shape[-1] == 0 and cols // scale.shape[-1] in (16, 32, 64))
    if not ok:
        raise ArtifactError(f"{path}: layer {name}: packed weight {tuple(packed.shape)}, scales {tuple(scale.shape)} "
                            f"and weight_shape {(out, cols)} do not match (expected (out, in*bits/32), bits 4 or 8, "
                            "one scale per 16, 32 or 64 inputs)", _FIX)


def _check_fused(path: Path, layers: list[str], tensors: dict[str, torch.Tensor], field: str,
                 groups: list[list[str]]) -> None:
    from lpc.pipeline.io.models import fuse_groups

    for group in fuse_groups([n for n in layers if f"{n}.{field}" in tensors], groups):
        scales = [tensors[f"{n}.{field}"] for n in group]
        if any(not torch.equal(scales[0], s) for s in scales[1:]):
            raise ArtifactError(f"{path}: fused layers {group} have different {field}s",
                                "engines fuse them into one GEMM; re-quantize with lpc (it shares them)")


def _verify_peft(path: Path) -> dict[str, Any]:
    adapter = path / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if not cfg.get("base_model_name_or_path"):
        raise ArtifactError(f"{adapter}: adapter_config.json names no base model", "re-export with lpc export --format peft")
    tensors = art.load_tensors(adapter / "adapter_model.safetensors")
    base = _tensors(path)
    modules = sorted(cfg.get("target_modules") or [])
    for m in modules:
        a, b = (tensors.get(f"base_model.model.{m}.lora_{x}.weight") for x in "AB")
        w = base.get(f"{m}.weight")
        if a is None or b is None or w is None:
            raise ArtifactError(f"{adapter}: module {m} lacks its lora_A/lora_B or base weight", _FIX)
        if a.shape[0] != b.shape[1] or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
            raise ArtifactError(f"{adapter}: module {m}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not "
                                f"fit the base weight {tuple(w.shape)}", _FIX)
        if not (torch.isfinite(a.float()).all() and torch.isfinite(b.float()).all()):
            raise ArtifactError(f"{adapter}: module {m} has NaN or inf factors", _FIX)
    return {"adapter_modules": len(modules)}
