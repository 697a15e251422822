"""A calibration as stored: `stats.safetensors` read back one layer at a time (`read_stats`), references
to one layer's statistics resolved when that layer is used (`StatRef`), and the calibration's token
sequences (`calibration_batches_of`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

STATS_FILE = "stats.safetensors"


def data_inputs(data: str) -> list[str]:
    """Files whose content a calibration depends on (for the manifest's input hashes)."""
    p = Path(data)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*")) if f.is_file()]
    return []


def read_stats(calib_dir) -> "LayerStats":
    """stats.safetensors of a calibration artifact as {layer: {"act_cov": ..., "act_absmax": ...}},
    read lazily: a layer's tensors are loaded from disk (mmap) when that layer is looked up."""
    from lpc.pipeline.artifact.store import read_manifest

    read_manifest(calib_dir, "calibrate")
    return LayerStats(Path(calib_dir) / STATS_FILE)


class LayerStats(Mapping):
    """Read-only mapping layer -> {field: tensor} over a stats file; one layer resident at a time
    (the last one looked up is kept, since a stage asks for the same layer several times in a row)."""

    def __init__(self, path: Path):
        from lpc.pipeline.artifact.store import load_tensors

        self.path = Path(path)
        load_tensors(self.path, [])  # a missing or broken file is an ArtifactError now, not later
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as fh:
            keys = list(fh.keys())
        self._keys: dict[str, list[str]] = {}
        for key in keys:
            name, _, field_name = key.rpartition(".")
            self._keys.setdefault(name, []).append(field_name)
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        from lpc.pipeline.artifact.store import load_tensors

        if name not in self._keys:
            raise KeyError(name)
        if self._last is None or self._last[0] != name:
            flat = load_tensors(self.path, [f"{name}.{f}" for f in self._keys[name]])
            self._last = (name, {f: flat[f"{name}.{f}"] for f in self._keys[name]})
        return dict(self._last[1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def fields(self, name: str) -> list[str]:
        """The statistics stored for `name` (without loading them)."""
        return list(self._keys.get(name, []))

    def load(self, name: str, fields: list[str]) -> dict[str, torch.Tensor]:
        """Only `fields` of `name` (a layer's weight Fisher is as large as its weight: a caller that needs
        its small statistics alone should not read it)."""
        from lpc.pipeline.artifact.store import load_tensors

        if self._last is not None and self._last[0] == name:
            return {f: self._last[1][f] for f in fields}
        missing = [f for f in fields if f not in self._keys.get(name, [])]
        if missing:
            raise KeyError(f"{name}.{missing[0]}")
        flat = load_tensors(self.path, [f"{name}.{f}" for f in fields])
        return {f: flat[f"{name}.{f}"] for f in fields}


def stat_names(stats: Mapping, name: str) -> list[str]:
    """The statistics stored for layer `name` (without loading them from a LayerStats)."""
    return stats.fields(name) if isinstance(stats, LayerStats) else list(stats.get(name, {}))


def stat_fields(stats: Mapping, name: str, fields: list[str]) -> dict[str, torch.Tensor]:
    """`fields` of layer `name`'s statistics, reading only those from a LayerStats."""
    if isinstance(stats, LayerStats):
        return stats.load(name, fields)
    return {f: stats[name][f] for f in fields}


class StatRef:
    """One calibration statistic of one layer, read when that layer is quantized rather than when a plan
    is read (an FGMP plan's Fisher importances are as large as the weights in fp32: held for every layer
    at once they would be twice the bf16 model)."""

    __slots__ = ("stats", "name", "field")

    def __init__(self, stats: Mapping, name: str, field: str):
        self.stats, self.name, self.field = stats, name, field

    def load(self) -> torch.Tensor:
        return self.stats[self.name][self.field]


def resolve_refs(ctx: dict[str, Any]) -> dict[str, Any]:
    """A plan entry's context with every StatRef read."""
    return {k: v.load() if isinstance(v, StatRef) else v for k, v in ctx.items()}


def calibration_batches_of(calib: str | Path, src: str, model: Any) -> list[torch.Tensor]:
    """The token sequences a calibration artifact was collected on (rebuilt from its config)."""
    from lpc.pipeline.artifact.store import read_manifest
    from lpc.pipeline.io.data import calibration_batches
    from lpc.pipeline.io.models import load_tokenizer

    c = read_manifest(calib, "calibrate")["config"]
    return calibration_batches(c["data"], load_tokenizer(src), c["samples"], c["seq_len"], model=model, seed=c["seed"])
