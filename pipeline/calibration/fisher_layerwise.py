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

Memory: one layer, its accumulators, and the hidden states of the calibration set at every layer
boundary (samples x tokens x hidden per layer).
"""
from __future__ import annotations

import logging
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
                     device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Per target Linear {"weight_fisher": (out, in) fp32, "act_fisher": (in,) fp32, "count", "tokens"}.

    batches: (1, T) token ids, T >= 2, one sample each. found: decoder_layers(model).
    load(i) / free(i): materialise / release decoder layer i (a meta skeleton), or None when the
    model is resident. Everything outside the decoder stack must be resident."""
    from lpc.pipeline.calibration.stats import capture_layer_inputs

    path, layers = found
    head = final_head(model)
    if head is None:
        raise ValueError("no final norm / output head found")
    rows = [b.reshape(1, -1).long() for b in batches if b.numel() >= 2]
    states = capture_layer_inputs(model, layers, rows, device)
    inputs: list[list[torch.Tensor]] = []
    with torch.no_grad(), eval_mode(model):
        for i, layer in track(list(enumerate(layers)), "fisher forward (layer by layer)", progress):
            _on(load, i)
            layer.to(device)
            inputs.append([args[0].detach().cpu() for args, _ in states])
            for j, (args, kwargs) in enumerate(states):
                out = layer(*args, **kwargs)
                states[j] = ((out[0] if isinstance(out, (tuple, list)) else out,) + tuple(args[1:]), kwargs)
            layer.to("cpu")
            _on(free, i)
    grads = [_head_grad(head, args[0], ids.to(device)) for (args, _), ids in zip(states, rows)]
    result: dict[str, dict[str, Any]] = {}
    for i in track(list(reversed(range(len(layers)))), "fisher backward (layer by layer)", progress):
        _on(load, i)
        layers[i].to(device)
        mine = {n: m for n, m in targets.items() if n.startswith(f"{path}.{i}.")}
        grads = _layer_backward(layers[i], mine, inputs[i], states, grads, result, device)
        inputs[i] = []
        layers[i].to("cpu")
        _on(free, i)
    tokens = sum(r.shape[1] - 1 for r in rows)
    return {n: {"weight_fisher": result[n]["w"].div_(len(rows)).cpu(), "act_fisher": result[n]["a"].div_(tokens).cpu(),
                "count": len(rows), "tokens": tokens} for n in targets if n in result}


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
                    result: dict[str, dict[str, torch.Tensor]], device: str) -> list[torch.Tensor]:
    """Back-propagate each sample's dL/d(output) through `layer`; returns dL/d(input) per sample."""
    accs = {n: FisherAccumulator(m) for n, m in mine.items()}
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
    for n, acc in accs.items():
        result[n] = {"w": acc.weight_sum, "a": acc.act_sum}
    return out_grads
