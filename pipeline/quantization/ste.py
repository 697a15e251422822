"""Straight-through quantized weights, shared by the tuning methods (`distill`, `tune`).

A target Linear's weight is replaced by a fp32 latent W~ behind a parametrization that computes
Q(W~) (the layer's own format, spec and context: FGMP mask, scales, global amax) in the forward pass
and passes the gradient to W~ unchanged: Q(W~) + (W~ - sg(W~)). The optimizer moves the latents;
what is finally stored is the format's rounding of the best latent, so the artifact's bits are those
of plain rounding.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from lpc.pipeline.sums import add_fp32

Quantizer = Callable[[torch.Tensor], torch.Tensor]


class QuantizedWeight(nn.Module):
    """Parametrization weight <- Q(latent) with a straight-through gradient, or the original weight
    while `teacher` is on. The latent is kept in fp32; the result has the original dtype."""

    def __init__(self, original: torch.Tensor, quantizer: Quantizer):
        super().__init__()
        self.register_buffer("original", original.detach().clone(), persistent=False)
        self.quantizer = quantizer
        self.teacher = False
        self._cached: tuple[int, torch.Tensor] | None = None
        # accumulate: gradients are summed here (fp32, a cache-sized run at a time) instead of by autograd,
        # and handed over by `take_grad`; the same sums, without a weight-sized fp32 copy per backward
        self.accumulate = False
        self.grad_sum: torch.Tensor | None = None
        self._fresh = True

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return self.original
        # Q(latent) is computed once per optimizer step (the step bumps the latent's version), not
        # once per sequence and again in each checkpoint recompute.
        if self._cached is None or self._cached[0] != latent._version:
            with torch.no_grad():
                self._cached = (latent._version, self.quantizer(latent.detach()).to(self.original.dtype))
        return _StraightThrough.apply(latent, self._cached[1], self)

    def take_grad(self) -> torch.Tensor | None:
        """The gradient summed since the last call (accumulate mode), or None if no backward ran."""
        if self._fresh:
            return None
        self._fresh = True
        return self.grad_sum

    def add_grad(self, grad: torch.Tensor) -> None:
        """Add grad (any float dtype) to the fp32 sum: the first of a step is copied (as autograd takes the
        first gradient as it is), later ones added (pipeline/sums.py)."""
        if self.grad_sum is None or self.grad_sum.shape != grad.shape or self.grad_sum.device != grad.device:
            self.grad_sum = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
        first, self._fresh = self._fresh, False
        add_fp32(self.grad_sum, grad, copy=first)


class _StraightThrough(torch.autograd.Function):
    """Forward: q (Q(latent) in the layer's dtype, computed once per step); backward: the gradient to the
    latent unchanged (cast to fp32). The same as `latent + (q - latent).detach()` without its three
    full-size temporaries at every call (once per sample and again in each backward)."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, q: torch.Tensor, owner: "QuantizedWeight") -> torch.Tensor:
        ctx.latent_dtype, ctx.owner = latent.dtype, owner
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.owner.accumulate:
            ctx.owner.add_grad(grad)
            return None, None, None
        return grad.to(ctx.latent_dtype), None, None


@contextmanager
def quantized_weights(targets: dict[str, nn.Linear], quantizers: dict[str, Quantizer]
                      ) -> Iterator[dict[str, nn.Parameter]]:
    """Put a fp32 latent copy of each target weight behind a `QuantizedWeight` parametrization; yields
    the latents (the optimizer's parameters). On exit the original Parameter objects are back."""
    originals = {n: m.weight for n, m in targets.items()}
    latents: dict[str, nn.Parameter] = {}
    try:
        for name, mod in targets.items():
            w = originals[name]
            latent = nn.Parameter(w.detach().float().clone())
            del mod.weight
            mod.weight = latent
            parametrize.register_parametrization(mod, "weight", QuantizedWeight(w.detach(), quantizers[name]),
                                                 unsafe=True)
            latents[name] = mod.parametrizations.weight.original
        yield latents
    finally:
        for name, mod in targets.items():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            del mod.weight  # the latent, or the original if setup stopped before swapping it
            mod.weight = originals[name]


def fake_quantizer(fmt: Any, spec: dict[str, Any], ctx: dict[str, Any], dtype: torch.dtype,
                   keep: dict[str, Any] | None = None) -> Quantizer:
    """w -> Q(w) of one layer's setup (format, spec, context), computed in the layer's dtype.
    keep: when given, keep["q"] is set to the QTensor of the last call (what the artifact would store)."""
    def fake(w: torch.Tensor) -> torch.Tensor:
        c = {k: (v.to(w.device) if hasattr(v, "to") else v) for k, v in ctx.items()}
        if keep is None:
            return fmt.fake_quantize(w.to(dtype), **spec, **c)
        keep["q"] = q = fmt.quantize(w.to(dtype), **spec, **c)
        return fmt.dequantize(q, dtype=dtype)
    return fake


def weight_rms(module: nn.Linear) -> float:
    """RMS of a Linear's weight (1.0 for an all-zero weight): the unit of a tuning step."""
    w = module.weight.detach().float()
    rms = float(w.square().mean().sqrt())
    return rms if rms > 0 else 1.0


def split_held_out(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices (train, held out) of n samples: every k-th (k = round(1 / val_fraction), counting from the
    k-th) is held out when n >= 2 and val_fraction > 0."""
    if val_fraction <= 0 or n < 2:
        return list(range(n)), []
    k = max(2, round(1 / val_fraction))
    held = set(range(k - 1, n, k)) or {n - 1}
    return [i for i in range(n) if i not in held], sorted(held)
