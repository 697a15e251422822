"""Measured loss: the mean next-token loss of a model on calibration batches, with any set of its
Linears temporarily replaced by their quantized-dequantized weights."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
