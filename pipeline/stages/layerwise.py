"""The layer-streaming engine of `lpc quantize`: one decoder layer resident at a time.

The model is a meta-device skeleton (no weight memory). Tensors outside the decoder stack
(embeddings, final norm, head) are referenced in the checkpoint and copied to the output at the end
without being held; then, for each decoder layer: materialise its weights from the checkpoint
(mmap), read its statistics from the calibration (one layer at a time), quantize its targets, spill
its output tensors to the staging directory, release it. The output file(s) are then assembled
tensor by tensor (artifact/shards.py). Peak memory: one layer, its statistics, bounded temporaries.

A layer-wise tuning method (`quantize.method: tune`) runs inside this walk: the embeddings are
loaded once to compute decoder layer 0's inputs from the calibration tokens and released; each layer
is then tuned against its original outputs before it is quantized, and the hidden states (original
and quantized) are carried to the next layer (quantization/tune.py).

The artifact equals the whole-model path's byte for byte (same tensors, names, dtypes, config).
Model-wide LO-BCQ codebooks are fitted before the walk over a sample of every bcq weight, read one
at a time from the checkpoint; codebooks (a few hundred bytes per layer) are kept aside and those
equal in several layers are stored once at the end, as the whole-model path stores them. Recipes whose
quantization needs the whole model at once (an end-to-end tuning method, targets outside the decoder
stack) take the whole-model path (`open_streamed` says which).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpc.formats import get_format, stored_bits
from lpc.pipeline.artifact.lpc_model import QUANT_METHOD, SHARED_FIELDS, share_tensors, weight_marker
from lpc.pipeline.artifact.shards import Entry, ShardWriter, entries_of
from lpc.pipeline.artifact.store import write_json
from lpc.pipeline.io.families import derive_layer_groups, merge_groups, probe_ids
from lpc.pipeline.io.models import find_targets
from lpc.pipeline.io.streaming import (WeightStore, materialize, materialize_outside, open_stack, release, tie,
                                        tied_names)
from lpc.pipeline.progress import Progress, track
from lpc.pipeline.quantization.layers import layer_setups, quantize_layers, shared_codebooks

log = logging.getLogger(__name__)


def open_streamed(src: str, recipe: Any, plan: dict[str, Any] | None, method: Any):
    """(skeleton, store, decoder stack) when `lpc quantize` can stream this model and recipe, else None."""
    if (method.tune is not None and method.layer_tuner is None) or not Path(src).is_dir():
        return None
    opened = open_stack(src, recipe.targets, recipe.ignore, "quantizing")
    if opened is None:
        return None
    return opened


def quantize_streamed(tmp: Path, opened, recipe: Any, plan: dict[str, Any], stats, shard_bytes: int | None,
                      extra_tensors: dict[str, torch.Tensor], progress: Progress | None = None,
                      device: str = "cpu", tuner: Any = None, batches: list[torch.Tensor] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Quantize layer by layer into `tmp`; returns (per-layer records, quantized layers' meta, counts).

    counts: {"bits": stored bits of every target weight, "numel": their elements, "files": shards written,
    "fuse_groups": the recipe's groups plus those derived from the layers' shared inputs}.
    tuner: a layer-wise tuning method's tuner (QuantizeMethod.layer_tuner), fed decoder layer 0's
    inputs on `batches` (calibration token ids (1, T)), then each layer before it is quantized."""
    model, store, (path, layers) = opened
    q = recipe.quantize
    targets = find_targets(model, recipe.targets, recipe.ignore)
    books = shared_codebooks(targets, plan, lambda n: store.get(f"{n}.weight").float()) \
        if q.codebook_scope == "model" else {}
    writer = ShardWriter(tmp, shard_bytes)
    tied = sorted(tied_names(model))
    _add_outside(writer, model, store, path, set(tied))
    if tuner is not None:
        tuner.begin(_first_inputs(model, store, path, layers, batches or [], device))
    probe = _first_inputs(model, store, path, layers, [probe_ids(model.config)], "cpu")[0]
    derived: list[list[str]] = []  # the family's own q/k/v, gate/up, found layer by layer (families.py)
    records: dict[str, Any] = {}
    metas: dict[str, Any] = {}
    count = {"bits": 0, "numel": 0}
    kept: dict[str, tuple] = {}  # each layer's shareable fields (written at the end), stored bits, numel
    for i, layer in track(list(enumerate(layers)), "quantize (layer by layer)", progress):
        prefix = f"{path}.{i}"
        mine = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
        materialize(layer, prefix, store)
        try:
            groups, args = derive_layer_groups(layer, mine, *probe)
            probe = (args, probe[1])
            derived += [g for g in groups if g not in derived]
            fuse = merge_groups(q.fuse_groups, derived)
            tensors = _quantize_layer(layer, prefix, mine, plan, stats, q, fuse, records, metas, count, device,
                                      tuner, books, kept)
        finally:
            release(layer)
        writer.add(tensors)
        del tensors
    writer.add(_shared_fields(kept, records, metas, count))
    writer.add(extra_tensors)
    files = writer.close(metadata={"format": "pt"})
    return records, metas, {**count, "files": len(files), "fuse_groups": merge_groups(q.fuse_groups, derived)}


def _shared_fields(kept: dict[str, tuple], records: dict, metas: dict, count: dict) -> dict[str, torch.Tensor]:
    """The shareable fields of every layer as `write_lpc_model` stores them: once under `lpc.shared.*`
    when several layers hold them bit for bit (their meta then names the key), else under the layer's
    name; bits and records count a shared tensor once, as `bits_summary` does.
    kept: layer -> (its shareable fields, its QTensor's stored bits, its numel)."""
    refs, shared = share_tensors({n: k[0] for n, k in kept.items()})
    out = dict(shared)
    count["bits"] += stored_bits(*shared.values()) if shared else 0
    for name, (fields, bits, numel) in kept.items():
        mine = refs.get(name, {})
        out.update({f"{name}.{f}": t for f, t in fields.items() if f not in mine})
        if mine:
            own = stored_bits(*(fields[f] for f in mine))
            metas[name]["shared"] = mine
            count["bits"] -= own
            records[name]["bits_per_weight"] = (bits - own) / numel
            records[name]["shared_fields"] = True
    return out


def _add_outside(writer: ShardWriter, model: nn.Module, store: WeightStore, path: str, tied: set[str]) -> None:
    """Tensors outside the decoder stack: referenced in the checkpoint when stored in the model's dtype
    (copied at the end without being held), else cast now (norms are small); persistent buffers from
    the skeleton."""
    params = dict(model.named_parameters(remove_duplicate=False))
    headers: dict[Path, dict[str, Entry]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.startswith(path + ".") or name in tied:
            continue
        if name not in params:
            writer.add({name: value})
            continue
        f = Path(store.files[name])
        e = headers.setdefault(f, entries_of(f))[name]
        if e.dtype == params[name].dtype:
            writer.add_entries({name: e})
        else:
            writer.add({name: store.get(name).to(params[name].dtype)})


def _first_inputs(model: nn.Module, store: WeightStore, path: str, layers: nn.ModuleList,
                  batches: list[torch.Tensor], device: str) -> list[tuple[tuple, dict]]:
    """Decoder layer 0's inputs for each calibration sequence; the embeddings (everything outside the
    stack) are loaded for it and released afterwards."""
    from lpc.pipeline.calibration.stats import capture_layer_inputs
    from lpc.pipeline.modes import eval_mode

    materialize_outside(model, path, store)
    try:
        with torch.no_grad(), eval_mode(model):
            return capture_layer_inputs(model, layers, batches, device)
    finally:
        release(model)
        tie(model)  # a tied head still pointed at the loaded embeddings


def _quantize_layer(layer: nn.Module, prefix: str, mine: dict[str, nn.Linear], plan: dict[str, Any], stats,
                    q: Any, fuse: list[list[str]], records: dict, metas: dict, count: dict, device: str, tuner: Any = None,
                    books: dict[str, torch.Tensor] | None = None, kept: dict[str, tuple] | None = None
                    ) -> dict[str, torch.Tensor]:
    """One materialised decoder layer -> its output tensors (packed targets, everything else as is).
    books: the model-wide LO-BCQ codebooks by layer name; kept: receives each quantized layer's shareable
    fields (left out of the output), stored bits and numel, for `_shared_fields`."""
    sub_stats = {n: stats[n] for n in mine if stats is not None and n in stats}
    setups = layer_setups(mine, plan, sub_stats, fuse, q.importance != "none", q.codebook_scope, books or {})
    tuned, rounded = None, None
    if tuner is not None:
        tuned, _, rounded = tuner.layer(layer, mine, setups)
    qtensors, recs = quantize_layers(mine, plan, sub_stats, method=q.method, setups=setups, device=device,
                                     weights=tuned, rounded=rounded)
    out = {f"{prefix}.{k}": t for k, t in layer.state_dict().items()}
    for name, qt in qtensors.items():
        out.pop(f"{name}.weight")
        packed = get_format(qt.format).pack(qt)
        share = {f: packed.pop(f) for f in SHARED_FIELDS if f in packed}
        if kept is not None:
            kept[name] = (share, qt.storage_bits(), qt.numel)
        else:
            packed.update(share)
        out.update({f"{name}.{field}": t for field, t in packed.items()})
        out[f"{name}.weight"] = weight_marker()
        metas[name] = qt.meta()
        records[name] = recs[name]
    for name, mod in mine.items():
        count["bits"] += stored_bits(qtensors[name]) if name in qtensors else stored_bits(mod.weight)
        count["numel"] += mod.weight.numel()
    return out


def write_config(tmp: Path, model: nn.Module, layers: dict[str, Any], tied: list[str],
                 extra_config: dict[str, Any] | None) -> dict[str, Any]:
    """config.json with the lpc quantization_config, as write_lpc_model writes it."""
    qconfig = {"quant_method": QUANT_METHOD, "layers": dict(sorted(layers.items())), "tied": tied,
               **(extra_config or {})}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    write_json(tmp / "config.json", config)
    return qconfig
