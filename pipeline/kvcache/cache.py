"""A transformers `Cache` that quantizes K/V on write, so every evaluation (teacher-forced perplexity,
KL, lm-eval tasks, generation) sees the cache an engine would hold.

`attach_kv_quantization(model, specs)` installs a forward pre-hook on the model that gives every call
without a cache (and every generation's fresh cache) a `QuantizedKVCache`; `specs[i] = (k_spec, v_spec)`
per decoder layer. Within one forward pass attention reads the quantized K/V of every position,
the current ones included, as a quantize-on-write cache does.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lpc.pipeline.kvcache.quantizer import KVSpec


class QuantizedKVLayer(DynamicLayer):
    """DynamicLayer whose stored keys/values are fake-quantized. KIVI keys keep a full-precision tail of
    fewer than `group` tokens, quantized once its group fills."""

    def __init__(self, k: KVSpec | None, v: KVSpec | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.k, self.v = k, v
        self.k_tail = 0  # tokens at the end of self.keys not yet quantized (KIVI keys)
        self.sink_k: torch.Tensor | None = None  # the leading tokens kept in full precision
        self.sink_v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        v = self.v.fake(value_states) if self.v is not None else value_states
        self.values = torch.cat([self.values, v], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self._quantize_keys(key_states.shape[-2])
        self._restore_sinks(key_states, value_states)
        return self.keys, self.values

    def _restore_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The first `sinks` tokens of the sequence keep the cache's own precision."""
        sinks = max(self.k.sinks if self.k is not None else 0, self.v.sinks if self.v is not None else 0)
        if not sinks:
            return
        have = 0 if self.sink_k is None else self.sink_k.shape[-2]
        start = self.keys.shape[-2] - key_states.shape[-2]
        if have < sinks and start == have:
            take = min(sinks - have, key_states.shape[-2])
            new_k, new_v = key_states[..., :take, :], value_states[..., :take, :]
            self.sink_k = new_k if self.sink_k is None else torch.cat([self.sink_k, new_k], dim=-2)
            self.sink_v = new_v if self.sink_v is None else torch.cat([self.sink_v, new_v], dim=-2)
        if self.sink_k is not None:
            n = self.sink_k.shape[-2]
            self.keys[..., :n, :] = self.sink_k
            self.values[..., :n, :] = self.sink_v

    def _quantize_keys(self, new: int) -> None:
        if self.k is None:
            return
        if not self.k.per_channel:
            self.keys[..., -new:, :] = self.k.fake(self.keys[..., -new:, :])
            return
        self.k_tail += new
        full = (self.k_tail // self.k.group) * self.k.group
        if full:
            start = self.keys.shape[-2] - self.k_tail
            self.keys[..., start:start + full, :] = self.k.fake(self.keys[..., start:start + full, :])
            self.k_tail -= full


class QuantizedKVCache(Cache):
    """One QuantizedKVLayer per decoder layer (specs[i] = (keys, values), None = full precision)."""

    def __init__(self, specs: list[tuple[KVSpec | None, KVSpec | None]]):
        super().__init__(layers=[QuantizedKVLayer(k, v) for k, v in specs])


def attach_kv_quantization(model: nn.Module, specs: list[tuple[KVSpec | None, KVSpec | None]]
                           ) -> torch.utils.hooks.RemovableHandle:
    """Every forward of `model` without a cache, or with an empty plain DynamicCache (a generation's first
    step), runs with a fresh QuantizedKVCache; a caller's own cache (a policy's) is left alone. Returns
    the hook's handle (remove() undoes it)."""

    key = cache_argument(model)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get(key)
        fresh = type(cache) is DynamicCache and cache.get_seq_length() == 0  # a generation's own new cache
        if cache is None or fresh:
            kwargs[key] = QuantizedKVCache(specs)
            kwargs["use_cache"] = True
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the cache: `cache` in newer transformers, else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
