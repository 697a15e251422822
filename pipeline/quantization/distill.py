"""Distillation-tuned rounding: fit the quantized weights to the original model's predictions.

Plain rounding (or GPTQ) makes each layer close to its original; what matters is the whole model's
next-token distribution. `distill_weights` tunes a latent copy W~ of every target weight so that
the model whose Linears use Q(W~) (each layer's own format, spec and context: mask, scales, global
amax) predicts like the original model on the calibration sequences:

    min_W~  (1 / #tokens) sum_t KL( p_orig(. | x_<t) || p_quant(. | x_<t; Q(W~)) )

Q is not differentiable; its straight-through estimate Q(W~) + (W~ - sg(W~)) passes the gradient
to W~ unchanged. Adam updates W~ with a per-layer step `lr * rms(W)`, so one `lr` fits layers of
any scale. The objective is the original model itself (no labels), so the tuned model is pulled
toward the original, never past it toward the calibration text. Every `eval_every` steps the KL on
held-out calibration sequences (`val_fraction` of them, every k-th) is measured; the latent with
the lowest held-out KL is kept and tuning stops after `patience` evaluations without improvement.
Step 0 (plain rounding) is a candidate, so tuning never returns something worse on held-out data.

Simulated activation quantization (W4A4, FGMP activation blocks) is applied in the tuned model's
forward with a straight-through estimate as well, so weights adapt to quantized inputs.

Memory: the model plus three fp32 copies of the target weights (latent, Adam's two moments) and
one of the originals; decoder layers are gradient-checkpointed. Cost per step: one forward of the
original model and one forward plus backward of the quantized one over the training sequences.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lpc.pipeline.errors import InputError
from lpc.pipeline.calibration.fisher import eval_with_checkpointing, frozen_params, input_device
from lpc.pipeline.progress import Progress, track
from lpc.pipeline.quantization.registry import QUANTIZE_METHODS, QuantizeMethod, TuneInputs, round_to_nearest
from lpc.pipeline.quantization.ste import fake_quantizer, quantized_weights, split_held_out, weight_rms

__all__ = ["distill_weights", "fake_quantizer"]  # fake_quantizer lives in ste.py

log = logging.getLogger(__name__)


def distill_weights(model: nn.Module, targets: dict[str, nn.Linear],
                    quantizers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                    batches: list[torch.Tensor], steps: int = 100, lr: float = 1e-3,
                    eval_every: int = 10, patience: int = 3, val_fraction: float = 0.125,
                    activation_plan: dict[str, dict] | None = None, checkpointing: bool = True,
                    batch_rows: int = 8, progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tune the weights of `targets` so the model quantized by `quantizers` matches the original.

    quantizers: layer name -> function (fp32 weight) -> its fake-quantized weight (same shape).
    batches: LongTensor (B, T) token ids, no padding; every k-th batch (k = round(1 / val_fraction))
        is held out for selection when there are at least 2 batches and val_fraction > 0. Sequences
        are then sorted by length and run `batch_rows` at a time, right-padded and masked; the KL
        is the mean over all real positions.
    Returns (layer name -> tuned fp32 weight on CPU, report). The model is left as it was: same
    weights, requires_grad flags, modes and hooks.
    """
    _check(targets, quantizers, batches, steps, lr, eval_every, patience, val_fraction)
    train_seqs, val_seqs = _split(batches, val_fraction)
    device = input_device(model)
    train, val = _packs(train_seqs, batch_rows, device), _packs(val_seqs, batch_rows, device)
    n_train = sum(int(mask.sum()) for _, mask in train)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(frozen_params(model))
        params = stack.enter_context(quantized_weights(targets, quantizers))
        stack.enter_context(eval_with_checkpointing(model, checkpointing))
        teacher = _TeacherCache(model, targets)
        # The RMS is read through the parametrization (the quantized weight), which also fills
        # each layer's Q cache for step 0.
        groups = [{"params": [p], "lr": lr * weight_rms(targets[n])} for n, p in params.items()]
        opt = torch.optim.Adam(groups)

        def kl_on(packs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            with torch.no_grad(), _activations(model, activation_plan, teacher):
                total = sum(float(_kl(model, ids, mask, teacher(ids, mask))) for ids, mask in packs)
            return total / sum(int(mask.sum()) for _, mask in packs)

        score = kl_on(val or train)
        history = [{"step": 0, "kl": score}]
        best = (score, 0, {n: p.detach().clone() for n, p in params.items()})
        first_train = None
        misses, done = 0, 0
        for step in track(range(1, steps + 1), "distill", progress):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            with _activations(model, activation_plan, teacher):
                for ids, mask in train:
                    loss = _kl(model, ids, mask, teacher(ids, mask)) / n_train
                    loss.backward()
                    total += float(loss.detach())
            first_train = total if first_train is None else first_train
            opt.step()
            done = step
            if step % eval_every and step != steps:
                continue
            score = kl_on(val or train)
            history.append({"step": step, "kl": score, "train_kl": total})
            log.info("distill step %d: held-out KL %.5f (train %.5f)", step, score, total)
            if score < best[0]:
                best, misses = (score, step, {n: p.detach().clone() for n, p in params.items()}), 0
            else:
                misses += 1
                if misses >= patience:
                    break
        tuned = {n: w.float().cpu() for n, w in best[2].items()}
    report = {"steps": done, "best_step": best[1], "kl_start": history[0]["kl"], "kl_best": best[0],
              "selected_on": "held-out calibration sequences" if val else "training sequences",
              "train_sequences": sum(b.shape[0] for b in train_seqs),
              "val_sequences": sum(b.shape[0] for b in val_seqs),
              "train_kl_first_step": first_train, "history": history,
              "seconds": round(time.perf_counter() - t0, 3)}
    return tuned, report


def _check(targets, quantizers, batches, steps, lr, eval_every, patience, val_fraction) -> None:
    missing = [n for n in targets if n not in quantizers]
    if missing:
        raise InputError(f"distill has no quantizer for layers {missing[:3]}",
                         "plan a format for every target layer (or drop it from the targets)")
    if not batches:
        raise InputError("distill got no calibration sequences", "calibrate on some text first")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[1] < 2:
            raise InputError(f"distill batches must be token ids (B, T) with T >= 2, got "
                             f"{tuple(getattr(b, 'shape', ()))}", "use calibration_batches()")
    if not (isinstance(steps, int) and steps >= 0 and isinstance(eval_every, int) and eval_every >= 1
            and isinstance(patience, int) and patience >= 1):
        raise InputError(f"distill needs steps >= 0, eval_every >= 1, patience >= 1; got {steps}, "
                         f"{eval_every}, {patience}", "e.g. steps=100, eval_every=10, patience=3")
    if not (lr > 0 and math.isfinite(lr)) or not 0 <= val_fraction < 1:
        raise InputError(f"distill needs lr > 0 and 0 <= val_fraction < 1; got {lr}, {val_fraction}",
                         "e.g. lr=1e-3, val_fraction=0.125")


def _split(batches: list[torch.Tensor], val_fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every k-th batch (k = round(1 / val_fraction), counting from the k-th) is held out."""
    train, held = split_held_out(len(batches), val_fraction)
    return [batches[i] for i in train], [batches[i] for i in held]


def _packs(batches: list[torch.Tensor], rows: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences sorted by length (stable), `rows` per pack, right-padded: [(ids, mask)]."""
    seqs = [row for b in batches for row in b]
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    packs = []
    for start in range(0, len(order), rows):
        group = [seqs[i] for i in order[start:start + rows]]
        ids = torch.nn.utils.rnn.pad_sequence(group, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(g) for g in group], batch_first=True)
        packs.append((ids.to(device), mask.to(device)))
    return packs


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    padded = not bool(mask.all())
    return model(input_ids=ids, attention_mask=mask if padded else None, use_cache=False).logits.float()


def _kl(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Sum over the real positions of KL(teacher || model), fp32."""
    logq = F.log_softmax(_logits(model, ids, mask), -1)
    kl = (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)
    return (kl * mask).sum()


class _TeacherCache:
    """Original-model log-probabilities per batch, computed once and kept while they fit a budget
    (otherwise recomputed each time)."""

    BUDGET_BYTES = 1 << 30

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear]):
        self.model, self.targets = model, targets
        self.cache: dict[int, torch.Tensor] = {}
        self.used = 0
        self.active = False

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        key = id(ids)
        if key in self.cache:
            return self.cache[key]
        with torch.no_grad(), self._teacher():
            logp = F.log_softmax(_logits(self.model, ids, mask), -1)
        size = logp.numel() * logp.element_size()
        if self.used + size <= self.BUDGET_BYTES:
            self.cache[key], self.used = logp, self.used + size
        return logp

    @contextmanager
    def _teacher(self) -> Iterator[None]:
        mods = [m.parametrizations.weight[0] for m in self.targets.values()]
        for p in mods:
            p.teacher = True
        self.active = True
        try:
            yield
        finally:
            self.active = False
            for p in mods:
                p.teacher = False


@contextmanager
def _activations(model: nn.Module, plan: dict[str, dict] | None, teacher: "_TeacherCache") -> Iterator[None]:
    """Simulated activation quantization on the tuned model's forwards (not the original's)."""
    if not plan:
        yield
        return
    from lpc.pipeline.quantization.actquant import attach_activation_quant

    handles = attach_activation_quant(model, plan, straight_through=True, when=lambda: not teacher.active)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _tune(x: TuneInputs) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`method: distill`: each layer's fake quantizer exactly as it will be rounded (the same setups),
    the activations simulated as at eval."""
    from lpc.pipeline.quantization.actquant import activation_config, activation_plan

    quantizers = {n: fake_quantizer(fmt, spec, ctx, x.targets[n].weight.dtype) for n, (fmt, spec, ctx) in x.setups.items()}
    acts, aux = activation_config(x.recipe, x.setups, x.stats, x.plan)
    act_plan = activation_plan(acts, aux) if acts else None
    d = x.recipe.quantize.distill
    x.model.to(x.device)
    try:
        return distill_weights(x.model, {n: x.targets[n] for n in x.setups}, quantizers, x.batches, d.steps, d.lr,
                               d.eval_every, d.patience, d.val_fraction, act_plan, batch_rows=d.batch_rows,
                               progress=x.progress)
    finally:
        x.model.to("cpu")


QUANTIZE_METHODS.add("distill", QuantizeMethod(
    round_to_nearest, tune=_tune, needs_calibration=True,
    description="tune the weights so the quantized model matches the original's predictions "
                "(KL on the calibration text, straight-through), then round"))
