"""The `lpc` model directory: a Hugging Face model dir whose model.safetensors holds packed fields.

config.json carries `quantization_config = {"quant_method": "lpc", "layers": {name: meta}, ...}` where
meta is a QTensor's meta (format, shape, spec). Tensors: `<m>.qdata`, `<m>.scale`, ... per quantized
Linear `<m>`, every other tensor unchanged.

`<m>.weight` of a quantized Linear is a *marker*: an empty uint8 tensor of shape (0,). Its only job is
to make a loader that does not know lpc fail loudly: transformers without `import lpc` (which registers
the lpc quantizer, artifact/hf_quantizer.py) refuses the checkpoint with a size mismatch instead of
silently leaving that Linear at its random initialization. lpc's readers drop markers (read_qtensors).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Collection

import torch
from torch import nn

from lpc.formats import QTensor, get_format, stored_bits
from lpc.pipeline.artifact.store import save_tensors, write_json
from lpc.pipeline.errors import ArtifactError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
QUANT_METHOD = "lpc"
# Per-layer tensors that belong to the Linear or its low-rank path, not to its weight format.
PATH_FIELDS = ("bias", "weight", "lora_A", "lora_B")
# Auxiliary tensors (activation-plan statistics and the like) live under this key prefix.
AUX_PREFIX = "lpc."
# Format fields that many layers may hold identically (LO-BCQ's model-wide codebooks): stored once.
SHARED_FIELDS = ("codebook",)
SHARED_PREFIX = AUX_PREFIX + "shared."


def weight_marker() -> torch.Tensor:
    """The `<m>.weight` stored for a Linear whose weight lives in packed fields: uint8 (0,)."""
    return torch.zeros(0, dtype=torch.uint8)


def is_weight_marker(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.dtype == torch.uint8 and t.numel() == 0


def dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """state_dict without tied duplicates (safetensors refuses shared storage); returns dropped names."""
    out, seen, dropped = {}, {}, []
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            dropped.append(name)
            continue
        if key is not None:
            seen[key] = name
        out[name] = t
    return out, dropped


def share_fields(qtensors: dict[str, QTensor]) -> tuple[dict[str, dict[str, str]], dict[str, torch.Tensor]]:
    """Fields in SHARED_FIELDS that two or more layers hold bit for bit, to be stored once.

    Returns (refs: layer -> {field: key}, shared: key -> tensor); keys are `lpc.shared.<field>.<i>`
    in first-use order over sorted layer names (deterministic).
    """
    return share_tensors({n: {f: q.data[f] for f in SHARED_FIELDS if f in q.data} for n, q in qtensors.items()})


def share_tensors(fields: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, dict[str, str]], dict[str, torch.Tensor]]:
    """`share_fields` over the shareable fields alone (layer -> {field: tensor}): what a streamed quantize
    keeps of each layer (a few hundred bytes) to store them once at the end."""
    groups: dict[tuple[str, str], list[str]] = {}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for name in sorted(fields):
        for field in SHARED_FIELDS:
            t = fields[name].get(field)
            if t is None:
                continue
            digest = hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                                    + str((t.dtype, tuple(t.shape))).encode()).hexdigest()
            groups.setdefault((field, digest), []).append(name)
            tensors[(field, digest)] = t
    refs: dict[str, dict[str, str]] = {}
    shared: dict[str, torch.Tensor] = {}
    for i, (gk, names) in enumerate(g for g in groups.items() if len(g[1]) > 1):
        key = f"{SHARED_PREFIX}{gk[0]}.{i}"
        shared[key] = tensors[gk]
        for name in names:
            refs.setdefault(name, {})[gk[0]] = key
    return refs, shared


def shared_bits(qtensors: dict[str, QTensor]) -> tuple[int, dict[str, int]]:
    """(bits of the shared tensors, counted once; per layer, the bits its shared fields would cost)."""
    refs, shared = share_fields(qtensors)
    per_layer = {n: stored_bits(*(qtensors[n].data[f] for f in r)) for n, r in refs.items()}
    return stored_bits(*shared.values()), per_layer


def write_lpc_model(directory: Path, model: nn.Module, qtensors: dict[str, QTensor],
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write config.json + model.safetensors of an lpc artifact into `directory`; returns the qconfig."""
    state, tied = dedup_state_dict(model)
    tensors = {k: v for k, v in state.items() if k.removesuffix(".weight") not in qtensors or not k.endswith(".weight")}
    refs, shared = share_fields(qtensors)
    for name, q in qtensors.items():
        for field, t in get_format(q.format).pack(q).items():
            if field not in refs.get(name, {}):
                tensors[f"{name}.{field}"] = t
    tensors.update(shared)
    tensors.update({f"{name}.weight": weight_marker() for name in qtensors})
    tensors.update(extra_tensors or {})
    layers = {n: {**q.meta(), **({"shared": refs[n]} if n in refs else {})} for n, q in sorted(qtensors.items())}
    qconfig = {"quant_method": QUANT_METHOD, "layers": layers, "tied": tied, **(extra_config or {})}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    write_json(directory / "config.json", config)
    # One metadata key only: safetensors writes a multi-key metadata map in random order.
    save_tensors(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    return qconfig


def read_qconfig(directory: str | Path) -> dict[str, Any] | None:
    """The lpc quantization_config of a model directory, or None for a plain model."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise ArtifactError(f"{directory} has no config.json", "give a model directory or an lpc artifact")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({err.msg})", "the artifact is damaged") from None
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def read_qtensors(directory: Path, qconfig: dict[str, Any],
                  tensors: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, QTensor], dict[str, torch.Tensor]]:
    """Split the tensors of an lpc artifact into QTensors per layer and the plain rest (weight markers,
    shared fields removed)."""
    if tensors is None:
        from lpc.pipeline.artifact.shards import ModelTensors

        tensors = ModelTensors(Path(directory)).load_all()  # model.safetensors or HF shards
    tensors = dict(tensors)
    qtensors = {}
    for name, meta in qconfig.get("layers", {}).items():
        keys = layer_field_keys(name, meta, tensors)
        qtensors[name] = unpack_layer(name, meta, {f: tensors[k] for f, k in keys.items()})
        for f, k in keys.items():
            if f not in meta.get("shared", {}):
                tensors.pop(k)
    for key in [k for k, t in tensors.items() if k.startswith(SHARED_PREFIX) or is_weight_marker(k, t)]:
        tensors.pop(key)
    return qtensors, tensors


def layer_field_keys(name: str, meta: dict[str, Any], keys: Collection[str]) -> dict[str, str]:
    """field -> tensor name of layer `name`'s packed fields among `keys` (its own `<name>.<field>`, not
    bias/weight/low-rank paths, and the shared fields its meta names)."""
    prefix = name + "."
    out = {k[len(prefix):]: k for k in keys
           if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] not in PATH_FIELDS}
    for field, key in meta.get("shared", {}).items():
        if key not in keys:
            raise ArtifactError(f"layer {name} refers to a missing shared tensor {key}",
                                "the artifact is incomplete; re-run the stage that wrote it")
        out[field] = key
    return out


def unpack_layer(name: str, meta: dict[str, Any], fields: dict[str, torch.Tensor]) -> QTensor:
    """One layer's packed fields -> its QTensor, checked (finite fields, no zero block scale)."""
    q = get_format(meta["format"]).unpack(fields, meta)
    _check_fields(name, q)
    return q


def _check_fields(name: str, q: QTensor) -> None:
    for field, t in q.data.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise ArtifactError(f"layer {name}: field {field} holds NaN or inf", "the artifact is broken; re-create it")
    if "scale" in q.data and q.data["scale"].is_floating_point() and (q.data["scale"].float() == 0).any():
        raise ArtifactError(f"layer {name}: a block scale is zero", "the artifact is broken; re-create it")
