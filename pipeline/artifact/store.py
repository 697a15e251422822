"""Artifact directories: manifest, hashes, atomic writes, refuse/overwrite/resume.

A stage writes everything into a hidden temporary directory beside its output and renames it into
place at the end, so an interrupted stage leaves no half-written artifact and an existing one is only
replaced once the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lpc.pipeline.errors import ArtifactError, InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def lpc_version() -> str:
    try:
        from importlib.metadata import version
        return version("lpc")
    except Exception:  # running from a source tree without installing
        return "0.0.0+src"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, obj: Any) -> None:
    fsync_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to safetensors (contiguous, sorted names: byte-identical for equal inputs).

    Give at most one metadata key: safetensors orders a larger metadata map at random.
    """
    ordered = {k: tensors[k].detach().contiguous().cpu() for k in sorted(tensors)}
    save_file(ordered, str(path), metadata=metadata or {"format": "pt"})
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def load_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `names`) from a safetensors file; a broken file is an ArtifactError."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = fh.keys() if names is None else names
            return {k: fh.get_tensor(k) for k in keys}
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing", "re-run the stage that writes it") from None
    except Exception as err:  # safetensors raises its own types for corrupt headers
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})",
                            "re-run the stage that wrote it") from None


def input_record(path: str | Path) -> dict[str, str]:
    p = Path(path)
    return {"path": str(p), "sha256": sha256_file(p)}


def read_manifest(directory: str | Path, stage: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read and check a manifest; `stage` restricts which stages are acceptable."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d} is not a directory", "give the output directory of an lpc stage")
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d} has no {MANIFEST}", "it is not an lpc artifact; re-run the stage that makes it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})",
                            "the artifact is damaged; re-run the stage") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{d}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}",
                            "re-create it with this version of lpc")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest.get("stage") not in stages:
        raise ArtifactError(f"{d} is a '{manifest.get('stage')}' artifact, expected {' or '.join(stages)}",
                            "pass the output directory of the right stage")
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found comparing the files of an artifact with the hashes in its manifest."""
    problems = []
    for name, digest in sorted(manifest.get("files", {}).items()):
        p = Path(directory) / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems


def read_checked_manifest(directory: str | Path, stage: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """The manifest of an input artifact, after checking every file it lists against its hash."""
    manifest = read_manifest(directory, stage)
    problems = verify_files(directory, manifest)
    if problems:
        raise ArtifactError(f"{directory}: {problems[0]}",
                            "the artifact was changed or damaged; re-run the stage that wrote it")
    return manifest


def is_up_to_date(out: Path, stage: str, inputs: list[dict[str, str]], config: dict[str, Any]) -> bool:
    """True when `out` holds a complete artifact of `stage` made from the same inputs and config."""
    try:
        m = read_manifest(out, stage)
    except Exception:
        return False
    return (m.get("inputs") == inputs and m.get("config") == json.loads(json.dumps(config))
            and not verify_files(out, m))


def check_output(out: Path, inputs: list[str | Path], overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite) and an output that is, or holds, an input."""
    out_r = out.resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
            raise InputError(f"output {out} overlaps the input {src}", "write the output to a new directory")
    if out.exists() and not overwrite:
        raise ArtifactError(f"output {out} already exists",
                            "pass --overwrite to replace it, or choose another -o directory")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` atomically, on error it vanishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def finish_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of `directory` into the manifest and write it (last, so it marks completion).

    Files in subdirectories (e.g. a PEFT export's `adapter/`) are named by their relative POSIX path."""
    found = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    files = {name: sha256_file(directory / name) for name in found if name != MANIFEST}
    full = {"lpc_version": lpc_version(), "schema_version": SCHEMA_VERSION, **manifest, "files": files}
    write_json(directory / MANIFEST, full)
    return full
