"""Layer-wise tuned rounding (`quantize.method: tune`): block reconstruction one decoder layer at a time.

Decoder layers are tuned in order. For layer l, a fp32 latent W~ of each of its target weights is
tuned so that the layer computing with Q(W~) (each Linear's own format, spec and context: FGMP block
mask, scales, fused global amax; straight-through gradient, ste.py; for NVFP4 and FGMP the grid plain
rounding chose is frozen during the steps, frozen.py) reproduces the ORIGINAL layer's output on the
original model's hidden states:

    min_W~  sum_j || L_l(x_j ; Q(W~)) - L_l(x*_j ; W) ||^2  /  sum_j || L_l(x*_j ; W) ||^2

x*_j are sample j's hidden states entering layer l in the original model; x_j are those entering it
in the quantized model (layers < l already tuned and rounded) with `inputs: quantized` (the default),
so each layer also learns to absorb the error the earlier ones left, or x*_j with `inputs: original`.
Simulated activation quantization (W4A4, FGMP activation blocks) is in the tuned forward, with a
straight-through gradient; the target never has it.

Adam moves each latent by steps of `lr` x its weight's RMS; a step accumulates the gradients of
`samples_per_step` training samples (taken in turn), computed under bf16 autocast (`amp`). Every
`eval_every` steps the relative error on held-out samples (every k-th sample, `val_fraction`) is
measured in the layer's own dtype; the best latent is kept, plain rounding (step 0) included, so a
layer is never worse than plain rounding on held-out samples; after `patience` measurements without
improvement the layer stops. The best latent is rounded by the format's own quantizer (what the
artifact stores), measured on the same held-out samples, and kept only if it beats plain rounding
there. Its quantized outputs become the next layer's inputs.

Memory: one layer, three fp32 copies of its targets (latent, Adam's two moments) and one of their
originals, and the calibration set's hidden states (the original stream, its next-layer values and,
with `inputs: quantized`, the quantized stream). Cost per step: `samples_per_step` forwards and
backwards of one layer, and one re-quantization of its targets.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from lpc.pipeline.errors import RecipeError
from lpc.pipeline.modes import eval_mode
from lpc.pipeline.quantization.frozen import FrozenGrid, grid_quantizer
from lpc.pipeline.quantization.registry import QUANTIZE_METHODS, QuantizeMethod, round_to_nearest
from lpc.pipeline.quantization.ste import Quantizer, fake_quantizer, quantized_weights, split_held_out, weight_rms

log = logging.getLogger(__name__)

State = tuple[tuple, dict]  # (args, kwargs) of one sample's call of a decoder layer; args[0] = hidden states


def tune_layer(layer: nn.Module, targets: dict[str, nn.Linear], quantizers: dict[str, Quantizer],
               inputs: list[State], wanted: list[torch.Tensor], cfg: Any, activations=None, device: str = "cpu",
               final: dict[str, Quantizer] | None = None, rounded: dict[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tune the target weights of one decoder layer so that it reproduces `wanted`.

    targets: the layer's Linears to tune (its modules), by name; quantizers: name -> fake quantizer.
    inputs: per sample, the layer's call (hidden states (1, T, H) first); wanted: per sample the
    original layer's output (1, T, H), same order. cfg: steps, lr, eval_every, patience,
    val_fraction, samples_per_step (recipes/schema.py TuneConfig). activations: a function of
    `straight_through` giving the context that simulates activation quantization, or None.
    final: name -> the rounding that will be stored, when `quantizers` only approximate it (a frozen
    grid, frozen.py): the selected weights are measured through it on the same samples, and the
    original weights are returned when that is not better than plain rounding.
    rounded: when given, receives name -> final(tuned weight) (on `device`, the layer's dtype) where
    the tuned weights are kept and were measured through `final`, so the caller need not round again.
    Returns (name -> tuned fp32 weight on the CPU, report). The layer is left as it was.
    """
    t0 = time.perf_counter()
    train, val = split_held_out(len(inputs), cfg.val_fraction)
    pick = val or train
    sim = activations or (lambda straight_through: _nothing())
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with quantized_weights(targets, quantizers) as latents, eval_mode(layer, grad=True), \
                torch.enable_grad(), sim(True):
            def error(idx: list[int]) -> float:
                with torch.no_grad():
                    return _error(layer, inputs, wanted, idx, device)

            # fused: one kernel per step for all latents (8x the default per-tensor loop on a CPU at 1B width)
            sums = {n: targets[n].parametrizations.weight[0] for n in latents}  # QuantizedWeight modules
            for q in sums.values():
                q.accumulate = True
            opt = torch.optim.Adam([{"params": [p], "lr": cfg.lr * weight_rms(targets[n])} for n, p in latents.items()],
                                   fused=torch.device(device).type in ("cpu", "cuda"))
            start = error(pick)
            best = (start, 0, {n: p.detach().clone() for n, p in latents.items()})
            history, misses, done, train_loss = [{"step": 0, "error": start}], 0, 0, None
            per = max(1, min(cfg.samples_per_step, len(train)))
            for step in range(1, cfg.steps + 1):
                opt.zero_grad(set_to_none=True)
                chunk = [train[(i + (step - 1) * per) % len(train)] for i in range(per)]
                with _autocast(cfg, device):
                    train_loss = _backward(layer, inputs, wanted, chunk, device)
                for n, p in latents.items():
                    p.grad = sums[n].take_grad()
                opt.step()
                for p in latents.values():  # a fused step leaves the version counter; Q(latent) is cached on it
                    torch.autograd.graph.increment_version(p)
                done = step
                if step % cfg.eval_every and step != cfg.steps:
                    continue
                score = error(pick)
                history.append({"step": step, "error": score, "train_error": train_loss})
                if score < best[0]:
                    best, misses = (score, step, {n: p.detach().clone() for n, p in latents.items()}), 0
                else:
                    misses += 1
                    if misses >= cfg.patience:
                        break
        tuned = {n: w.float() for n, w in best[2].items()}
        stored = best[0]
        if final is not None and best[1] > 0:  # the rounding the artifact will hold, on the same samples
            # handed over on the frozen grid: a frozen grid's stored rounding (tune's `_on_grid`) encodes it
            # on that grid; another format's own rounding finds (almost) the same values again
            tuned = {n: quantizers[n](w).float() for n, w in tuned.items()}
            fake = {n: final[n](tuned[n]) for n in targets}
            with _weights(targets, fake), eval_mode(layer), sim(False):
                stored = _error(layer, inputs, wanted, pick, device)
            if rounded is not None and stored < start:
                rounded.update(fake)
        if not stored < start:
            tuned, stored = {n: m.weight.detach().float() for n, m in targets.items()}, start
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    tuned = {n: w.cpu() for n, w in tuned.items()}
    report = {"steps": done, "best_step": best[1], "error_start": start, "error_best": best[0],
              "error_final": stored, "kept": "tuned" if stored < start else "plain rounding",
              "selected_on": "held-out samples" if val else "training samples",
              "train_samples": len(train), "val_samples": len(val), "history": history,
              "seconds": round(time.perf_counter() - t0, 3)}
    return tuned, report


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _autocast(cfg: Any, device: str):
    """The training steps' autocast (`amp: bf16`): matmuls in bf16, 2-5x faster on CPUs with bf16 units and on
    GPUs; the loss is summed in fp32. Only the gradient's direction depends on it: which step is kept, and
    whether the tuned rounding beats plain rounding, is measured in the layer's own dtype."""
    if getattr(cfg, "amp", "none") != "bf16":
        return _nothing()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer: nn.Module, state: State, device: str = "cpu") -> torch.Tensor:
    """The layer's output hidden states for one sample's call (computed on `device`)."""
    args, kwargs = state
    out = layer(*_to(args, device), **_to(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().sum()


def _error(layer: nn.Module, inputs: list[State], wanted: list[torch.Tensor], idx: list[int], device: str) -> float:
    """sum ||L(x) - y||^2 / sum ||y||^2 over samples idx (fp32 sums of each sample, added in fp64)."""
    num = sum(float(_sq(run_layer(layer, inputs[j], device), wanted[j].to(device))) for j in idx)
    den = sum(float(wanted[j].float().square().sum()) for j in idx)
    return num / max(den, 1e-30)


def _backward(layer: nn.Module, inputs: list[State], wanted: list[torch.Tensor], idx: list[int], device: str) -> float:
    """Back-propagate the relative squared error of samples idx (one sample at a time); returns it."""
    den = max(sum(float(wanted[j].float().square().sum()) for j in idx), 1e-30)
    total = 0.0
    for j in idx:
        loss = _sq(run_layer(layer, inputs[j], device), wanted[j].to(device)) / den
        loss.backward()
        total += float(loss.detach())
    return total


class LayerwiseTuner:
    """The hidden-state streams of a layer-wise tuning and one `tune_layer` per decoder layer.

    The engine calls `begin(states)` with decoder layer 0's inputs, then `layer(...)` for each decoder
    layer in order (resident, original weights), then reads `report()`.
    """

    def __init__(self, cfg: Any, act_plan: dict[str, dict] | None, root: nn.Module, device: str = "cpu"):
        if cfg.inputs not in ("quantized", "original"):
            raise RecipeError(f"quantize.tune.inputs must be 'quantized' or 'original', got {cfg.inputs!r}",
                              "--set quantize.tune.inputs=quantized")
        self.cfg, self.act_plan, self.root, self.device = cfg, act_plan or {}, root, device
        self.orig: list[State] = []
        self.quant: list[State] | None = None
        self.reports: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def begin(self, states: list[State]) -> None:
        self.orig = [((_detached(a[0]),) + tuple(a[1:]), kw) for a, kw in states]
        self.quant = list(self.orig) if self.cfg.inputs == "quantized" else None

    def layer(self, layer: nn.Module, targets: dict[str, nn.Linear],
              setups: dict[str, tuple]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Tune the planned targets of one decoder layer, advance the streams past it; returns
        (name -> tuned fp32 weight, the layer's report, name -> the QTensor of that weight where the
        tuning already rounded it, so that it is not rounded again for the artifact)."""
        names = [n for n in targets if n in setups]
        mine = {n: targets[n] for n in names}
        layer.to(self.device)
        try:
            return self._layer(layer, names, mine, setups)
        finally:
            layer.to("cpu")

    def _layer(self, layer: nn.Module, names: list[str], mine: dict[str, nn.Linear],
               setups: dict[str, tuple]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        kept: dict[str, dict[str, Any]] = {n: {} for n in names}
        quantizers = {n: fake_quantizer(*setups[n], mine[n].weight.dtype, keep=kept[n]) for n in names}
        with eval_mode(layer):
            wanted = [run_layer(layer, s, self.device).detach().cpu() for s in self.orig]
        inputs = self.quant if self.quant is not None else self.orig
        rounded: dict[str, torch.Tensor] = {}  # the tuned weights as stored, when tune_layer rounded them
        grid: dict[str, Any] = {}
        if names and self.cfg.steps > 0:
            grid = {n: grid_quantizer(*setups[n], mine[n].weight.detach(), mine[n].weight.dtype) for n in names}
            stored = {n: _on_grid(grid[n], kept[n]) if isinstance(grid[n], FrozenGrid) else quantizers[n]
                      for n in names}
            tuned, report = tune_layer(layer, mine, grid, inputs, wanted, self.cfg,
                                       lambda st: self._activations(names, st), self.device, final=stored,
                                       rounded=rounded)
        else:
            tuned = {n: m.weight.detach().float().cpu() for n, m in mine.items()}
            report = {"steps": 0, "best_step": 0}
        for n in names:  # plain rounding kept: a measured rounding is not stored; a frozen grid holds plain's
            if n not in rounded:
                kept[n].pop("q", None)
                if isinstance(grid.get(n), FrozenGrid):
                    kept[n]["q"] = grid[n].plain
        if self.quant is not None:
            fake = {n: rounded[n] if n in rounded else
                    _dequantized(kept[n]["q"], mine[n].weight.dtype) if "q" in kept[n] else
                    quantizers[n](tuned[n].to(self.device)) for n in names}
            with _weights(mine, fake), eval_mode(layer), \
                    self._activations(names, False):
                outs = [run_layer(layer, s, self.device).detach().cpu() for s in self.quant]
            self.quant = [((o,) + tuple(a[1:]), kw) for o, (a, kw) in zip(outs, self.quant)]
        self.orig = [((w,) + tuple(a[1:]), kw) for w, (a, kw) in zip(wanted, self.orig)]
        report = {"layers": names, **report}
        self.reports.append(report)
        log.info("tune: %d targets, relative output error %.5g -> %.5g (step %s of %s)", len(names),
                 report.get("error_start", 0.0), report.get("error_final", 0.0), report["best_step"],
                 report["steps"])
        # the QTensor of each returned weight where it is known: the tuned rounding measured in tune_layer,
        # plain rounding on a frozen grid, or (quantized inputs) the rounding that made the next layer's
        # inputs; the artifact stores it without encoding it again
        return tuned, report, {n: kept[n]["q"] for n in names if "q" in kept[n]}

    def report(self) -> dict[str, Any]:
        tuned = [r for r in self.reports if "error_start" in r]
        return {"inputs": self.cfg.inputs, "decoder_layers": len(self.reports),
                "improved_layers": sum(r["kept"] == "tuned" for r in tuned),
                "mean_error_start": sum(r["error_start"] for r in tuned) / max(len(tuned), 1),
                "mean_error_final": sum(r["error_final"] for r in tuned) / max(len(tuned), 1),
                "seconds": round(time.perf_counter() - self.t0, 3), "per_layer": self.reports}

    def _activations(self, names: list[str], straight_through: bool):
        return simulated_activations(self.root, {n: self.act_plan[n] for n in names if n in self.act_plan},
                                     straight_through)


def _on_grid(grid: FrozenGrid, keep: dict[str, Any]) -> Quantizer:
    """The stored rounding of a weight tuned on a frozen grid: its QTensor on that grid (kept in
    keep["q"]), dequantized. The weights handed to it are on the grid already, so it moves none."""
    def stored(v: torch.Tensor) -> torch.Tensor:
        keep["q"] = q = grid.encode(v)
        return _dequantized(q, grid.dtype)
    return stored


def _dequantized(q: Any, dtype: torch.dtype) -> torch.Tensor:
    from lpc.formats import get_format

    return get_format(q.format).dequantize(q, dtype=dtype)


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


@contextmanager
def simulated_activations(root: nn.Module, plan: dict[str, dict], straight_through: bool) -> Iterator[None]:
    """Activation quantization hooks of `plan` (Linear names in `root`) while inside."""
    if not plan:
        yield
        return
    from lpc.pipeline.quantization.actquant import attach_activation_quant

    handles = attach_activation_quant(root, plan, straight_through=straight_through)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _weights(targets: dict[str, nn.Linear], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """The targets compute with `values` (cast to each weight's dtype) while inside."""
    saved = {n: m.weight for n, m in targets.items()}
    try:
        for n, m in targets.items():
            m.weight = nn.Parameter(values[n].to(saved[n].dtype), requires_grad=False)
        yield
    finally:
        for n, m in targets.items():
            m.weight = saved[n]


def tune_resident(x: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`method: tune` on a model loaded whole (TuneInputs): the same walk as the layer-streaming
    engine, layer by layer over the resident decoder stack. Planned targets outside the stack keep
    plain rounding (listed in the report as `untuned`)."""
    from lpc.pipeline.calibration.stats import capture_layer_inputs
    from lpc.pipeline.io.models import decoder_layers
    from lpc.pipeline.progress import track

    found = decoder_layers(x.model)
    if found is None:
        raise RecipeError("quantize.method=tune tunes one decoder layer at a time, and this model has no "
                          "decoder-layer stack lpc knows", "use --set quantize.method=rtn (or gptq)")
    path, layers = found
    tuner = layer_tuner(x.recipe, _act_plan(x), x.model, x.device)
    with torch.no_grad(), eval_mode(x.model):
        tuner.begin(capture_layer_inputs(x.model, layers, x.batches, x.device))
    tuned: dict[str, torch.Tensor] = {}
    for i, layer in track(list(enumerate(layers)), "tune (layer by layer)", x.progress):
        mine = {n: m for n, m in x.targets.items() if n.startswith(f"{path}.{i}.")}
        got, _, rounded = tuner.layer(layer, mine, {n: x.setups[n] for n in mine if n in x.setups})
        tuned.update(got)
        x.rounded.update(rounded)
    untuned = sorted(n for n in x.setups if n not in tuned)
    return tuned, {**tuner.report(), "untuned": untuned}


def _act_plan(x: Any) -> dict[str, dict] | None:
    from lpc.pipeline.quantization.actquant import activation_config, activation_plan

    acts, aux = activation_config(x.recipe, x.setups, x.stats, x.plan)
    return activation_plan(acts, aux) if acts else None


def layer_tuner(recipe: Any, act_plan: dict[str, dict] | None, root: nn.Module, device: str = "cpu") -> LayerwiseTuner:
    """The tuner of `quantize.tune` settings for the layer-streaming engine (or `tune_resident`)."""
    return LayerwiseTuner(recipe.quantize.tune, act_plan, root, device)


QUANTIZE_METHODS.add("tune", QuantizeMethod(
    round_to_nearest, tune=tune_resident, layer_tuner=layer_tuner, needs_calibration=True,
    description="tune each decoder layer's weights (straight-through, one layer at a time) so that the "
                "layer reproduces the original layer's outputs on the calibration text, then round"))
