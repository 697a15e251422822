"""The FP8 KV cache of an lpc artifact as engines read it: one scale per layer for keys and for values.

lpc stores the calibrated K/V amax of each layer and KV head (`lpc.kv.<i>.k_amax` / `v_amax`, keys after
RoPE) with quantization_config["kv_cache"]; with `format: fp8_e4m3` and `scales: tensor` each layer's
keys are quantized as E4M3(k / s_k) * s_k with s_k = amax_k / 448 over its heads (lpc.formats'
ScaledFloat scale), values likewise. Engines hold the same per-tensor static scales:

    compressed-tensors  <attn>.k_scale, <attn>.v_scale   f32 (1,)   kv_cache_scheme: FP8, strategy tensor
    modelopt            <attn>.k_proj.k_scale, <attn>.v_proj.v_scale  f32 ()  kv_cache_quant_algo: "FP8"

(`<attn>` = model.layers.<i>.self_attn; vLLM maps both spellings onto its attention layer's scales.)
With `smooth`, the artifact's q/k (and v/o) weights already carry the smoothing and its K/V statistics
are those of the smoothed model, so the exports hold the smoothed weights and the smaller k_scale. With
`scale_search` the stored amax already carries each layer's searched multiplier.
Other KV settings (NVFP4 or int caches, per-head or dynamic scales, KIVI grouping, clipping) have no
engine form and are refused with the reason.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from lpc.formats import get_format
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.kvcache import KV_PREFIX

CT_KV_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
MODELOPT_KV_ALGO = "FP8"
# `group` only matters with kivi; smoothing lives in the q/k/v/o weights, which engines load as they are
_KNOWN = ("format", "spec", "scales", "kivi", "group", "smooth", "smooth_alpha", "smooth_values", "scale_search")


def kv_unsupported(kv: dict[str, Any] | None) -> str | None:
    """None when the artifact's KV cache section (or its absence) has an engine form, else why not."""
    if not kv:
        return None
    spec = kv.get("spec") or {}
    why = []
    if kv.get("format") != "fp8_e4m3":
        why.append(f"format '{kv.get('format')}' (engines hold fp8_e4m3)")
    if kv.get("scales", "tensor") != "tensor":
        why.append(f"scales '{kv.get('scales')}' (engines hold one static scale per layer: scales: tensor)")
    if kv.get("kivi"):
        why.append("KIVI grouping")
    if spec.get("granularity", "tensor") != "tensor" or spec.get("clip", "none") != "none":
        why.append(f"spec {spec} (engines hold granularity: tensor without clipping)")
    other = sorted(k for k, v in kv.items() if k not in _KNOWN and v not in (None, False, 0, "", "none", [], {}))
    if other:  # any further cache policy (eviction, mixed precision, ...) changes what the cache holds
        why.append(f"settings {', '.join(other)}")
    return f"the KV cache quantization ({', '.join(why)}) has no engine form" if why else None


def check_kv(kv: dict[str, Any] | None, hint: str) -> None:
    reason = kv_unsupported(kv)
    if reason:
        raise ArtifactError(reason, hint)


def attention_modules(linears: list[str]) -> dict[int, str]:
    """{decoder layer index: attention module name} from the model's Linear names (parents of k_proj, or of
    a fused qkv_proj (Phi-3) / query_key_value (GPT-NeoX))."""
    out = {}
    for name in linears:
        m = re.fullmatch(r"(.*\.(\d+)\.[^.]+)\.(k_proj|qkv_proj|query_key_value)", name)
        if m:
            out[int(m.group(2))] = m.group(1)
    return out


def kv_scales(aux: dict[str, torch.Tensor], layers: dict[int, str]) -> dict[str, dict[str, torch.Tensor]]:
    """{attention module: {"k": s_k, "v": s_v}} f32 scalars = amax / 448 from the artifact's KV statistics."""
    fmt = get_format("fp8_e4m3")
    out = {}
    for i, attn in sorted(layers.items()):
        pair = {}
        for part in ("k", "v"):
            key = f"{KV_PREFIX}{i}.{part}_amax"
            if key not in aux:
                raise ArtifactError(f"the artifact's KV cache section has no {key}",
                                    "re-run quantize with a calibration made with the kv_cache recipe")
            pair[part] = fmt.scale_of(aux[key].float().amax().reshape(1)).reshape(())
        out[attn] = pair
    return out


def ct_kv_tensors(scales: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """compressed-tensors' names: `<attn>.k_scale` / `<attn>.v_scale`, f32 (1,)."""
    return {f"{attn}.{p}_scale": s.reshape(1).clone() for attn, pair in scales.items() for p, s in pair.items()}


def modelopt_kv_tensors(scales: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """modelopt's names: `<attn>.k_proj.k_scale` / `<attn>.v_proj.v_scale`, f32 ()."""
    return {f"{attn}.{p}_proj.{p}_scale": s.reshape(()).clone() for attn, pair in scales.items() for p, s in pair.items()}
