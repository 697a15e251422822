"""Fisher diagonals one decoder layer at a time: the same statistics as `fisher.fisher_statistics`
(see its definitions) without the whole model resident.

1. Forward: the inputs of decoder layer 0 are captured per sample; each layer in turn is loaded
   (from the checkpoint when the model is a meta skeleton), runs every sample, and its input
   hidden states are kept (on the CPU, in the model's dtype) before it is released.
2. Head: the final norm and output head turn the last hidden states into each sample's mean
   next-token loss (fp32); its gradient dL/dh enters the backward pass.
3. Backward, last layer first: the layer is loaded again, recomputed from its stored input with the
   target weights requiring grad, and back-propagated with dL/dh of its output; each sample's weight
   gradient is squared into the layer's accumulators (per sample, as the whole-model version does),
   dL/dx of each target Linear is read through its output's gradient, and dL/dh of the layer's
   input is passed on. The layer is released.

Memory: one layer, the accumulators, and the hidden states at every layer boundary of one chunk of
samples (STATE_BYTES at most, or one sample): the calibration set goes through in chunks, each loading
every layer twice, with the same result as one pass (the sums run in sample order either way). For a
streamed model the stored inputs wait on disk, one file per layer (DISK_STATE_BYTES per chunk), so
one layer's inputs are resident whatever the depth.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpc.pipeline.calibration.fisher import FisherAccumulator, fisher_hooks
from lpc.pipeline.modes import eval_mode
from lpc.pipeline.progress import Progress, track

log = logging.getLogger(__name__)


# Families whose logits are exactly lm_head(model.norm(h)) (no logit scaling or soft-capping).
PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3")


def final_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(final norm, output head) of a Llama-style decoder (model.model.norm, lm_head), else None."""
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD:
        return None
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (norm, head) if isinstance(norm, nn.Module) and isinstance(head, nn.Module) else None


def layerwise_fisher(model: nn.Module, batches: list[torch.Tensor], targets: dict[str, nn.Linear],
                     found: tuple[str, nn.ModuleList], load: Callable[[int], None] | None = None,
                     free: Callable[[int], None] | None = None, progress: Progress | None = None,
                     device: str = "cpu", on_layer: Callable[[dict[str, dict[str, Any]]], None] | None = None,
                     park_dir: str | Path | None = None, input_stats: dict[str, Any] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Per target Linear {"weight_fisher": (out, in) fp32, "act_fisher": (in,) fp32, "count", "tokens"}.

    batches: (1, T) token ids, T >= 2, one sample each. found: decoder_layers(model).
    load(i) / free(i): materialise / release decoder layer i (a meta skeleton), or None when the
    model is resident. Everything outside the decoder stack must be resident.
    on_layer: called with each decoder layer's finished statistics as soon as its last backward pass
    ends (last layer first), which are then dropped: the accumulators of one layer are resident, and
    between chunks of samples each layer's partial sums wait on disk. The return value then holds
    only what was not delivered (nothing). park_dir: where the partial sums wait (default: the system's
    temporary directory; a stage passes its own staging directory, on the output's disk).
    input_stats: target name -> `stats.InputStats` to fill in the same forward pass (absmax, second
    moments: what `collect_input_stats` computes, the same bits, without a pass of its own); each
    layer's are finished after its last forward, before `on_layer` sees the layer."""
    path, layers = found
    head = final_head(model)
    if head is None:
        raise ValueError("no final norm / output head found")
    rows = [b.reshape(1, -1).long() for b in batches if b.numel() >= 2]
    tokens = sum(r.shape[1] - 1 for r in rows)
    accs: dict[str, FisherAccumulator] = {}

    def result(names) -> dict[str, dict[str, Any]]:
        return {n: {"weight_fisher": accs[n].weight_sum.div_(len(rows)).cpu(), "act_fisher": accs[n].act_sum.div_(tokens).cpu(),
                    "count": len(rows), "tokens": tokens} for n in names if n in accs}

    offload = load is not None  # a streamed model: the layers' stored inputs wait on disk, not in memory
    chunks = _chunks(rows, len(layers), _hidden_bytes(model), DISK_STATE_BYTES if offload else STATE_BYTES)
    with _Parking(on_layer is not None and len(chunks) > 1, park_dir) as parking, \
            _StoredInputs(offload, park_dir) as stored:
        for k, chunk in enumerate(chunks):
            tag = f" {k + 1}/{len(chunks)}" if len(chunks) > 1 else ""
            last = k == len(chunks) - 1

            def finished(names: list[str], last: bool = last) -> None:
                if last:
                    on_layer(result(names))
                else:
                    parking.park(names, accs)
                for n in names:
                    accs.pop(n, None)

            _fisher_chunk(model, chunk, targets, found, head, accs, load, free, progress, device, tag,
                          finished if on_layer is not None else None, parking.unpark, stored,
                          input_stats, last)
    return result(list(targets))


class _OnDisk:
    """A temporary directory (under `directory`, default the system's) while active and inside; removed
    with what it holds on exit."""

    prefix = "lpc-fisher-"

    def __init__(self, active: bool, directory: str | Path | None = None):
        self.active, self.directory, self.dir = active, directory, None

    def __enter__(self):
        if self.active:
            import tempfile

            self.dir = tempfile.TemporaryDirectory(prefix=self.prefix, dir=self.directory)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.dir is not None:
            self.dir.cleanup()


class _Parking(_OnDisk):
    """Partial Fisher sums of the layers between two chunks of samples, on disk (safetensors), so only
    the layer being back-propagated holds accumulators; exact (fp32 in, fp32 out)."""

    def __init__(self, active: bool, directory: str | Path | None = None):
        super().__init__(active, directory)
        self.files: dict[tuple[str, ...], Path] = {}

    def _file(self, names: list[str]) -> Path:
        key = tuple(names)
        if key not in self.files:
            self.files[key] = Path(self.dir.name) / f"layer-{len(self.files)}.safetensors"
        return self.files[key]

    def park(self, names: list[str], accs: dict[str, FisherAccumulator]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for n in names:
            tensors[f"{n}.weight_sum"], tensors[f"{n}.act_sum"] = accs[n].weight_sum.cpu(), accs[n].act_sum.cpu()
        save_file(tensors, str(self._file(names)))

    def unpark(self, names: list[str], accs: dict[str, FisherAccumulator]) -> None:
        """Restore parked partial sums into fresh accumulators (nothing when inactive or not parked)."""
        from safetensors.torch import load_file

        if self.dir is None:
            return
        f = self._file(names)
        if not f.is_file():
            return
        saved = load_file(str(f))
        for n in names:
            accs[n].weight_sum.copy_(saved[f"{n}.weight_sum"])
            accs[n].act_sum.copy_(saved[f"{n}.act_sum"])
        f.unlink()


class _StoredInputs(_OnDisk):
    """Each decoder layer's input hidden states (one tensor per sample), kept from the forward pass for the
    backward pass: in memory, or (active: offloaded) in one safetensors file per layer on disk, so what is
    resident is one layer's inputs, not every layer's (the store grows with depth). Exact either way."""

    prefix = "lpc-fisher-inputs-"

    def __init__(self, offload: bool, directory: str | Path | None = None):
        super().__init__(offload, directory)
        self.held: dict[int, list[torch.Tensor]] = {}

    def put(self, i: int, tensors: list[torch.Tensor]) -> None:
        if self.dir is None:
            self.held[i] = tensors
            return
        from lpc.pipeline.artifact.store import save_tensors

        save_tensors({str(j): t.contiguous() for j, t in enumerate(tensors)}, Path(self.dir.name) / f"{i}.safetensors")

    def pop(self, i: int) -> list[torch.Tensor]:
        if self.dir is None:
            return self.held.pop(i)
        from safetensors.torch import load_file

        f = Path(self.dir.name) / f"{i}.safetensors"
        saved = load_file(str(f))
        f.unlink()
        return [saved[str(j)] for j in range(len(saved))]


# The hidden states kept for the backward pass (every layer's input, every sample of a chunk) stay
# under this many bytes: the samples go through in chunks (each chunk loads every layer twice and,
# when statistics are delivered layer by layer, parks every layer's partial sums on disk). The
# Fisher is a sum over samples, accumulated in sample order, so chunks give the same bits. Offloaded
# to disk (a streamed model), the inputs may take more room: fewer chunks, one layer's in memory.
STATE_BYTES = 512 * 2**20
DISK_STATE_BYTES = 4 * 2**30


def _hidden_bytes(model: nn.Module) -> int:
    """Bytes of one token's hidden state in the model's dtype."""
    cfg = model.config
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return int(getattr(cfg, "hidden_size", 0) or 0) * torch.finfo(dtype).bits // 8


def _chunks(rows: list[torch.Tensor], n_layers: int, token_bytes: int, cap: int = STATE_BYTES
            ) -> list[list[torch.Tensor]]:
    """Consecutive runs of samples whose stored layer inputs fit `cap` bytes (at least one sample each)."""
    out: list[list[torch.Tensor]] = [[]]
    used = 0
    for r in rows:
        need = n_layers * r.shape[1] * token_bytes
        if out[-1] and used + need > cap:
            out.append([])
            used = 0
        out[-1].append(r)
        used += need
    return out


def _fisher_chunk(model: nn.Module, rows: list[torch.Tensor], targets: dict[str, nn.Linear],
                  found: tuple[str, nn.ModuleList], head, accs: dict[str, FisherAccumulator],
                  load, free, progress: Progress | None, device: str, tag: str,
                  finished: Callable[[list[str]], None] | None = None, unpark=None,
                  stored: _StoredInputs | None = None, input_stats: dict[str, Any] | None = None,
                  last: bool = True) -> None:
    """Forward, head and backward passes of one chunk of samples, adding into `accs`; `finished(names)`
    after each layer's backward, `unpark(names, accs)` restores parked partial sums before it; each
    layer's inputs wait in `stored` (default: in memory) between the two passes. input_stats: filled
    in the forward pass (finished there when this is the `last` chunk)."""
    from lpc.pipeline.calibration.stats import advance_layer, attach_input_stats, capture_layer_inputs

    path, layers = found
    states = capture_layer_inputs(model, layers, rows, device)
    stored = stored if stored is not None else _StoredInputs(False)
    with torch.no_grad(), eval_mode(model):
        for i, layer in track(list(enumerate(layers)), f"fisher forward{tag} (layer by layer)", progress):
            _on(load, i)
            layer.to(device)
            stored.put(i, [args[0].detach().cpu() for args, _ in states])
            measured = {n: m for n, m in targets.items() if n.startswith(f"{path}.{i}.")} if input_stats else {}
            handles = attach_input_stats(measured, input_stats) if measured else []
            try:
                for j in range(len(states)):
                    advance_layer(layer, states, j)
            finally:
                for h in handles:
                    h.remove()
            if last:
                for n in measured:
                    input_stats[n].finish()
            layer.to("cpu")
            _on(free, i)
    grads = [_head_grad(head, args[0], ids.to(device)) for (args, _), ids in zip(states, rows)]
    for i in track(list(reversed(range(len(layers)))), f"fisher backward{tag} (layer by layer)", progress):
        _on(load, i)
        layers[i].to(device)
        mine = {n: m for n, m in targets.items() if n.startswith(f"{path}.{i}.")}
        fresh = [n for n in mine if n not in accs]
        for n in fresh:
            accs[n] = FisherAccumulator(mine[n])
        if unpark is not None and fresh:
            unpark(list(mine), accs)
        grads = _layer_backward(layers[i], mine, stored.pop(i), states, grads, {n: accs[n] for n in mine}, device)
        if finished is not None:
            finished(list(mine))
        layers[i].to("cpu")
        _on(free, i)


def _on(fn: Callable[[int], None] | None, i: int) -> None:
    if fn is not None:
        fn(i)


def _head_grad(head: tuple[nn.Module, nn.Module], h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dL/dh of one sample's mean next-token loss (fp32 cross-entropy) at the last hidden state h."""
    norm, lm_head = head
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = lm_head(norm(h))
        loss = F.cross_entropy(logits[0, :-1].to(torch.float32), ids[0, 1:])
        (g,) = torch.autograd.grad(loss, h)
    return g


def _layer_backward(layer: nn.Module, mine: dict[str, nn.Linear], inputs: list[torch.Tensor], states, grads,
                    accs: dict[str, FisherAccumulator], device: str) -> list[torch.Tensor]:
    """Back-propagate each sample's dL/d(output) through `layer` (squared gradients into `accs`);
    returns dL/d(input) per sample."""
    weights = {id(m.weight): m.weight for m in mine.values()}
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    out_grads = []
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in weights)
        with eval_mode(layer, grad=True), torch.enable_grad(), fisher_hooks(layer, mine, accs):
            for x, (args, kwargs), g in zip(inputs, states, grads):
                h = x.to(device).requires_grad_(True)
                out = layer(h, *args[1:], **kwargs)
                y = out[0] if isinstance(out, (tuple, list)) else out
                torch.autograd.backward(y, grad_tensors=g)
                out_grads.append(h.grad.detach())
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
    return out_grads
