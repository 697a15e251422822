"""K/V statistics as the cache stores them: per decoder layer, the absmax of keys (after RoPE) and values
per KV head and per KV head and channel, collected by running the calibration sequences with a recording
cache."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lpc.pipeline.progress import Progress, track


class _RecordingLayer(DynamicLayer):
    """Keeps no states: records the per-head and per-channel absmax of what would be written."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.found: dict[str, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        for part, x in (("k", key_states), ("v", value_states)):
            chan = x.detach().abs().float().amax(dim=(0, 2))  # (kv_heads, head_dim)
            for key, t in ((f"{part}_amax", chan.amax(-1)), (f"{part}_chan_amax", chan)):
                self.found[key] = t if key not in self.found else torch.maximum(self.found[key], t)
        return key_states, value_states


class RecordingCache(Cache):
    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_RecordingLayer)


def kv_statistics(model: nn.Module, batches: list[torch.Tensor], progress: Progress | None = None
                  ) -> dict[int, dict[str, torch.Tensor]]:
    """layer index -> {"k_amax": (kv_heads,), "v_amax": (kv_heads,), "k_chan_amax": (kv_heads, head_dim),
    "v_chan_amax"} fp32 over all calibration tokens.

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
                    cur = found.setdefault(i, {}) if layer.found else {}
                    for name, t in layer.found.items():
                        cur[name] = t if name not in cur else torch.maximum(cur[name], t)
    finally:
        model.train(was_training)
    return found
