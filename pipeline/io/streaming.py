"""Weights on demand: a model skeleton whose parameters live on the meta device, filled one module at
a time from the checkpoint's safetensors files (memory-mapped) and emptied again afterwards.

Calibration walks the decoder layers this way, so peak memory is the embeddings and head plus one
layer, whatever the depth. Buffers (rotary tables) are built normally by the model's constructor.
"""
from __future__ import annotations

import functools
import json
from contextlib import contextmanager
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lpc.pipeline.errors import InputError

log = logging.getLogger(__name__)


class StreamingUnsupported(Exception):
    """The checkpoint cannot be streamed (no local safetensors, renamed keys); load it whole."""


class WeightStore:
    """Where each tensor of a local safetensors checkpoint lives (single file or sharded index)."""

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: d / f for k, f in weight_map.items()}
        elif (d / "model.safetensors").is_file():
            with _open(d / "model.safetensors") as fh:
                self.files = {k: d / "model.safetensors" for k in fh.keys()}
        else:
            raise StreamingUnsupported(f"{d} has no safetensors weights")

    def get(self, name: str) -> torch.Tensor:
        with _open(self.files[name]) as fh:
            try:
                return fh.get_tensor(name)
            except SafetensorError as err:
                raise _damaged(self.files[name], err) from err

    def __contains__(self, name: str) -> bool:
        return name in self.files


@contextmanager
def _open(path: Path):
    """safe_open of one checkpoint file; a damaged or truncated file is an InputError."""
    try:
        fh = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise _damaged(path, err) from err
    with fh:
        yield fh


def _damaged(path: Path, err: Exception) -> InputError:
    return InputError(f"cannot read {path}: the weight file is damaged or truncated ({err})",
                      "re-download or re-export the checkpoint")


def skeleton(model_dir: str | Path) -> nn.Module:
    """The model built from its config with parameters on meta (no weight memory), eval mode."""
    from lpc.pipeline.io.models import model_from_config

    return model_from_config(model_dir, empty=True)


def check_streamable(model: nn.Module, store: WeightStore) -> None:
    """Every parameter must be in the checkpoint under its own name (or be a tied copy)."""
    tied = tied_names(model)
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in store and n not in tied]
    if missing:
        raise StreamingUnsupported(f"checkpoint keys differ from the model's, e.g. {missing[0]}")
    from lpc.pipeline.io.families import is_transposed
    flipped = [n for n, m in model.named_modules() if is_transposed(m)]
    if flipped:  # checkpoint weights are (in, out) there: loaded whole, through the model's own loader
        raise StreamingUnsupported(f"{flipped[0]} stores its weight transposed (Conv1D)")


def tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (tied embeddings)."""
    out = set()
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        for n, p in model.named_parameters(remove_duplicate=False):
            if p is model.get_output_embeddings().weight and n != _input_embedding_name(model):
                out.add(n)
    return out


def _input_embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(f"{n}.weight" for n, m in model.named_modules() if m is emb)


def materialize(module: nn.Module, prefix: str, store: WeightStore, device: str = "cpu") -> None:
    """Load the parameters of `module` (named `prefix` in the model) from the checkpoint."""
    for local, p in list(module.named_parameters(recurse=True)):
        full = f"{prefix}.{local}" if prefix else local
        if full in store:  # else a tied copy, filled by `tie`
            _load(module, local, full, p.dtype, store, device)


def _load(root: nn.Module, local: str, full: str, dtype: torch.dtype, store: WeightStore,
          device: str = "cpu") -> None:
    """Replace parameter `local` of `root` by checkpoint tensor `full` (checked finite)."""
    t = store.get(full).to(device=device, dtype=dtype)
    if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():  # one pass
        raise InputError(f"model has NaN or inf values in {full}", "the checkpoint is broken; re-export it")
    owner, _, leaf = local.rpartition(".")
    mod = root.get_submodule(owner) if owner else root
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def release(module: nn.Module) -> None:
    """Send the parameters of `module` back to meta, freeing their memory (returned to the system: see
    `trim_heap`)."""
    for local, p in list(module.named_parameters(recurse=True)):
        owner, _, leaf = local.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        mod._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    trim_heap()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`; a no-op elsewhere).

    A layer's tensors freed after its turn otherwise stay with the process: glibc raises its mmap
    threshold each time a large block is freed, so the next layers' tensors come from the heap, and
    the freed space, fragmented, is rarely returned. Peak RSS then drifts with the number of layers
    and with timing (a 32-layer fp8 quantize peaked anywhere between 0.79 and 1.28 GB; with the heap
    trimmed after each layer it is steady)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """The C library when it has `malloc_trim` (glibc), else None."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def tie(model: nn.Module) -> None:
    """Point tied output embeddings at the (materialized) input embeddings."""
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def resident_params(model: nn.Module) -> int:
    """Number of parameter elements currently holding memory (not on meta)."""
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


def materialize_outside(model: nn.Module, layers_path: str, store: WeightStore) -> None:
    """Load every parameter that is not inside the decoder stack `layers_path` (embeddings, norm, head)."""
    for name, p in list(model.named_parameters()):
        if not name.startswith(layers_path + ".") and name in store and p.device.type == "meta":
            _load(model, name, name, p.dtype, store)
    tie(model)


def open_stack(model_dir: str | Path, targets: list[str], ignore: list[str], doing: str):
    """(meta skeleton, store, (decoder stack path, layers)) when the checkpoint streams and every target
    lies inside the decoder-layer stack, else None (logged: `doing` on the whole model)."""
    from lpc.pipeline.io.models import decoder_layers, find_targets

    try:
        store = WeightStore(model_dir)
        model = skeleton(model_dir)
        check_streamable(model, store)
    except StreamingUnsupported as err:
        log.info("%s: %s on the whole model", err, doing)
        return None
    found = decoder_layers(model)
    names = find_targets(model, targets, ignore)
    if found is None or any(not n.startswith(found[0] + ".") for n in names):
        log.info("targets outside a decoder-layer stack: %s on the whole model", doing)
        return None
    return model, store, found


def open_for_calibration(model_dir: str | Path, targets: list[str], ignore: list[str]):
    """(skeleton with everything but the decoder layers loaded, store), or None when the model
    cannot be streamed or a target lies outside the decoder layers (then load it whole)."""
    opened = open_stack(model_dir, targets, ignore, "calibrating")
    if opened is None:
        return None
    model, store, found = opened
    materialize_outside(model, found[0], store)
    return model, store
