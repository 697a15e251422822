"""Quantize methods: how each planned layer's weight becomes its QTensor.

A method is a `QuantizeMethod` registered by name in `QUANTIZE_METHODS` (`quantize.method` in a
recipe). `round` turns one weight into a QTensor of its format; `tune`, when set, first adjusts all
target weights together (and needs a calibration). Adding a method: one module that calls
`QUANTIZE_METHODS.add(name, QuantizeMethod(...))`, imported in `quantization/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from lpc.formats import Format, QTensor
from lpc.formats.registry import Registry
from lpc.pipeline.errors import RecipeError
from lpc.pipeline.progress import Progress

# (format, spec, context) of one layer exactly as it is quantized; see quantization.layers.layer_setups.
Setup = tuple[Format, dict[str, Any], dict[str, Any]]


@dataclass
class TuneInputs:
    """What a whole-model tuning method sees: the model (targets are its Linears), each layer's setup,
    the calibration statistics and token batches, the plan, the recipe and where to compute."""

    model: nn.Module
    targets: dict[str, nn.Linear]
    setups: dict[str, Setup]
    stats: dict[str, dict[str, torch.Tensor]] | None
    plan: dict[str, Any]
    recipe: Any
    batches: list[torch.Tensor]
    device: str = "cpu"
    progress: Progress | None = None
    # filled by a tuning that already rounded some weights by their setups (layer name -> QTensor of the
    # weight it returns): stored as they are, not rounded again
    rounded: dict[str, QTensor] = field(default_factory=dict)


class Rounder(Protocol):
    def __call__(self, fmt: Format, w: torch.Tensor, spec: dict[str, Any], ctx: dict[str, Any],
                 cov: torch.Tensor | None) -> QTensor: ...


@dataclass(frozen=True)
class QuantizeMethod:
    """round: (format, weight (out, in), spec, context, X^T X / n or None) -> QTensor.
    tune: TuneInputs -> (layer name -> weight to round instead of the layer's own, report).
    layer_tuner: for a tuning that works one decoder layer at a time, (recipe, activation plan, model,
    device, progress) -> an object with `begin(layer-0 inputs)`, `layer(layer, targets, setups) ->
    (tuned weights, report)` and `report()` (quantization/tune.py): the layer-streaming engine
    drives it; `tune` is then the same tuning over a resident model."""

    round: Rounder
    tune: Callable[[TuneInputs], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    layer_tuner: Callable[..., Any] | None = None
    needs_calibration: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


QUANTIZE_METHODS: Registry[QuantizeMethod] = Registry("quantize method", RecipeError)


def round_to_nearest(fmt: Format, w: torch.Tensor, spec: dict[str, Any], ctx: dict[str, Any],
                     cov: torch.Tensor | None) -> QTensor:
    """The format's own rounding (with its scale search and clipping)."""
    return fmt.quantize(w, **spec, **ctx)


QUANTIZE_METHODS.add("rtn", QuantizeMethod(round_to_nearest, description="round each weight"))
