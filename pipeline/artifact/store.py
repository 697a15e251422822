"""Artifact directories: manifest, hashes, atomic writes, refuse/overwrite/resume.

A stage writes everything into a hidden temporary directory beside its output and renames it into
place at the end, so an interrupted stage leaves no half-written artifact and an existing one is only
replaced once the new one is complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lpc.pipeline.errors import ArtifactError, InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def lpc_version() -> str:
    try:
        from importlib.metadata import version
        return version("lpc")
    except Exception:  # running from a source tree without installing
        return "0.0.0+src"


# (device, inode, size, mtime_ns) -> digest of large files, so that a checkpoint hashed by one stage is not
# read again by the next in the same process (small files are always re-read: cheap, and an in-place
# edit within the file system's timestamp granularity cannot go unseen).
_DIGESTS: dict[tuple, str] = {}
_MEMO_BYTES = 64 << 20


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    if st.st_size >= _MEMO_BYTES:
        _DIGESTS[key] = h.hexdigest()
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    with disk_full_as_error(path, len(data)):
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


@contextmanager
def disk_full_as_error(path: Path, nbytes: int) -> Iterator[None]:
    """A full disk while writing `path` (`nbytes` to write) becomes an InputError saying how much was
    needed and how much is free; the staging directory around it is then removed, leaving nothing."""
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = 0
        raise InputError(f"the disk is full: writing {Path(path).name} needs {_mb(nbytes)} and "
                         f"{Path(path).parent} has {_mb(free)} free", "free space on that disk or write "
                         "the output elsewhere (-o); nothing of this stage was kept") from None


def _is_disk_full(err: BaseException) -> bool:
    # safetensors reports a full disk as its own error type carrying the OS message
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def write_json(path: Path, obj: Any) -> None:
    fsync_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to safetensors (contiguous, sorted names: byte-identical for equal inputs).

    Give at most one metadata key: safetensors orders a larger metadata map at random.
    """
    from lpc.pipeline.artifact.shards import streamable, write_streamed

    ordered = {k: tensors[k].detach() for k in sorted(tensors)}
    if streamable(ordered):  # the same bytes as save_file, without its copy of every tensor
        write_streamed(Path(path), ordered, metadata or {"format": "pt"})
        return
    ordered = {k: t.contiguous().cpu() for k, t in ordered.items()}
    with disk_full_as_error(path, sum(t.numel() * t.element_size() for t in ordered.values())):
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
    check_listed_files(d, manifest)
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest.get("stage") not in stages:
        raise ArtifactError(f"{d} is a '{manifest.get('stage')}' artifact, expected {' or '.join(stages)}",
                            "pass the output directory of the right stage")
    return manifest


def artifact_file(directory: str | Path, name: Any) -> Path:
    """The path of a file a manifest lists, refused unless it stays inside `directory`.

    A manifest is input like any other: a crafted one could name `../x`, `/etc/passwd` or a symlink
    pointing out, and lpc would read (verify, eval) or write (export) outside the artifact. Names
    must be relative POSIX paths without `..` whose resolved path lies inside the directory."""
    d = Path(directory).resolve()
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    bad = (not parts or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or ":" in parts[0]
           or "\x00" in name)
    p = d / name if not bad else d
    if bad or not p.resolve().is_relative_to(d):
        raise ArtifactError(f"{directory}/{MANIFEST} lists {name!r}, which is outside the artifact",
                            "the manifest was tampered with or damaged; refusing to read or write it")
    return p


def check_listed_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every name in the manifest's `files` is a file path inside `directory` (see artifact_file)."""
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"{directory}/{MANIFEST}: 'files' must map file names to sha256 strings",
                            "the artifact is damaged; re-run the stage that wrote it")
    for name in files:
        artifact_file(directory, name)


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found comparing the files of an artifact with the hashes in its manifest."""
    problems = []
    check_listed_files(directory, manifest)
    for name, digest in sorted(manifest.get("files", {}).items()):
        p = artifact_file(directory, name)
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


def check_before_loading(path: str | Path) -> None:
    """Refuse to evaluate a damaged artifact, as `lpc verify` would: a local directory holding a
    manifest must match it; an lpc-quantized directory whose manifest is gone cannot be checked and
    is refused. A plain model directory (no manifest, no lpc quantization) and hub ids pass."""
    d = Path(path)
    if not d.is_dir():
        return
    if (d / MANIFEST).is_file():
        read_checked_manifest(d)
        return
    try:
        qc = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return  # not an lpc artifact; loading reports a broken config.json itself
    if isinstance(qc, dict) and qc.get("quant_method") == "lpc":
        raise ArtifactError(f"{d} is an lpc artifact without {MANIFEST}: its files cannot be checked",
                            "re-create it (lpc export / lpc compress), or restore manifest.json")


def is_up_to_date(out: Path, stage: str, inputs: list[dict[str, str]], config: dict[str, Any]) -> bool:
    """True when `out` holds a complete artifact of `stage` made from the same inputs and config by this
    version of lpc (another version may compute it differently: its artifact is made again)."""
    try:
        m = read_manifest(out, stage)
    except Exception:
        return False
    return (m.get("inputs") == inputs and m.get("config") == json.loads(json.dumps(config))
            and m.get("lpc_version") == lpc_version() and not verify_files(out, m))


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
    remove_stale_staging(out.parent)
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


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove hidden `.<name>.tmp-<pid>` / `.<name>.old-<pid>` folders left in `parent` by a process
    that was killed (SIGKILL, power loss) and is no longer running; returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = STAGING.match(entry.name)
        # an .old- folder is the previous output, kept only until the new one is renamed in
        keep_old = ".old-" in entry.name and not (parent / m["name"]).exists() if m else False
        if m and entry.is_dir() and not entry.is_symlink() and not keep_old and not _pid_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by the stopped process %s", entry, m["pid"])
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return True
    return True


def finish_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of `directory` into the manifest and write it (last, so it marks completion).

    Files in subdirectories (e.g. a PEFT export's `adapter/`) are named by their relative POSIX path."""
    found = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    for name in found:  # some writers (safetensors) create files 0600: make them as readable as others
        os.chmod(directory / name, 0o666 & ~_UMASK)
    files = {name: sha256_file(directory / name) for name in found if name != MANIFEST}
    full = {"lpc_version": lpc_version(), "schema_version": SCHEMA_VERSION, **manifest, "files": files}
    write_json(directory / MANIFEST, full)
    return full
