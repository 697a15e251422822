"""`--format modelopt`: the lpc artifact in NVIDIA TensorRT Model Optimizer's Hugging Face checkpoint
layout (TensorRT-LLM, vLLM and SGLang load it with quant_method "modelopt").

Per quantized Linear `<m>`:

    nvfp4      <m>.weight          uint8 (out, in/2)       lpc's qdata as is (two E2M1 codes a byte, element 2j
                                                           in the low nibble: modelopt's packing)
               <m>.weight_scale    float8_e4m3fn (out, in/16)  lpc's block scales as is
               <m>.weight_scale_2  float32 ()  = amax/(6*448) = lpc's global_scale = 1/compressed-tensors'
                                                           weight_global_scale; w = E2M1(q) * weight_scale * weight_scale_2
               <m>.input_scale     float32 () = act_amax/(6*448), W4A4 only (calibrated)
    fp8_e4m3   <m>.weight          float8_e4m3fn (out, in)  lpc's qdata, per-tensor scale only
               <m>.weight_scale    float32 ()

hf_quant_config.json: {"producer": {...}, "quantization": {"quant_algo": "NVFP4" | "FP8" | "MIXED_PRECISION",
"group_size": 16, "exclude_modules": [...], "quantized_layers": {m: {"quant_algo", "group_size"}} (mixed only),
"kv_cache_quant_algo": null | "FP8"}}; config.json carries the same as `quantization_config` with quant_method
"modelopt". Padded NVFP4 layers (input width not a multiple of 16) are written dense and excluded.
The FP8 KV cache (kv_fp8): kv_cache_quant_algo "FP8" and `<attn>.k_proj.k_scale` / `<attn>.v_proj.v_scale`
f32 () = amax/448 (kv_scales). Everything else (MX, int, BCQ, FGMP, per-channel FP8, rotation, low-rank
paths, other KV caches) is refused naming the layer.

Plain transformers has no modelopt loader: it skips the config and refuses the NVFP4 layers (size
mismatch), but would read FP8 layers without their scale. Load modelopt exports with an engine.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lpc.formats import QTensor, get_format
from lpc.formats.nvfp4 import global_scale_for
from lpc.pipeline.artifact import store as art
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.artifact.shards import ShardWriter
from lpc.pipeline.export.stream import ArtifactLayers
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.export.compressed_tensors import activation_entries, linear_names, model_dtype
from lpc.pipeline.export.kv_scales import MODELOPT_KV_ALGO, attention_modules, check_kv, kv_scales, modelopt_kv_tensors
from lpc.pipeline.export.registry import EXPORTERS
from lpc.pipeline.io.families import engine_layout_refusal
from lpc.pipeline.io.models import copy_tokenizer_files

log = logging.getLogger(__name__)

QUANT_METHOD = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
GROUP = get_format("nvfp4").block_width()  # NVFP4 block width (16)
_HINT = "export with --format compressed-tensors, lpc (every format) or dense (loadable anywhere)"


def check_modelopt(qconfig: dict[str, Any]) -> None:
    """Raise ArtifactError naming the first layer or feature the modelopt layout cannot hold."""
    layout = engine_layout_refusal(qconfig, "modelopt")
    if layout:
        raise ArtifactError(layout, _HINT)
    for name, meta in sorted(qconfig.get("layers", {}).items()):
        fmt, spec = meta.get("format"), meta.get("spec", {})
        if fmt not in ("nvfp4", "fp8_e4m3", "bf16"):
            raise ArtifactError(f"layer {name} is in format '{fmt}', which the modelopt layout here cannot hold "
                                "(it holds nvfp4 and per-tensor fp8_e4m3)", _HINT)
        if fmt == "fp8_e4m3" and spec.get("granularity", "channel") != "tensor":
            per = "per 128x128 block" if spec.get("granularity") == "block" else "per channel"
            raise ArtifactError(f"layer {name} is FP8 with a scale {per}; modelopt's FP8 has one per tensor",
                                "re-quantize with --set quantize.weights.spec.granularity=tensor, or " + _HINT)
        if spec.get("rotate"):
            raise ArtifactError(f"layer {name} ({fmt}) uses a Hadamard rotation, which modelopt cannot undo", _HINT)
    check_kv(qconfig.get("kv_cache"), _HINT)  # an engine export never drops a quantized KV cache
    lowrank = sorted((qconfig.get("lowrank") or {}).get("layers") or {})
    if lowrank:
        raise ArtifactError(f"layer {lowrank[0]} has a low-rank residual path, which modelopt cannot hold",
                            "export with --format peft (dense base + LoRA adapter), lpc or dense")
    for name, entry in sorted(activation_entries(qconfig).items()):
        if entry.get("format") != "nvfp4" or entry.get("global_amax") is None:
            raise ArtifactError(f"activation quantization of layer {name} ({entry.get('format')}) has no modelopt "
                                "form: only calibrated NVFP4 activations (input_scale) do", _HINT)


def layer_tensors(q: QTensor, act: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], str]:
    """One quantized layer -> its modelopt tensors and quant_algo."""
    if q.format == "fp8_e4m3":
        return {"weight": q.data["qdata"].reshape(q.shape).contiguous(),
                "weight_scale": q.data["scale"].to(torch.float32).reshape(())}, "FP8"
    out = {"weight": q.data["qdata"].contiguous(), "weight_scale": q.data["scale"].to(torch.float8_e4m3fn).contiguous(),
           "weight_scale_2": q.data["global_scale"].to(torch.float32).reshape(())}
    if act is not None:
        out["input_scale"] = global_scale_for(torch.tensor(float(act["global_amax"]))).to(torch.float32).reshape(())
    return out, "NVFP4"


def quant_section(algos: dict[str, str], exclude: list[str], kv: bool = False) -> dict[str, Any]:
    """The `quantization` section of hf_quant_config.json for layers {name: quant_algo} (+ the FP8 KV cache)."""
    used = sorted(set(algos.values()))
    if not used and not kv:
        raise ArtifactError("no layer of the artifact can be written in modelopt's layout", _HINT)
    section: dict[str, Any] = {"quant_algo": (used[0] if len(used) == 1 else "MIXED_PRECISION") if used else None,
                               "kv_cache_quant_algo": MODELOPT_KV_ALGO if kv else None,
                               "exclude_modules": list(exclude)}
    if len(used) == 1 and used[0] == "NVFP4":
        section["group_size"] = GROUP
    if len(used) > 1:
        section["quantized_layers"] = {n: ({"quant_algo": a, "group_size": GROUP} if a == "NVFP4" else {"quant_algo": a})
                                       for n, a in sorted(algos.items())}
    return section


def write_modelopt(src: Path, tmp: Path) -> dict[str, Any]:
    """Write the modelopt form of the lpc artifact `src` into `tmp`; returns summary fields."""
    qconfig = read_qconfig(src)
    if qconfig is None:
        raise ArtifactError(f"{src} holds no lpc quantization_config: nothing to export as modelopt",
                            "export the output of lpc quantize")
    check_modelopt(qconfig)
    config = json.loads((Path(src) / "config.json").read_text())
    acts = activation_entries(qconfig)
    writer = ShardWriter(tmp, None)
    walk = ArtifactLayers(Path(src), qconfig)  # one layer read, converted and spilled at a time
    algos, dense, padded = {}, [], []
    for name, q in walk:
        if q.format == "bf16" or (q.format == "nvfp4" and q.shape[-1] % GROUP):
            writer.add({f"{name}.weight": get_format(q.format).dequantize(q).to(model_dtype(config))})
            dense.append(name)
            padded += [name] if q.format != "bf16" else []
            continue
        fields, algos[name] = layer_tensors(q, acts.get(name))
        writer.add({f"{name}.{k}": v for k, v in fields.items()})
    if padded:
        log.warning("modelopt export: padded NVFP4 layers written dense and excluded: %s", ", ".join(dense))
    copy, aux = walk.rest()
    writer.add_entries(copy)
    linears, kv = linear_names(Path(src)), bool(qconfig.get("kv_cache"))
    if kv:
        writer.add(modelopt_kv_tensors(kv_scales(aux, attention_modules(linears))))
    section = quant_section(algos, [n for n in linears if n not in algos], kv)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, **section}
    art.write_json(tmp / "config.json", config)
    art.write_json(tmp / HF_QUANT_CONFIG, {"producer": {"name": "lpc", "version": art.lpc_version()},
                                           "quantization": section})
    writer.close(metadata={"format": "pt"})
    copy_tokenizer_files(src, tmp)
    return {"quant_algo": section["quant_algo"], "kv_cache_quant_algo": section["kv_cache_quant_algo"],
            "dense_layers": dense,
            "dropped": [f"activation quantization of the dense layers: {', '.join(n for n in dense if n in acts)}"]
            if any(n in acts for n in dense) else []}


def dequantize_layer(fields: dict[str, torch.Tensor]) -> torch.Tensor:
    """modelopt tensors of one layer -> fp32 weight (the reading-back reference used by verify and tests).

    NVFP4: E2M1(weight nibbles) * weight_scale (per 16) * weight_scale_2; FP8: weight * weight_scale."""
    from lpc.formats.numerics import e2m1_decode, unpack_nibbles

    w = fields["weight"]
    if w.dtype == torch.float8_e4m3fn:
        return w.to(torch.float32) * fields["weight_scale"].to(torch.float32)
    vals = e2m1_decode(unpack_nibbles(w)).to(torch.float32)
    step = fields["weight_scale"].to(torch.float32) * fields["weight_scale_2"].to(torch.float32)  # per block
    return vals * step.repeat_interleave(GROUP, dim=-1)


EXPORTERS.add("modelopt", write_modelopt)
