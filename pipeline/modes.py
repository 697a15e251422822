"""Model modes for passes that only read a model: eval mode (dropout off), autograd off."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module, grad: bool = False) -> Iterator[None]:
    """Every module of `model` in eval mode and, unless `grad`, autograd off.

    Each module's own `training` flag is restored on exit (not just the root's, so a model whose
    parts were in different modes gets them back as they were). Weights are not touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
