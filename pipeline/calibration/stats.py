"""Calibration statistics of the inputs of target Linears: absmax and X^T X / n (or only its
diagonal E[x^2] when the recipe needs no more: `needs_covariance`).

Models with a stack of decoder layers are walked layer by layer: the hidden states entering layer 0
are captured once, then each layer runs alone over the cached states (moved to the device only for
its turn), so activation memory does not grow with depth; a finished layer's statistics can be
handed to the caller (`on_layer`) and written out. Other models fall back to hooks over a whole
forward pass. Under torchrun the samples are sharded by rank and summed in the single-process order
(io/distributed.py). calibration/stored.py reads a calibration back one layer at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lpc.pipeline.io.models import decoder_layers
from lpc.pipeline.progress import Progress, track

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Running statistics of a Linear's input x (in,): absmax, rows seen, and either the sum of
    x x^T (`full`, fp64 (in, in)) or only its diagonal, the sum of x^2 (fp64 (in,)).

    The running sums are allocated on first use; `finish()` keeps only the fp32 result (covariance
    or second moment), so layer-by-layer calibration holds one layer's fp64 buffers at a time.
    """

    in_features: int
    absmax: torch.Tensor
    xtx: torch.Tensor | None = None
    count: int = 0
    cov: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    full: bool = True

    @classmethod
    def empty(cls, in_features: int, full: bool = True) -> "InputStats":
        return cls(in_features, torch.zeros(in_features), full=full)

    def update(self, x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> None:
        """Add the rows of x (..., in); `moments` = input_moments(x) when already computed for a sibling."""
        if self.cov is not None:
            raise RuntimeError("statistics were finished; no more updates")
        absmax, xtx, n = moments if moments is not None else input_moments(x, self.full)
        self.absmax = torch.maximum(self.absmax, absmax)
        if self.xtx is None:
            shape = (self.in_features, self.in_features) if self.full else (self.in_features,)
            self.xtx = torch.zeros(shape, dtype=torch.float64)
        self.xtx += xtx
        self.count += n

    def covariance(self) -> torch.Tensor:
        """X^T X / n as float32: (in, in) when `full`, else its diagonal (in,)."""
        if self.cov is not None:
            return self.cov
        if self.xtx is None:
            return torch.zeros(self.in_features, self.in_features) if self.full else torch.zeros(self.in_features)
        return (self.xtx / max(self.count, 1)).float()

    def finish(self) -> None:
        """Keep only the fp32 result (frees the fp64 running sum)."""
        self.cov = self.covariance()
        self.xtx = None


def input_moments(x: torch.Tensor, full: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (..., in) -> (absmax (in,) fp32, X^T X (in, in) or sum x^2 (in,) fp64, rows), on the CPU.

    The product runs in fp32 on x's device (a calibration batch is a few thousand rows: fp32 sums
    keep ~1e-6 relative error) and is accumulated across batches in fp64; an fp64 product costs
    several times more."""
    rows = x.detach().reshape(-1, x.shape[-1])
    r = rows.float()
    second = (r.T @ r) if full else r.square().sum(0)
    return rows.abs().amax(0).float().cpu(), second.double().cpu(), rows.shape[0]


def needs_covariance(recipe: Any) -> bool:
    """Whether a recipe needs the full X^T X of each input (GPTQ's Hessian, the compensation's
    low-rank fit), or only its diagonal and absmax (round-to-nearest of any format, tuning, and the
    allocations: FGMP and VaPr weigh errors by Fisher information and the diagonal)."""
    return recipe.quantize.method == "gptq" or recipe.compensate is not None


# Formats that read calibration statistics only as the importance of a scale search or of
# sensitivity clipping (anything else, e.g. FGMP's precision mask, needs them).
_IMPORTANCE_ONLY = {"nvfp4", "fp8_e4m3", "fp8_e5m2", "mxfp4", "mxfp8", "bf16"}


def needs_statistics(recipe: Any) -> bool:
    """Whether quantizing by `recipe` reads anything a calibration measures. False for data-free
    rounding (round-to-nearest, amax scales, no scale search or sensitivity clipping, no activation
    or KV-cache quantization, nothing allocated or compensated): its calibration runs no forward pass."""
    q = recipe.quantize
    if (needs_covariance(recipe) or recipe.calibrate.fisher or recipe.kv_cache is not None
            or q.activations is not None or q.method != "rtn"):
        return True
    for choice in [q.weights] + [o.weights for o in q.overrides]:
        if choice is None:
            continue
        spec = dict(choice.spec)
        if choice.format not in _IMPORTANCE_ONLY or spec.get("context"):
            return True
        if q.importance != "none" and (spec.get("scale_search", 0) or spec.get("clip", "none") == "sensitivity"):
            return True
    return False


def check_full_covariance(calib_dir: str | Path, what: str) -> None:
    """RecipeError unless the calibration holds act_cov (it was made for a recipe needing it)."""
    from lpc.pipeline.errors import RecipeError

    from lpc.pipeline.calibration.stored import read_stats

    stats = read_stats(calib_dir)
    name = next(iter(stats), None)
    if name is not None and "act_cov" not in stats.fields(name):
        raise RecipeError(f"{what} needs the full input covariance, but calibration {calib_dir} holds only "
                          "its diagonal", "re-run lpc calibrate with the same --recipe as this stage")


class _SharedInput:
    """Siblings fed the same tensor (q/k/v, gate/up) get its moments computed once."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.last: torch.Tensor | None = None
        self.moments: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.last is not x:
            self.last, self.moments = x, input_moments(x, self.full)
        return self.moments


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once layer 0's inputs are seen."""


def attach_input_stats(targets: dict[str, nn.Linear], stats: dict[str, InputStats],
            record: dict[str, tuple] | None = None) -> list[Any]:
    """Hooks adding each target's input moments to `stats` (or, given `record`, storing them there)."""
    shared = _SharedInput(all(stats[n].full for n in targets))

    def hook_for(name: str):
        def hook(_mod, args):
            if record is not None:
                record[name] = shared.of(args[0])
            else:
                stats[name].update(args[0], shared.of(args[0]))
        return hook
    return [mod.register_forward_pre_hook(hook_for(name)) for name, mod in targets.items()]


@torch.no_grad()
def collect_input_stats(model: nn.Module, batches: list[torch.Tensor], targets: dict[str, nn.Linear],
                        progress: Progress | None = None, device: str = "cpu",
                        store: Any = None, full: bool = True,
                        on_layer: Callable[[dict[str, InputStats]], None] | None = None) -> dict[str, InputStats]:
    """Per target Linear: input absmax (in,), X^T X (or its diagonal unless `full`), token count.

    store: a `streaming.WeightStore` when `model` is a meta skeleton: each decoder layer's weights
    are then loaded for its turn and released after it.
    on_layer: called with a decoder layer's targets' statistics once they are finished
    (the caller may write them out and drop them, so only one layer's statistics stay in memory).
    """
    stats = {name: InputStats.empty(mod.in_features, full) for name, mod in targets.items()}
    found = decoder_layers(model)
    inside = {n for n in targets if found and n.startswith(found[0] + ".")}
    if found and inside:
        _layerwise(model, batches, {n: targets[n] for n in inside}, stats, found, progress, device, store, on_layer)
    rest = {n: m for n, m in targets.items() if n not in inside}
    if rest:
        from lpc.pipeline.io import distributed
        distributed.refuse("calibrating targets outside a decoder-layer stack")
        if found is None:
            log.info("no decoder-layer stack found: calibrating with hooks over whole forward passes")
        _whole_model(model, batches, rest, stats, progress, device)
    return stats


def _whole_model(model, batches, targets, stats, progress, device) -> None:
    handles = attach_input_stats(targets, stats)
    model.to(device)
    try:
        for ids in track(batches, "calibrate (whole model)", progress):
            model(ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.to("cpu")


def capture_layer_inputs(model, layers: nn.ModuleList, batches, device) -> list[tuple[tuple, dict]]:
    """Inputs (args, kwargs) of decoder layer 0 for each batch, as the model itself builds them."""
    captured: list[tuple[tuple, dict]] = []

    def grab(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for m in _outside_layers(model, layers):
            m.to(device)
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m in _outside_layers(model, layers):
            m.to("cpu")
    return captured


def _outside_layers(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Leaf-ish modules that are not inside the decoder stack (embeddings, norms, rotary...)."""
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside and not any(True for _ in m.children())]


def advance_layer(layer: nn.Module, states: list, j: int) -> None:
    """Run sample j's hidden states through `layer` (the hooks see its Linears' inputs)."""
    args, kwargs = states[j]
    out = layer(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    states[j] = ((hidden,) + tuple(args[1:]), kwargs)


def _advance_in_step(layer: nn.Module, states: list, mine: dict[str, nn.Linear], stats: dict[str, InputStats],
                     total: int) -> None:
    """Data-parallel: round j runs each rank's j-th sample, then every rank adds the moments of samples
    j*world .. j*world + world - 1 in that order (io/distributed.py): the single-process sums."""
    from lpc.pipeline.io import distributed as dd

    for j in range(dd.rounds(total)):
        record: dict[str, tuple] = {}
        if j < len(states):
            handles = attach_input_stats(mine, stats, record)
            try:
                advance_layer(layer, states, j)
            finally:
                for h in handles:
                    h.remove()
        for r in range(dd.world()):
            if j * dd.world() + r >= total:
                break
            for name in sorted(mine):  # the same order on every rank
                s = stats[name]
                like = [s.absmax, torch.zeros(s.in_features, s.in_features) if s.full else s.absmax,
                        torch.zeros(1, dtype=torch.int64)]
                like[1] = like[1].double()
                mine_now = record.get(name)
                sent = [mine_now[0], mine_now[1], torch.tensor([mine_now[2]])] if r == dd.rank() else None
                absmax, second, n = dd.broadcast_tensors(sent, like, src=r)
                s.update(None, (absmax, second, int(n.item())))


def _layerwise(model, batches, targets, stats, found, progress, device, store=None, on_layer=None) -> None:
    from lpc.pipeline.io import distributed as dd

    total = None
    if dd.active():  # `batches` is this rank's share; the sums run in the single-process order
        counts = [int(dd.broadcast_tensors([torch.tensor([len(batches)])] if dd.rank() == r else None,
                                           [torch.zeros(1, dtype=torch.int64)], r)[0].item())
                  for r in range(dd.world())]
        total = sum(counts)
    path, layers = found
    states = capture_layer_inputs(model, layers, batches, device)
    for i, layer in track(list(enumerate(layers)), "calibrate (layer by layer)", progress):
        prefix = f"{path}.{i}."
        mine = {n: m for n, m in targets.items() if n.startswith(prefix)}
        handles = attach_input_stats(mine, stats) if total is None else []
        if store is not None:
            from lpc.pipeline.io.streaming import materialize
            materialize(layer, f"{path}.{i}", store)
        layer.to(device)
        try:
            if total is None:
                for j, (args, kwargs) in enumerate(states):
                    advance_layer(layer, states, j)
            else:
                _advance_in_step(layer, states, mine, stats, total)
        finally:
            for h in handles:
                h.remove()
            for name in mine:
                stats[name].finish()
            layer.to("cpu")
            if store is not None:
                from lpc.pipeline.io.streaming import release
                release(layer)
        if on_layer is not None:
            on_layer({n: stats[n] for n in mine})


def stats_tensors(stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
    """Flatten statistics into the tensors of stats.safetensors (`<name>.act_cov`, or
    `<name>.act_sqmean` = its diagonal E[x^2] when only that was collected, ...)."""
    out = {}
    for name, s in stats.items():
        out[f"{name}.act_absmax"] = s.absmax.float()
        out[f"{name}.act_cov" if s.full else f"{name}.act_sqmean"] = s.covariance()
        out[f"{name}.count"] = torch.tensor([s.count], dtype=torch.int64)
        for key, t in s.extra.items():
            out[f"{name}.{key}"] = t.float()
    return out
