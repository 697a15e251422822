"""An lpc artifact read one quantized layer at a time, for exporters that rewrite every layer.

`ArtifactLayers(src, qconfig)` yields (name, QTensor) in name order, each read from the artifact's
file(s) only when its turn comes; `rest()` then gives what the exporter copies unchanged (as file
entries, never loaded: embeddings, norms, biases, unquantized Linears) and the small auxiliary `lpc.*`
tensors (KV scales, activation importances). An exporter adds its converted layers to a ShardWriter as
they come, so its memory is one layer whatever the model's size.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch

from lpc.formats import QTensor
from lpc.pipeline.artifact.lpc_model import AUX_PREFIX, SHARED_PREFIX, layer_field_keys, unpack_layer
from lpc.pipeline.artifact.shards import Entry, ModelTensors


class ArtifactLayers:
    """The quantized layers of the artifact at `src` (its quantization_config `qconfig`), one at a time."""

    def __init__(self, src: Path, qconfig: dict[str, Any]):
        self.store = ModelTensors(Path(src))
        self.entries = self.store.entries()
        self.layers = qconfig.get("layers", {})
        self._consumed: set[str] = set()

    def __iter__(self) -> Iterator[tuple[str, QTensor]]:
        for name in sorted(self.layers):
            yield name, self.layer(name)

    def layer(self, name: str) -> QTensor:
        """One layer, read now (again, if it was read before)."""
        keys = layer_field_keys(name, self.layers[name], self.entries)
        self._consumed.update(keys.values())
        return unpack_layer(name, self.layers[name], {f: self.store.get(k) for f, k in keys.items()})

    def rest(self) -> tuple[dict[str, Entry], dict[str, torch.Tensor]]:
        """(tensors to copy as they are, as file entries; the auxiliary `lpc.*` tensors, loaded), leaving
        out the layers' packed fields, shared fields and weight markers."""
        copy: dict[str, Entry] = {}
        aux: dict[str, torch.Tensor] = {}
        for k, e in self.entries.items():
            if k in self._consumed or k.startswith(SHARED_PREFIX) or self._marker(k, e):
                continue
            if k.startswith(AUX_PREFIX):
                aux[k] = self.store.get(k)
            else:
                copy[k] = e
        return copy, aux

    def _marker(self, key: str, e: Entry) -> bool:
        """The empty uint8 `<layer>.weight` standing for a packed weight."""
        return key.endswith(".weight") and key[: -len(".weight")] in self.layers and e.dtype == torch.uint8 \
            and e.nbytes == 0


class LayerMap(Mapping):
    """name -> QTensor of the artifact at `src`, read when looked up (the last one looked up is kept, since
    a stage asks for the same layer several times in a row): a stage walking the layers holds one."""

    def __init__(self, src: Path, qconfig: dict[str, Any]):
        self.layers = ArtifactLayers(src, qconfig)
        self._last: tuple[str, QTensor] | None = None

    def __getitem__(self, name: str) -> QTensor:
        if name not in self.layers.layers:
            raise KeyError(name)
        if self._last is None or self._last[0] != name:
            self._last = (name, self.layers.layer(name))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.layers.layers))

    def __len__(self) -> int:
        return len(self.layers.layers)
