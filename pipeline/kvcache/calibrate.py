"""K/V statistics as the cache stores them: per decoder layer, the absmax of keys (after RoPE) and values,
per KV head, collected by running the calibration sequences with a recording cache."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lpc.pipeline.progress import Progress, track


class _RecordingLayer(DynamicLayer):
    """Keeps no states: records the per-head absmax of what would be written."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.k_amax: torch.Tensor | None = None
        self.v_amax: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        k = key_states.detach().abs().float().amax(dim=(0, 2, 3))
        v = value_states.detach().abs().float().amax(dim=(0, 2, 3))
        self.k_amax = k if self.k_amax is None else torch.maximum(self.k_amax, k)
        self.v_amax = v if self.v_amax is None else torch.maximum(self.v_amax, v)
        return key_states, value_states


class RecordingCache(Cache):
    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_RecordingLayer)


def kv_statistics(model: nn.Module, batches: list[torch.Tensor], progress: Progress | None = None
                  ) -> dict[int, dict[str, torch.Tensor]]:
    """layer index -> {"k_amax": (kv_heads,), "v_amax": (kv_heads,)} fp32 over all calibration tokens.

    batches: LongTensor (B, T) token ids on the model's device. Each sequence runs alone with a fresh
    recording cache (no states kept), so memory is one forward pass."""
    from lpc.pipeline.kvcache.cache import cache_argument

    key = cache_argument(model)
    found: dict[int, dict[str, torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in track(batches, "kv cache statistics", progress):
                cache = RecordingCache()
                model(input_ids=ids, use_cache=True, **{key: cache})
                for i, layer in enumerate(cache.layers):
                    if layer.k_amax is None:
                        continue
                    cur = found.setdefault(i, {"k_amax": layer.k_amax, "v_amax": layer.v_amax})
                    cur["k_amax"] = torch.maximum(cur["k_amax"], layer.k_amax)
                    cur["v_amax"] = torch.maximum(cur["v_amax"], layer.v_amax)
    finally:
        model.train(was_training)
    return found
