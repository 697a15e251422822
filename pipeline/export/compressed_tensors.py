"""`lpc export --format compressed-tensors`: an lpc artifact rewritten in compressed-tensors' layout.

The export is a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` (through
transformers' compressed-tensors integration) and engines such as vLLM load. Each quantized Linear is
written in compressed-tensors' layout of its format (ct_layouts: NVFP4 W4A16/W4A4, FP8 per tensor or per
channel, MXFP4, MXFP8, VS-Quant int4/int8 as group-quantized "pack-quantized"), each as lpc's own bytes
wherever the layouts agree, and the FP8 KV cache as `kv_cache_scheme` with per-layer `k_scale`/`v_scale`
(kv_scales).

config.json's `quantization_config` holds one config group per scheme. One group targets "Linear" and
`format` names its compressor; several groups target their exact layer names and `format` is
"mixed-precision" with a format per group. `ignore` lists every Linear that is not quantized (lm_head,
layers lpc left alone, layers written dense).

Padded layers: lpc zero-pads a block-format layer whose input width is not a multiple of its block
(stories260K's down_proj, 172 inputs). compressed-tensors cannot hold such a layer: its module layout
expects the Linear's own width, and its group dequantization refuses a width that is not a multiple of
the group size. Such layers are written dequantized, in the dtype config.json declares, as a plain
`<m>.weight`, listed in `ignore` and reported under `dense_layers` (same weights as lpc, less
compression; their activation quantization, if any, is dropped and reported).

dtype: compressed-tensors decompresses NVFP4/MX to bfloat16, so a float32 model with such layers is
declared bfloat16 in config.json (see runtime_dtype); `lpc.load(export, dtype=torch.float32)` and
`ct_runtime.settle(model)` after a float32 `from_pretrained` give float32 weights. Formats and features
with no compressed-tensors form (bcq, fgmp, fp8_e5m2, Hadamard rotation, low-rank paths, other
activation formats, non-FP8 or non-static KV caches) are refused with an ArtifactError naming the layer.
"""
from __future__ import annotations

import json
import math
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lpc.formats import QTensor, get_format
from lpc.pipeline.artifact import store as art
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.export.ct_layouts import (  # noqa: F401 (the layouts are part of this module's API)
    BF16_DECOMPRESSED, FP8_FORMAT, GROUP, INT_FORMAT, MX_GROUP, MXFP4_FORMAT, MXFP8_FORMAT, NVFP4_FORMAT, SCHEMES,
    fp8_tensors, int_tensors, layer_tensors, mx_tensors, nvfp4_tensors, reciprocal_scale,
)
from lpc.pipeline.export.ct_experts import check_expert_schemes, expert_names_for, layer_names, per_expert
from lpc.pipeline.export.kv_scales import CT_KV_SCHEME, attention_modules, check_kv, ct_kv_tensors, kv_scales
from lpc.pipeline.export.registry import EXPORTERS
from lpc.pipeline.artifact.lpc_model import AUX_PREFIX, WEIGHTS, read_qconfig, read_qtensors
from lpc.pipeline.artifact.shards import ShardWriter
from lpc.pipeline.export.stream import ArtifactLayers
from lpc.pipeline.io.families import engine_layout_refusal, routers
from lpc.pipeline.io.models import copy_tokenizer_files, model_from_config

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
MIXED_FORMAT = "mixed-precision"
# bf16 (a format search's "keep it") is written as a plain weight and listed in `ignore`.
SUPPORTED = ("nvfp4", "mxfp4", "mxfp8", "fp8_e4m3", "int", "bf16")
_HINT = "export with --format lpc (every format) or --format dense (loadable anywhere)"


# Fields of a converted layer that describe it rather than store its weight (not counted in bits/weight).
NOT_WEIGHT_FIELDS = ("input_global_scale", "weight_shape")


def written_dense(q: QTensor) -> bool:
    """Whether the layer is written as a plain dequantized weight: bf16 (kept), or padded blocks."""
    return dense_layout(q.format, q.spec, q.shape)


def dense_layout(fmt: str, spec: dict[str, Any], shape) -> bool:
    """`written_dense` from a layer's meta (format, spec, shape), before reading it."""
    return bool(shape[-1] % _block_width(fmt, spec)) or fmt == "bf16"


def block_of(q: QTensor) -> int:
    """Width a layer's inputs must be a multiple of to be held as is (1 for per-channel formats)."""
    return _block_width(q.format, q.spec)


def _block_width(fmt: str, spec: dict[str, Any]) -> int:
    return get_format(fmt).block_width(**spec) or 1


@dataclass
class Converted:
    """The tensors of the export and which scheme (or dense) each quantized layer got."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    schemes: dict[str, str] = field(default_factory=dict)  # layer -> key of SCHEMES
    dense: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def write_compressed_tensors(src: Path, tmp: Path) -> dict[str, Any]:
    """Write the compressed-tensors form of the lpc artifact `src` into `tmp`; returns summary fields.

    Reads src/config.json and src's weights; writes tmp/config.json, tmp/model.safetensors and the
    tokenizer files. Raises ArtifactError for what compressed-tensors cannot hold. One layer is read
    and converted at a time (its tensors spill to the staging directory), unchanged tensors are copied
    from src when the file is assembled: memory stays one layer whatever the model's size. MoE experts
    (renamed per expert across layers) are converted in memory."""
    qconfig = read_qconfig(src)
    if qconfig is None:
        raise ArtifactError(f"{src} holds no lpc quantization_config: nothing to export as compressed-tensors",
                            "export the output of lpc quantize or lpc compensate")
    config = json.loads((Path(src) / "config.json").read_text())
    check_exportable(qconfig)
    linears = linear_names(Path(src))
    kv = bool(qconfig.get("kv_cache"))
    if qconfig.get("experts"):
        conv, qtensors, plain = _convert_whole(Path(src), qconfig, config)
        if kv:
            conv.tensors.update(ct_kv_tensors(kv_scales(plain, attention_modules(linears))))
        ignore = moe_layout(Path(src), config, qconfig["experts"], conv,
                            [n for n in linears if n not in conv.schemes])
        art.save_tensors(conv.tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        schemes, dense, dropped, bits = conv.schemes, conv.dense, conv.dropped, stored_bits(conv.tensors, qtensors)
    else:
        writer = ShardWriter(tmp, None)
        schemes, dense, dropped, bits, aux = _convert_streamed(Path(src), qconfig, config, writer)
        if kv:
            writer.add(ct_kv_tensors(kv_scales(aux, attention_modules(linears))))
        writer.close(metadata={"format": "pt"})
        ignore = [n for n in linears if n not in schemes]
    config["quantization_config"] = ct_config(schemes, ignore, kv)
    art.write_json(tmp / "config.json", config)
    copy_tokenizer_files(src, tmp)
    counts = {k: sum(v == k for v in schemes.values()) for k in sorted(set(schemes.values()))}
    return {"ct_format": config["quantization_config"]["format"], "schemes": counts, "dense_layers": dense,
            "dtype": str(model_dtype(config)).removeprefix("torch."), "bits_per_weight": bits,
            "dropped": dropped}


def _convert_whole(src: Path, qconfig: dict[str, Any], config: dict[str, Any]
                   ) -> tuple[Converted, dict[str, QTensor], dict[str, torch.Tensor]]:
    """Every layer converted in memory; (converted, the QTensors, the artifact's plain tensors)."""
    qtensors, plain = read_qtensors(src, qconfig)
    conv = convert_layers(qtensors, activation_entries(qconfig))
    dtype = runtime_dtype(config, conv.schemes)
    for name in conv.dense:
        conv.tensors[f"{name}.weight"] = conv.tensors[f"{name}.weight"].to(getattr(torch, dtype))
    conv.tensors.update({k: v for k, v in plain.items() if not k.startswith(AUX_PREFIX)})
    return conv, qtensors, plain


def _convert_streamed(src: Path, qconfig: dict[str, Any], config: dict[str, Any], writer: ShardWriter
                      ) -> tuple[dict[str, str], list[str], list[str], float, dict[str, torch.Tensor]]:
    """Layer by layer into `writer`; (schemes, dense layers, dropped features, bits per weight, the
    artifact's auxiliary `lpc.*` tensors). Bytes equal `_convert_whole`'s."""
    walk = ArtifactLayers(src, qconfig)
    acts = activation_entries(qconfig)
    schemes: dict[str, str] = {}
    later: dict[str, str] = {}  # layers written dense (name -> format): their dtype is known once every
    stored, numel = 0, 0       # scheme is, so they are read again then, one at a time
    for name in sorted(walk.layers):
        meta = walk.layers[name]
        if dense_layout(meta["format"], meta.get("spec", {}), meta["shape"]):
            later[name] = meta["format"]
            numel += math.prod(meta["shape"])
            continue
        q = walk.layer(name)
        numel += q.numel
        fields, schemes[name] = layer_tensors(q, acts.get(name))
        stored += sum(t.numel() * t.element_size() for k, t in fields.items() if k not in NOT_WEIGHT_FIELDS)
        writer.add({f"{name}.{k}": v for k, v in fields.items()})
    dtype = getattr(torch, runtime_dtype(config, schemes))
    for name in later:
        q = walk.layer(name)
        w = get_format(q.format).dequantize(q).to(torch.float32).to(dtype)
        stored += w.numel() * w.element_size()
        writer.add({f"{name}.weight": w})
    dense = sorted(later)
    dropped = _report_dense(dense, later, acts)
    copy, aux = walk.rest()
    writer.add_entries(copy)
    return schemes, dense, dropped, stored * 8 / max(numel, 1), aux


def _report_dense(dense: list[str], formats: dict[str, str], acts: dict[str, dict[str, Any]]) -> list[str]:
    """Warn about block-format layers written dense and activation quantization dropped with them."""
    dropped = []
    padded = [n for n in dense if formats[n] != "bf16"]
    if padded:
        log.warning("compressed-tensors export: %d block-format layer(s) whose input width is not a multiple of "
                    "their block written dequantized (%s): compressed-tensors cannot hold padded blocks",
                    len(padded), ", ".join(padded))
    lost = [n for n in dense if n in acts]
    if lost:
        dropped.append(f"activation quantization of the layers written dense: {', '.join(lost)}")
        log.warning("compressed-tensors export: %s", dropped[-1])
    return dropped


def moe_layout(src: Path, config: dict[str, Any], blocks: list[str], conv: Converted, ignore: list[str]) -> list[str]:
    """Rename the export's MoE experts to the family's per-expert checkpoint names (ct_experts), in place;
    returns `ignore` in checkpoint names, with the routers and shared-expert gates added."""
    names = expert_names_for(config, "compressed-tensors")
    check_expert_schemes(conv, blocks)
    conv.tensors, conv.schemes, conv.dense = per_expert(conv.tensors, conv.schemes, conv.dense, blocks, names)
    gates = routers(model_from_config(src, empty=True))
    out = [new for n in ignore for new in layer_names(n, blocks, names)]
    return out + [g for n in gates for g in layer_names(n, blocks, names) if g not in out]


def stored_bits(tensors: dict[str, torch.Tensor], qtensors: dict[str, QTensor]) -> float:
    """Bits per weight of the quantized layers as exported (dense fallbacks at their stored width)."""
    bits = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items()
               if k.rpartition(".")[0] in qtensors and k.rpartition(".")[2] not in NOT_WEIGHT_FIELDS)
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
    layout = engine_layout_refusal(qconfig, "compressed-tensors")
    if layout:
        raise ArtifactError(layout, _HINT)
    for name, meta in sorted(qconfig.get("layers", {}).items()):
        fmt = meta.get("format")
        if fmt == "fgmp":
            raise ArtifactError(f"layer {name} is an FGMP block mix (FP8 and NVFP4 blocks inside one tensor), "
                                "which no engine format holds", _HINT)
        if fmt not in SUPPORTED:
            raise ArtifactError(f"layer {name} is in format '{fmt}', which compressed-tensors cannot hold "
                                f"(it holds {', '.join(SUPPORTED)})", _HINT)
        if fmt == "int" and meta.get("spec", {}).get("vector") == 0:
            raise ArtifactError(f"layer {name} is per-channel int (vector: 0), which lpc writes to "
                                "compressed-tensors only as group quantization (vector 16, 32 or 64)", _HINT)
        if meta.get("spec", {}).get("rotate"):
            raise ArtifactError(f"layer {name} ({fmt}) uses a Hadamard rotation (rotate: true), which "
                                "compressed-tensors' formats cannot undo", _HINT)
    check_kv(qconfig.get("kv_cache"), _HINT)  # an engine export never drops a quantized KV cache
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
        if written_dense(q):
            out.tensors[f"{name}.weight"] = get_format(q.format).dequantize(q).to(torch.float32)
            out.dense.append(name)
            continue
        fields, scheme = layer_tensors(q, acts.get(name))
        out.tensors.update({f"{name}.{k}": v for k, v in fields.items()})
        out.schemes[name] = scheme
    out.dropped = _report_dense(out.dense, {n: qtensors[n].format for n in out.dense}, acts)
    return out






def linear_names(src: Path) -> list[str]:
    """Names of the model's nn.Linear modules in module order; the model is built on the meta device from
    src/config.json (no memory, no weights read)."""
    model = model_from_config(src, empty=True)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def unquantized_linears(src: Path, schemes: dict[str, str]) -> list[str]:
    """Names of the model's nn.Linear modules that no config group holds, in module order."""
    return [n for n in linear_names(src) if n not in schemes]


def ct_config(schemes: dict[str, str], ignore: list[str], kv: bool = False) -> dict[str, Any]:
    """The `quantization_config` dict of config.json for layers {name: scheme key} (+ the FP8 KV cache)."""
    used = sorted(set(schemes.values()))
    if not used and not kv:
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
    single = len(formats) <= 1
    config = {"quant_method": QUANT_METHOD, "format": next(iter(formats), "dense") if single else MIXED_FORMAT,
              "quantization_status": "compressed", "config_groups": groups, "ignore": list(ignore),
              "kv_cache_scheme": dict(CT_KV_SCHEME) if kv else None, "global_compression_ratio": None}
    if used and single and not kv and all(SCHEMES[k][2] is None for k in used):
        # transformers then dequantizes at load time into the model's dtype (compressed-tensors' run-time
        # path decompresses NVFP4/MX to bf16 and fails in a float32 model); engines ignore the key.
        # Not for mixed-precision (transformers 5.24 dequantizes every group with one compressor) nor
        # with quantized activations or KV cache (dequantizing drops them).
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
