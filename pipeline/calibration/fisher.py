"""Empirical Fisher diagonals of target Linears: per weight element and per input channel.

Definitions (what FGMP, arXiv 2504.14152, calls the empirical Fisher of the per-sample loss):

- A *sample* is one row of a batch: a token sequence x_s of length T_s >= 2.
- Its loss L_s = (1 / (T_s - 1)) * sum_{t < T_s - 1} CE(logits_t, x_{s, t+1}): the mean next-token
  cross-entropy over the T_s - 1 positions that have a target, computed in fp32.
- weight_fisher[o, i] = (1 / N) * sum_s (dL_s / dW[o, i])^2 over the N samples: each sample's
  gradient is squared on its own, then the squares are averaged (not the square of a mean gradient).
- act_fisher[i] = (1 / M) * sum_s sum_t (dL_s / dx_{s,t,i})^2 with M = sum_s (T_s - 1) the number
  of predicted tokens. x is the input of this Linear and the gradient is the one through this
  Linear only (dL/dx = dL/dy @ W), so q/k/v sharing one input each get their own statistic. The
  last position of a sequence has no target and influences no loss, so its gradient is zero; it is
  not counted in M.

Memory: no optimizer and no `.grad` kept; every parameter except the target weights has
requires_grad False, each target's gradient is squared into an fp32 accumulator and freed as soon
as autograd has accumulated it, and decoder layers are gradient-checkpointed when the model has
them. The model's weights are not modified; requires_grad flags, train/eval modes and
checkpointing flags are restored on exit, even after an error.
"""
from __future__ import annotations

import functools
import logging
from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lpc.pipeline.errors import InputError
from lpc.pipeline.sums import add_fp32
from lpc.pipeline.modes import eval_mode
from lpc.pipeline.progress import Progress, track

logger = logging.getLogger(__name__)


class FisherAccumulator:
    """fp32 running sums for one target Linear: weight (out, in), activation (in,)."""

    def __init__(self, module: nn.Linear):
        w = module.weight
        self.weight_sum = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        self.act_sum = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)

    def add_input_grad(self, gx: torch.Tensor) -> None:
        """dL/dx through this Linear only (..., in): squared in fp32, summed over every token."""
        gx = gx.to(torch.float32)
        self.act_sum.add_(gx.reshape(-1, gx.shape[-1]).square().sum(0))

    def add_output_grad(self, module: nn.Linear, grad_out: torch.Tensor) -> None:
        """The same from dL/dy, for an input that does not require grad: dL/dx = dL/dy @ W."""
        self.add_input_grad(grad_out @ module.weight.detach())


class _InputGrad(torch.autograd.Function):
    """Identity on a Linear's input whose backward reads the gradient that flows into that input from this
    Linear alone (autograd's own dL/dy @ W, before the uses of a shared input are summed): the activation
    Fisher without computing that product again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, acc: FisherAccumulator) -> torch.Tensor:
        ctx.acc = acc
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.acc.add_input_grad(grad)
        return grad, None


def _take_weight_grad(param: torch.Tensor, group: list[FisherAccumulator]) -> None:
    """Add the gradient's fp32 square into each accumulator (a cache-sized run at a time on a CPU:
    pipeline/sums.py) and free the gradient."""
    g = param.grad
    param.grad = None
    for acc in group:
        add_fp32(acc.weight_sum, g, square=True)


def fisher_statistics(model: nn.Module, batches: Iterable[torch.Tensor],
                      targets: dict[str, nn.Linear], progress: Progress | None = None,
                      checkpointing: bool = True) -> dict[str, dict]:
    """Empirical Fisher diagonals of the next-token loss for each target Linear.

    model: a causal LM whose forward takes `input_ids` and returns `.logits` (B, T, V).
    batches: LongTensor (1, T) or (B, T) token ids, no padding; every row is one sample (see the
        module docstring for the exact definitions). Rows shorter than 2 tokens have no target
        and are skipped with a warning.
    targets: module name -> nn.Linear inside `model` (names only label the result).
    checkpointing: gradient-checkpoint decoder layers when the model has any (less memory, one
        extra forward per layer); the result is the same either way.
    Returns name -> {"weight_fisher": (out, in) fp32, "act_fisher": (in,) fp32,
        "count": number of samples N, "tokens": number of predicted tokens M}; tensors live on
        the weight's device.
    """
    _check_targets(model, targets)
    accs = {name: FisherAccumulator(mod) for name, mod in targets.items()}
    samples = tokens = 0
    with ExitStack() as stack:
        stack.enter_context(_grad_only_on(model, targets))
        stack.enter_context(eval_with_checkpointing(model, checkpointing))
        stack.enter_context(fisher_hooks(model, targets, accs))
        stack.enter_context(torch.enable_grad())
        for batch in track(batches, "fisher", progress):
            for row in _rows(batch):
                _backward_one(model, row)
                samples += 1
                tokens += row.shape[1] - 1
    if samples == 0:
        raise InputError("fisher_statistics got no sample with at least 2 tokens",
                         "give token batches of shape (B, T) with T >= 2")
    logger.info("fisher: %d samples, %d predicted tokens, %d targets", samples, tokens, len(targets))
    return {name: {"weight_fisher": acc.weight_sum.div_(samples), "act_fisher": acc.act_sum.div_(tokens),
                   "count": samples, "tokens": tokens}
            for name, acc in accs.items()}


def _backward_one(model: nn.Module, ids: torch.Tensor) -> None:
    """ids: (1, T) -> one backward of the sample's mean next-token loss (hooks collect)."""
    from lpc.pipeline.io.encoders import encoder_loss, is_encoder

    ids = ids.to(input_device(model))
    if is_encoder(model):  # BERT-style: the masked-LM head's loss (io/encoders.py)
        encoder_loss(model, ids).backward()
        return
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[0, :-1].to(torch.float32), ids[0, 1:])
    loss.backward()


def input_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where token ids must go)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    param = emb.weight if emb is not None else next(model.parameters())
    return param.device


def _rows(batch: torch.Tensor) -> Iterator[torch.Tensor]:
    """(T,), (1, T) or (B, T) LongTensor -> its rows as (1, T); too-short rows are skipped."""
    if not isinstance(batch, torch.Tensor) or batch.dtype not in (torch.int64, torch.int32):
        raise InputError(f"fisher batches must be integer token-id tensors, got "
                         f"{getattr(batch, 'dtype', type(batch).__name__)}",
                         "tokenize the text first and pass LongTensor (B, T)")
    if batch.ndim == 1:
        batch = batch.unsqueeze(0)
    if batch.ndim != 2:
        raise InputError(f"fisher batches must have shape (B, T), got {tuple(batch.shape)}",
                         "pass token ids as (B, T) or (T,)")
    if batch.shape[1] < 2:
        logger.warning("fisher: skipping %d sample(s) of length %d (no next-token target)",
                       batch.shape[0], batch.shape[1])
        return
    for b in range(batch.shape[0]):
        yield batch[b: b + 1].long()


def _check_targets(model: nn.Module, targets: dict[str, nn.Linear]) -> None:
    if not targets:
        raise InputError("fisher_statistics got no target Linear layers",
                         "pass {module name: nn.Linear} of the layers to calibrate")
    owned = {id(m) for m in model.modules()}
    for name, mod in targets.items():
        if not isinstance(mod, nn.Linear):
            raise InputError(f"target '{name}' is a {type(mod).__name__}, not an nn.Linear",
                             "give only nn.Linear modules as targets")
        if id(mod) not in owned:
            raise InputError(f"target '{name}' is not a module of the given model",
                             "take the targets from model.named_modules() of this model")


@contextmanager
def frozen_params(model: nn.Module) -> Iterator[None]:
    """Every parameter requires_grad False (restored on exit); the embedding output is made to
    require grad so gradients flow through frozen layers (and into checkpointed segments)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    handle = emb.register_forward_hook(_require_grad) if emb is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in saved:
            p.requires_grad_(flag)


@contextmanager
def _grad_only_on(model: nn.Module, targets: dict[str, nn.Linear]) -> Iterator[None]:
    """requires_grad True on target weights only (within `frozen_params`). A `.grad` the caller
    had on a target weight is set aside (autograd would add to it) and put back afterwards."""
    stashed = {id(m.weight): (m.weight, m.weight.grad) for m in targets.values()}
    with frozen_params(model):
        for p, _ in stashed.values():
            p.grad = None
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, grad in stashed.values():
                p.grad = grad


def _require_grad(_module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
    if isinstance(out, torch.Tensor) and torch.is_grad_enabled() and not out.requires_grad:
        out.requires_grad_(True)


@contextmanager
def eval_with_checkpointing(model: nn.Module, enable: bool) -> Iterator[None]:
    """Eval mode (no dropout) everywhere; decoder layers that support checkpointing get it.

    transformers checkpoints a `GradientCheckpointingLayer` only while that module is in training
    mode, so its own `training` flag (not its children's) is set True; dropout lives in children.
    """
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")] if enable else []
    saved = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in layers]
    with eval_mode(model, grad=True):  # restores every module's training flag, these layers' too
        func = functools.partial(checkpoint, use_reentrant=False)
        for m in layers:
            m.gradient_checkpointing, m._gradient_checkpointing_func, m.training = True, func, True
        if layers:
            logger.debug("fisher: gradient checkpointing on %d modules", len(layers))
        try:
            yield
        finally:
            for m, flag, old in saved:
                m.gradient_checkpointing = flag
                if old is None:
                    m.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    m._gradient_checkpointing_func = old


@contextmanager
def fisher_hooks(model: nn.Module, targets: dict[str, nn.Linear],
                 accs: dict[str, FisherAccumulator]) -> Iterator[None]:
    """Weight: post-accumulate-grad hook squares and frees each gradient. Activation: a forward pre-hook
    passes the Linear's input through `_InputGrad`, whose backward reads dL/dx of this Linear (an input
    that does not require grad: a tensor hook on the output reads dL/dy instead). Under checkpoint
    recompute the hooks fire again, but that recomputed graph is never back-propagated, so each real
    backward is counted once."""
    handles = []
    by_param: dict[int, tuple[torch.Tensor, list[FisherAccumulator]]] = {}
    for name, mod in targets.items():
        by_param.setdefault(id(mod.weight), (mod.weight, []))[1].append(accs[name])
    for param, group in by_param.values():
        # One hook per parameter (a tied weight may be two targets): it fires after autograd has
        # summed every use of the weight in this backward.
        handles.append(param.register_post_accumulate_grad_hook(
            functools.partial(_take_weight_grad, group=group)))
    for name, mod in targets.items():
        acc = accs[name]

        def on_input(module, args, acc=acc):
            if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                return (_InputGrad.apply(args[0], acc),) + tuple(args[1:])
            return None

        def on_forward(module, args, out, acc=acc):
            wrapped = args and isinstance(args[0], torch.Tensor) and args[0].requires_grad
            if out.requires_grad and torch.is_grad_enabled() and not wrapped:
                out.register_hook(lambda g, module=module, acc=acc: acc.add_output_grad(module, g))
        handles.append(mod.register_forward_pre_hook(on_input))
        handles.append(mod.register_forward_hook(on_forward))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
