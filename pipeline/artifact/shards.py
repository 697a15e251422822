"""Safetensors files written tensor by tensor, and model weights split into shards.

`write_streamed` writes one safetensors file from tensors fetched one at a time (from memory-mapped
files), so a file never has to fit in memory; its bytes equal `safetensors.torch.save_file`'s for
the same tensors (same header order, offsets and padding).

`ShardWriter` collects a model's tensors as each decoder layer finishes (spilled to small files in
the staging directory), then writes `model.safetensors`, or, above `shard_bytes`, Hugging Face
shards `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`. `model_tensor_files`
and `ModelTensors` read either layout back lazily.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from lpc.pipeline.artifact.store import disk_full_as_error
from lpc.pipeline.errors import ArtifactError, InputError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_CHUNK = 1 << 26  # bytes copied per write: bounds the temporary of a large tensor


@dataclass(frozen=True)
class Entry:
    """Where a tensor comes from: `file` (safetensors) under `key`, with its dtype and shape."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()

    def load(self) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as fh:
            return fh.get_tensor(self.key)


def entries_of(path: Path) -> dict[str, Entry]:
    """Every tensor of a safetensors file as an Entry (reads the header only)."""
    with safe_open(str(path), framework="pt") as fh:
        out = {}
        for k in fh.keys():
            sl = fh.get_slice(k)
            out[k] = Entry(Path(path), k, _DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
        return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _dtype(e: "Entry | torch.Tensor") -> torch.dtype:
    return e.dtype


def _nbytes(e: "Entry | torch.Tensor") -> int:
    return e.nbytes if isinstance(e, Entry) else e.numel() * e.element_size()


def _header_order(entries: dict[str, "Entry | torch.Tensor"]) -> list[str]:
    """Names in the order safetensors lays them out (by dtype, then name): asked of safetensors
    itself on empty tensors of the same dtypes, so the order follows the installed version."""
    probe = save_bytes({k: torch.empty(0, dtype=_dtype(e)) for k, e in entries.items()})
    n = struct.unpack("<Q", probe[:8])[0]
    header = json.loads(probe[8:8 + n])
    return [k for k in header if k != "__metadata__"]


def streamable(entries: dict[str, "Entry | torch.Tensor"]) -> bool:
    """Whether `write_streamed` knows every dtype (else save_file writes the file)."""
    return all(e.dtype in _NAMES for e in entries.values())


def write_streamed(path: Path, entries: dict[str, "Entry | torch.Tensor"], metadata: dict[str, str] | None = None) -> int:
    """Write `entries` (Entries in files, or tensors in memory) as one safetensors file at `path`,
    one tensor loaded at a time and copied in bounded chunks; returns the bytes written.

    The output equals save_file(tensors, path, metadata) byte for byte (save_file would first copy
    every tensor into one more buffer)."""
    order = _header_order(entries)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for k in order:
        e, n = entries[k], _nbytes(entries[k])
        header[k] = {"dtype": _NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with disk_full_as_error(path, offset + len(raw) + 8):
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for k in order:
                _copy(entries[k], fh)
            fh.flush()
            os.fsync(fh.fileno())
    return offset + len(raw) + 8


def _copy(e: "Entry | torch.Tensor", fh) -> None:
    if _nbytes(e) == 0:
        return
    t = e.load() if isinstance(e, Entry) else e.detach().cpu()
    t = t.contiguous().reshape(-1).view(torch.uint8)
    for i in range(0, t.numel(), _CHUNK):
        fh.write(t[i:i + _CHUNK].numpy().tobytes())


class ShardWriter:
    """Tensors added as layers finish, written at `close()` as one file or as HF shards.

    directory: the (staging) output directory; spilled tensors live in `directory/.spill` until close.
    shard_bytes: the largest shard; None writes one file (`filename`) whatever the size.
    """

    def __init__(self, directory: Path, shard_bytes: int | None = None, filename: str = WEIGHTS):
        if shard_bytes is not None and shard_bytes <= 0:
            raise InputError(f"shard size {shard_bytes} must be positive", "give a size in bytes > 0, or none")
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.filename = filename
        self.spill = self.directory / f".spill-{filename}"
        self.entries: dict[str, Entry] = {}
        self._parts = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` (spilled to disk now, so the caller can free them)."""
        if not tensors:
            return
        dup = next((k for k in tensors if k in self.entries), None)
        if dup is not None:
            raise ArtifactError(f"tensor {dup} was written twice", "this is a bug in the stage writing it")
        self.spill.mkdir(exist_ok=True)
        path = self.spill / f"part-{self._parts:06d}.safetensors"
        self._parts += 1
        ordered = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        with disk_full_as_error(path, sum(t.numel() * t.element_size() for t in ordered.values())):
            save_file(ordered, str(path))
        self.entries.update(entries_of(path))

    def add_entries(self, entries: dict[str, Entry]) -> None:
        """Keep tensors that already live in a file (e.g. unchanged tensors of the source checkpoint)."""
        self.entries.update(entries)

    def close(self, metadata: dict[str, str] | None = None) -> list[str]:
        """Write the file(s) and remove the spill; returns the names written."""
        try:
            return self._write(metadata)
        finally:
            shutil.rmtree(self.spill, ignore_errors=True)

    def _write(self, metadata: dict[str, str] | None) -> list[str]:
        total = sum(e.nbytes for e in self.entries.values())
        if self.shard_bytes is None or total <= self.shard_bytes:
            write_streamed(self.directory / self.filename, self.entries, metadata)
            return [self.filename]
        groups = list(_split(sorted(self.entries), self.entries, self.shard_bytes))
        names, weight_map = [], {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write_streamed(self.directory / name, {k: self.entries[k] for k in group}, metadata)
            weight_map.update({k: name for k in group})
            names.append(name)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        from lpc.pipeline.artifact.store import write_json
        write_json(self.directory / INDEX, index)
        return names + [INDEX]


def _split(names: list[str], entries: dict[str, Entry], limit: int) -> Iterator[list[str]]:
    """Consecutive groups of names of at most `limit` bytes (a larger tensor is a shard of its own)."""
    group: list[str] = []
    size = 0
    for k in names:
        n = entries[k].nbytes
        if group and size + n > limit:
            yield group
            group, size = [], 0
        group.append(k)
        size += n
    if group:
        yield group


def model_tensor_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, for a model directory with model.safetensors or a sharded index."""
    d = Path(directory)
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ArtifactError(f"{d / INDEX} is not a valid shard index", "re-run the stage that wrote it") from None
        from lpc.pipeline.artifact.store import artifact_file
        return {k: artifact_file(d, f) for k, f in weight_map.items()}
    if not (d / WEIGHTS).is_file():
        raise ArtifactError(f"{d / WEIGHTS} is missing", "re-run the stage that writes it")
    try:
        return {k: d / WEIGHTS for k in _keys(d / WEIGHTS)}
    except Exception as err:
        raise ArtifactError(f"{d / WEIGHTS} is not a readable safetensors file ({err})",
                            "re-run the stage that wrote it") from None


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


class ModelTensors:
    """Lazy read access to the tensors of a model directory (single file or shards), via mmap."""

    def __init__(self, directory: Path):
        self.files = model_tensor_files(directory)

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    def entries(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for f in sorted(set(self.files.values())):
            out.update({k: e for k, e in entries_of(f).items() if self.files.get(k) == f})
        return out

    def load_all(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        from lpc.pipeline.artifact.store import load_tensors
        wanted = list(self.files) if names is None else list(names)
        by_file: dict[Path, list[str]] = {}
        for k in wanted:
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, ks in by_file.items():
            out.update(load_tensors(f, ks))
        return out


def parse_size(value: str | int | None) -> int | None:
    """'2GB', '500MB', '4096' -> bytes (decimal units, as Hugging Face's max_shard_size); None stays None."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    mult = units.get(s[-1:], 1)
    try:
        n = float(s[:-1] if s[-1:] in units else s) * mult
    except ValueError:
        raise InputError(f"shard size {value!r} is not a size", "give e.g. 2GB, 500MB or a number of bytes") from None
    return int(n)

