"""Measured loss: the mean next-token loss of a model on calibration batches, with any set of its
Linears temporarily replaced by their quantized-dequantized weights."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the named Linears other weights; always restores the originals."""
    saved = {}
    try:
        for name, w in weights.items():
            mod = model.get_submodule(name)
            saved[name] = mod.weight.data
            mod.weight.data = w.to(mod.weight.dtype)
        yield
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Token-weighted mean next-token loss (nats) over (1, T) batches."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids in batches:
        ids = ids.to(device)
        out = model(ids, labels=ids, use_cache=False)
        n = ids.shape[1] - 1
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


WeightsFor = Callable[[dict[str, nn.Linear]], dict[str, torch.Tensor]]


@torch.no_grad()
def streamed_mean_loss(streamed: tuple, batches: list[torch.Tensor], weights_for: WeightsFor) -> float | None:
    """`mean_loss` of a model walked one decoder layer at a time, each layer's Linears given the weights
    `weights_for(its targets)` returns (name -> weight; none: the layer as it is); None when the model's
    logits are not its final norm and head of the last hidden state (then measure it whole).

    streamed: `AllocationContext.streamed()` (the skeleton with everything outside the decoder stack
    loaded, (stack path, layers), weight store, targets). The same value as the whole model's, bit for
    bit: the layers see the inputs the model builds, and the loss is the model's own loss function."""
    from lpc.pipeline.calibration.fisher_layerwise import final_head
    from lpc.pipeline.calibration.stats import advance_layer, capture_layer_inputs
    from lpc.pipeline.io.streaming import materialize, release
    from lpc.pipeline.modes import eval_mode

    model, (path, layers), store, targets = streamed
    head = final_head(model)
    if head is None:
        return None
    with eval_mode(model):
        states = capture_layer_inputs(model, layers, batches, "cpu")
        for i, layer in enumerate(layers):
            prefix = f"{path}.{i}"
            materialize(layer, prefix, store)
            try:
                with swapped_weights(model, weights_for({n: m for n, m in targets.items() if n.startswith(prefix + ".")})):
                    for j in range(len(states)):
                        advance_layer(layer, states, j)
            finally:
                release(layer)
        norm, lm_head = head
        total, count = 0.0, 0
        for (args, _), ids in zip(states, batches):
            logits = lm_head(norm(args[0]))
            loss = model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)
            n = ids.shape[1] - 1
            total += float(loss) * n
            count += n
    return total / max(count, 1)
