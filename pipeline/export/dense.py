"""`--format dense`: dequantized weights (low-rank paths merged) as a plain Hugging Face model that any
tool loads; simulated activation and KV cache quantization cannot be expressed and are reported as dropped."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.export.registry import EXPORTERS
from lpc.pipeline.io.models import copy_tokenizer_files

log = logging.getLogger(__name__)


def write_dense(src: Path, tmp: Path) -> dict[str, Any]:
    qconfig = read_qconfig(src) or {}
    if _streamable(qconfig):
        _write_streamed(Path(src), tmp, qconfig)
    else:  # low-rank paths to merge, Conv1D or MoE layouts: through the loaded model
        model, _ = load(src, activations=False, merge_lowrank=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
    copy_tokenizer_files(src, tmp)
    dropped = []
    if qconfig.get("activations"):
        dropped.append("activation quantization (a dense model has none; evaluate the lpc artifact for W+A)")
        log.warning("dense export drops the simulated activation quantization")
    if qconfig.get("kv_cache"):
        dropped.append("KV cache quantization (a dense model keeps a plain cache; export compressed-tensors or "
                       "modelopt for an engine's FP8 KV cache)")
        log.warning("dense export drops the KV cache quantization")
    return {"dropped": dropped}


def _streamable(qconfig: dict[str, Any]) -> bool:
    return bool(qconfig) and not qconfig.get("lowrank") and not qconfig.get("transposed") \
        and not qconfig.get("experts")


def _write_streamed(src: Path, tmp: Path, qconfig: dict[str, Any]) -> None:
    """One quantized layer dequantized at a time (fields read through mmap), every other tensor copied
    from the artifact's file(s) tensor by tensor; the same tensors as saving the loaded model."""
    import torch

    from lpc.formats import get_format
    from lpc.pipeline.artifact.lpc_model import AUX_PREFIX
    from lpc.pipeline.artifact.shards import ModelTensors, ShardWriter
    from lpc.pipeline.io.models import model_from_config

    skeleton = model_from_config(src, empty=True)
    dtype = next(p.dtype for p in skeleton.parameters() if p.is_floating_point())
    store = ModelTensors(src)
    entries = store.entries()
    layers = qconfig.get("layers", {})
    owned = {f"{n}.{f}" for n in layers for f in _fields(entries, n)}
    writer = ShardWriter(tmp)
    for key, e in entries.items():
        marker = key.endswith(".weight") and e.dtype == torch.uint8 and e.shape == (0,)
        if key in owned or key.startswith(AUX_PREFIX) or marker:
            continue
        if e.dtype == dtype or not e.dtype.is_floating_point:
            writer.add_entries({key: e})
        else:
            writer.add({key: e.load().to(dtype)})
    for name, meta in layers.items():
        fields = {f: store.get(f"{name}.{f}") for f in _fields(entries, name)}
        fields.update({f: store.get(k) for f, k in meta.get("shared", {}).items()})
        fmt = get_format(meta["format"])
        writer.add({f"{name}.weight": fmt.dequantize(fmt.unpack(fields, meta)).to(dtype)})
    writer.close(metadata={"format": "pt"})
    config = skeleton.config
    config.dtype = dtype
    config.save_pretrained(str(tmp))
    if getattr(skeleton, "generation_config", None) is not None and skeleton.can_generate():
        skeleton.generation_config.save_pretrained(str(tmp))


def _fields(entries: dict[str, Any], name: str) -> list[str]:
    from lpc.pipeline.artifact.lpc_model import PATH_FIELDS

    out = []
    for k in entries:
        rest = k[len(name) + 1:]
        if k.startswith(name + ".") and "." not in rest and rest not in PATH_FIELDS:
            out.append(rest)
    return out


EXPORTERS.add("dense", write_dense)
