"""`lpc export --format compressed-tensors`: an lpc artifact rewritten in compressed-tensors' layout.

The export is a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` (through
transformers' compressed-tensors integration) and engines such as vLLM load. Per quantized Linear `<m>`:

    nvfp4      <m>.weight_packed        uint8 (out, in/2)      lpc's qdata as is: two E2M1 codes per
                                                               byte, element 2j in the low nibble, code =
                                                               sign<<3 | index (compressed-tensors' order)
               <m>.weight_scale         float8_e4m3fn (out, in/16)   lpc's block scales as is
               <m>.weight_global_scale  float32 (1,) = 1 / s2 = 6*448/amax   compressed-tensors divides:
                                                               w = E2M1(q) * weight_scale / weight_global_scale
               <m>.input_global_scale   float32 (1,) = 6*448/act_amax, only for W4A4 (calibrated amax)
    fp8_e4m3   <m>.weight               float8_e4m3fn (out, in) lpc's qdata as is ("float-quantized")
               <m>.weight_scale         float32 (out, 1) per channel or (1,) per tensor; w = weight * scale

config.json's `quantization_config` holds one config group per scheme (NVFP4 weights, NVFP4 W4A4, FP8
per channel, FP8 per tensor). One group targets "Linear" and `format` names its compressor; several
groups target their exact layer names and `format` is "mixed-precision" with a format per group.
`ignore` lists every Linear that is not quantized (lm_head, layers lpc left alone, layers written dense).

Padded layers: lpc zero-pads an NVFP4 layer whose input width is not a multiple of 16 (stories260K's
down_proj, 172 inputs). compressed-tensors cannot hold such a layer: its module layout expects
`weight_packed` (out, in/2) with `in` the Linear's own width, and its group dequantization refuses a
width that is not a multiple of the group size. Such layers are written dequantized, in the dtype
config.json declares, as a plain `<m>.weight`, listed in `ignore` and reported under `dense_layers`
(same weights as lpc, less compression; their activation quantization, if any, is dropped and reported).

dtype: compressed-tensors decompresses NVFP4 to bfloat16, so a float32 model with NVFP4 layers is
declared bfloat16 in config.json (see runtime_dtype). Formats and features with no compressed-tensors
form here (mxfp4, mxfp8, int, bcq, fgmp, fp8_e5m2, Hadamard rotation, low-rank paths, other activation
formats) are refused with an ArtifactError naming the layer.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lpc.formats import QTensor, get_format
from lpc.formats.nvfp4 import global_scale_for
from lpc.pipeline.artifact import store as art
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.export.registry import EXPORTERS
from lpc.pipeline.artifact.lpc_model import AUX_PREFIX, WEIGHTS, read_qconfig, read_qtensors
from lpc.pipeline.io.models import copy_tokenizer_files, model_from_config

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
NVFP4_FORMAT = "nvfp4-pack-quantized"
FP8_FORMAT = "float-quantized"
MXFP4_FORMAT = "mxfp4-pack-quantized"
MXFP8_FORMAT = "mxfp8-quantized"
MIXED_FORMAT = "mixed-precision"
GROUP = get_format("nvfp4").block_width()  # NVFP4 block width (16)
MX_GROUP = get_format("mxfp4").block_width()  # MXFP4 / MXFP8 block width (32)
# Width a layer's inputs must be a multiple of to be held as is; per-channel formats: any.
# bf16 (a format search's "keep it") is written as a plain weight and listed in `ignore`.
BLOCK = {f: get_format(f).block_width() or 1 for f in ("nvfp4", "mxfp4", "mxfp8", "fp8_e4m3", "bf16")}
SUPPORTED = tuple(BLOCK)
_HINT = "export with --format lpc (every format) or --format dense (loadable anywhere)"

_NVFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP,
               "strategy": "tensor_group", "scale_dtype": "torch.float8_e4m3fn"}
# Each scheme: (format, weights args, input activation args or None).
SCHEMES: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "nvfp4a16": (NVFP4_FORMAT, {**_NVFP4_ARGS, "dynamic": False}, None),
    "nvfp4": (NVFP4_FORMAT, {**_NVFP4_ARGS, "dynamic": False},
              {**_NVFP4_ARGS, "dynamic": "local", "observer": "static_minmax"}),
    "fp8_channel": (FP8_FORMAT, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                                 "dynamic": False}, None),
    "fp8_tensor": (FP8_FORMAT, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                "dynamic": False}, None),
    "mxfp4a16": (MXFP4_FORMAT, {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
                                "group_size": MX_GROUP, "dynamic": False, "scale_dtype": "torch.uint8",
                                "zp_dtype": "torch.uint8"}, None),
    "mxfp8a16": (MXFP8_FORMAT, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                "group_size": MX_GROUP, "dynamic": False, "scale_dtype": "torch.uint8",
                                "zp_dtype": "torch.uint8"}, None),
}
# Formats compressed-tensors decompresses to bfloat16 whatever the model's dtype.
BF16_DECOMPRESSED = ("nvfp4a16", "nvfp4", "mxfp4a16", "mxfp8a16")


@dataclass
class Converted:
    """The tensors of the export and which scheme (or dense) each quantized layer got."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    schemes: dict[str, str] = field(default_factory=dict)  # layer -> key of SCHEMES
    dense: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def write_compressed_tensors(src: Path, tmp: Path) -> dict[str, Any]:
    """Write the compressed-tensors form of the lpc artifact `src` into `tmp`; returns summary fields.

    Reads src/config.json and src/model.safetensors; writes tmp/config.json, tmp/model.safetensors and
    the tokenizer files. Raises ArtifactError for what compressed-tensors cannot hold.
    """
    qconfig = read_qconfig(src)
    if qconfig is None:
        raise ArtifactError(f"{src} holds no lpc quantization_config: nothing to export as compressed-tensors",
                            "export the output of lpc quantize or lpc compensate")
    config = json.loads((Path(src) / "config.json").read_text())
    check_exportable(qconfig)
    qtensors, plain = read_qtensors(Path(src), qconfig)
    conv = convert_layers(qtensors, activation_entries(qconfig))
    dtype = runtime_dtype(config, conv.schemes)
    for name in conv.dense:
        conv.tensors[f"{name}.weight"] = conv.tensors[f"{name}.weight"].to(getattr(torch, dtype))
    conv.tensors.update({k: v for k, v in plain.items() if not k.startswith(AUX_PREFIX)})
    config["quantization_config"] = ct_config(conv.schemes, unquantized_linears(Path(src), conv.schemes))
    art.write_json(tmp / "config.json", config)
    art.save_tensors(conv.tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    copy_tokenizer_files(src, tmp)
    counts = {k: sum(v == k for v in conv.schemes.values()) for k in sorted(set(conv.schemes.values()))}
    return {"ct_format": config["quantization_config"]["format"], "schemes": counts, "dense_layers": conv.dense,
            "dtype": dtype, "bits_per_weight": stored_bits(conv.tensors, qtensors), "dropped": conv.dropped}


def stored_bits(tensors: dict[str, torch.Tensor], qtensors: dict[str, QTensor]) -> float:
    """Bits per weight of the quantized layers as exported (dense fallbacks at their stored width)."""
    bits = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items()
               if k.rpartition(".")[0] in qtensors and not k.endswith(".input_global_scale"))
    return bits / max(sum(q.numel for q in qtensors.values()), 1)


def runtime_dtype(config: dict[str, Any], schemes: dict[str, str]) -> str:
    """Set (and return) the dtype config.json asks loaders for: bfloat16 for a float32 model with NVFP4.

    compressed-tensors decompresses NVFP4 weights to bfloat16 whatever the model dtype (its unpacking
    defaults to bfloat16), so a float32 model fails on its first forward (float input, bf16 weight);
    NVFP4 engines run bf16/fp16 anyway. Unquantized tensors keep their stored dtype (loaders cast them)."""
    name = str(model_dtype(config)).removeprefix("torch.")
    if name == "float32" and any(k in BF16_DECOMPRESSED for k in schemes.values()):
        log.warning("compressed-tensors export: the float32 model is declared bfloat16 in config.json "
                    "(compressed-tensors decompresses NVFP4/MX weights to bfloat16; dtype=torch.float32 "
                    "loads of weight-only exports work too: see `dequantize` in ct_config)")
        name = "bfloat16"
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return name


def check_exportable(qconfig: dict[str, Any]) -> None:
    """Raise ArtifactError naming the first layer whose format, spec or extra path has no CT form."""
    for name, meta in sorted(qconfig.get("layers", {}).items()):
        fmt = meta.get("format")
        if fmt == "fgmp":
            raise ArtifactError(f"layer {name} is an FGMP block mix (FP8 and NVFP4 blocks inside one tensor), "
                                "which no engine format holds", _HINT)
        if fmt not in SUPPORTED:
            raise ArtifactError(f"layer {name} is in format '{fmt}', which compressed-tensors cannot hold "
                                f"(it holds {', '.join(SUPPORTED)})", _HINT)
        if meta.get("spec", {}).get("rotate"):
            raise ArtifactError(f"layer {name} ({fmt}) uses a Hadamard rotation (rotate: true), which "
                                "compressed-tensors' formats cannot undo", _HINT)
    if qconfig.get("kv_cache"):  # compressed-tensors' kv_cache_scheme is not written yet: never drop it silently
        raise ArtifactError(f"the artifact quantizes the KV cache ({qconfig['kv_cache'].get('format')}), which this "
                            "compressed-tensors export does not write yet", _HINT)
    lowrank = sorted((qconfig.get("lowrank") or {}).get("layers") or {})
    if lowrank:
        raise ArtifactError(f"layer {lowrank[0]} has a low-rank residual path, which compressed-tensors "
                            "cannot hold", "export with --format peft (dense base + LoRA adapter), lpc or dense")
    for name, entry in sorted(activation_entries(qconfig).items()):
        _check_activation(name, entry, qconfig.get("layers", {}).get(name, {}).get("format"))


def _check_activation(name: str, entry: dict[str, Any], weight_fmt: str | None) -> None:
    """CT's NVFP4 W4A4 scheme runs NVFP4 inputs with plain amax block scales and a static global scale."""
    spec = entry.get("spec") or {}
    plain = spec.get("clip", "none") == "none" and not spec.get("scale_search") and not spec.get("rotate")
    if entry.get("format") != "nvfp4" or weight_fmt != "nvfp4" or not plain:
        raise ArtifactError(f"activation quantization of layer {name} (format '{entry.get('format')}', spec "
                            f"{spec} on {weight_fmt} weights) has no compressed-tensors form: only plain NVFP4 "
                            "activations on NVFP4 weights do", _HINT)
    if entry.get("global_amax") is None:
        raise ArtifactError(f"NVFP4 activations of layer {name} have no calibrated global amax, which "
                            "compressed-tensors needs as input_global_scale",
                            "re-run lpc quantize with --calib, or " + _HINT)


def activation_entries(qconfig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer: lpc activation entry} of the artifact ({} when activations are not quantized)."""
    return dict((qconfig.get("activations") or {}).get("layers") or {})


def model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype lpc's load() gives the model: config.json's dtype, else float32."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."))


def convert_layers(qtensors: dict[str, QTensor], acts: dict[str, dict[str, Any]]) -> Converted:
    """Each QTensor -> its compressed-tensors tensors (or a dense float32 `<m>.weight` when padded)."""
    out = Converted()
    for name in sorted(qtensors):
        q = qtensors[name]
        if q.shape[-1] % BLOCK[q.format] or q.format == "bf16":
            out.tensors[f"{name}.weight"] = get_format(q.format).dequantize(q).to(torch.float32)
            out.dense.append(name)
            continue
        if q.format == "nvfp4":
            fields, scheme = nvfp4_tensors(q, acts.get(name))
        elif q.format in ("mxfp4", "mxfp8"):
            fields, scheme = mx_tensors(q)
        else:
            fields, scheme = fp8_tensors(q)
        out.tensors.update({f"{name}.{k}": v for k, v in fields.items()})
        out.schemes[name] = scheme
    padded = [n for n in out.dense if qtensors[n].format != "bf16"]
    if padded:
        log.warning("compressed-tensors export: %d block-format layer(s) whose input width is not a multiple of "
                    "their block written dequantized (%s): compressed-tensors cannot hold padded blocks",
                    len(padded), ", ".join(padded))
    lost = [n for n in out.dense if n in acts]
    if lost:
        out.dropped.append(f"activation quantization of the layers written dense: {', '.join(lost)}")
        log.warning("compressed-tensors export: %s", out.dropped[-1])
    return out


def reciprocal_scale(s: torch.Tensor) -> torch.Tensor:
    """lpc's per-tensor scale s (amax/(6*448), f32 (1,)) -> CT's global scale 1/s as f32 (1,).

    The division is done in float64 so the result is the correctly rounded f32 reciprocal."""
    return (1.0 / s.to(torch.float64)).to(torch.float32).reshape(1)


def nvfp4_tensors(q: QTensor, act: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], str]:
    """NVFP4 QTensor (in a multiple of 16) -> weight_packed u8 (out, in/2), weight_scale f8e4m3
    (out, in/16), weight_global_scale f32 (1,) [, input_global_scale f32 (1,)] and its scheme key."""
    out = {"weight_packed": q.data["qdata"].contiguous(),
           "weight_scale": q.data["scale"].to(torch.float8_e4m3fn).contiguous(),
           "weight_global_scale": reciprocal_scale(q.data["global_scale"])}
    if act is None:
        return out, "nvfp4a16"
    # lpc's activation quantizer uses s2 = global_scale_for(amax); CT divides by its reciprocal
    out["input_global_scale"] = reciprocal_scale(global_scale_for(torch.tensor(float(act["global_amax"]))))
    return out, "nvfp4"


def mx_tensors(q: QTensor) -> tuple[dict[str, torch.Tensor], str]:
    """MXFP4 / MXFP8 QTensor (in a multiple of 32) -> compressed-tensors' MX layout and scheme key:
    mxfp4: weight_packed u8 (out, in/2) = lpc's qdata (same nibble order), weight_scale u8 (out, in/32)
    = lpc's biased E8M0 exponents; mxfp8: weight f8e4m3 (out, in) = lpc's qdata, weight_scale as above."""
    scale = q.data["scale"].to(torch.uint8).contiguous()
    if q.format == "mxfp4":
        return {"weight_packed": q.data["qdata"].contiguous(), "weight_scale": scale}, "mxfp4a16"
    return {"weight": q.data["qdata"].view(torch.float8_e4m3fn).reshape(q.shape).contiguous(),
            "weight_scale": scale}, "mxfp8a16"


def fp8_tensors(q: QTensor) -> tuple[dict[str, torch.Tensor], str]:
    """fp8_e4m3 QTensor -> weight f8e4m3 (out, in), weight_scale f32 (out, 1) or (1,), scheme key."""
    scale = q.data["scale"].to(torch.float32)
    per_tensor = scale.numel() == 1
    out = {"weight": q.data["qdata"].reshape(q.shape).contiguous(),
           "weight_scale": scale.reshape(1) if per_tensor else scale.reshape(-1, 1).contiguous()}
    return out, "fp8_tensor" if per_tensor else "fp8_channel"


def unquantized_linears(src: Path, schemes: dict[str, str]) -> list[str]:
    """Names of the model's nn.Linear modules that no config group holds, in module order.

    The model is built on the meta device from src/config.json (no memory, no weights read)."""
    model = model_from_config(src, empty=True)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in schemes]


def ct_config(schemes: dict[str, str], ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` dict of config.json for layers {name: scheme key}."""
    used = sorted(set(schemes.values()))
    if not used:
        raise ArtifactError("no layer of the artifact can be written in compressed-tensors' packed form",
                            _HINT)
    groups = {}
    for i, key in enumerate(used):
        fmt, weights, inputs = SCHEMES[key]
        targets = ["Linear"] if len(used) == 1 else [n for n in sorted(schemes) if schemes[n] == key]
        groups[f"group_{i}"] = {"targets": targets, "weights": dict(weights), "input_activations":
                                None if inputs is None else dict(inputs), "output_activations": None,
                                "format": fmt}
    formats = {SCHEMES[k][0] for k in used}
    single = len(formats) == 1
    config = {"quant_method": QUANT_METHOD, "format": next(iter(formats)) if single else MIXED_FORMAT,
              "quantization_status": "compressed", "config_groups": groups, "ignore": list(ignore),
              "kv_cache_scheme": None, "global_compression_ratio": None}
    if single and all(SCHEMES[k][2] is None for k in used):
        # transformers then dequantizes at load time into the model's dtype (compressed-tensors' run-time
        # path decompresses NVFP4/MX to bf16 and fails in a float32 model); engines ignore the key.
        # Not for mixed-precision (transformers 5.24 dequantizes every group with one compressor) nor
        # with quantized activations (dequantizing drops them).
        config["dequantize"] = True
    return validated(config)


def validated(config: dict[str, Any]) -> dict[str, Any]:
    """The config, checked by compressed-tensors' own QuantizationConfig where the package is installed."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return config
    try:
        QuantizationConfig.model_validate({k: v for k, v in config.items() if k != "dequantize"})
    except ValueError as err:
        raise ArtifactError(f"compressed-tensors refuses the export's quantization_config: {err}", _HINT) from None
    return config


def expressible(qconfig: dict[str, Any]) -> str | None:
    """None when compressed-tensors holds every quantized layer of the artifact, else the reason why not."""
    try:
        check_exportable(qconfig)
    except ArtifactError as err:
        return err.args[0] if err.args else str(err)
    return None


EXPORTERS.add("compressed-tensors", write_compressed_tensors)
