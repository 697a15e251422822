"""K/V statistics as the cache stores them: per decoder layer, the absmax of keys (after RoPE) and values
per KV head and per KV head and channel, collected by running the calibration sequences with a recording
cache; and the queries, keys and values of the first calibration sequence (`q_sample`, `k_sample`,
`v_sample`, (heads, tokens, head_dim) after RoPE), recorded through the attention interface, on which a
static scale can be searched (search.py)."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lpc.pipeline.progress import Progress, track

RECORD = "lpc_kv_record"


def _recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         *args: Any, **kwargs: Any):
    """Records the first call's (query, key, value) of batch row 0, then runs the model's own attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    sample = getattr(module, "_lpc_kv_sample", None)
    if sample is not None and not sample:
        sample.update(q_sample=query[0].detach().cpu(), k_sample=key[0].detach().cpu(), v_sample=value[0].detach().cpu())
    impl = getattr(module, "_lpc_kv_impl", "eager")
    fn = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
    return fn(module, query, key, value, *args, **kwargs)


def _record_samples(model: nn.Module) -> tuple[dict[int, dict[str, torch.Tensor]], Any]:
    """Route attention through `_recording_attention`: ({layer: sample dict}, undo)."""
    from transformers import AttentionInterface

    original = model.config._attn_implementation or "eager"
    if original not in ("eager", "sdpa"):  # another kernel: sample with sdpa (the same arithmetic up to rounding)
        original = "sdpa"
    AttentionInterface.register(RECORD, _recording_attention)
    samples: dict[int, dict[str, torch.Tensor]] = {}
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not mods:  # fused or Conv1D attention (GPT-2, GPT-NeoX): its own kernel stays, no samples recorded
        return samples, lambda: None
    for m in mods:
        m._lpc_kv_sample, m._lpc_kv_impl = samples.setdefault(int(m.layer_idx), {}), original
    before = model.config._attn_implementation
    model.set_attn_implementation(RECORD)

    def undo() -> None:
        model.set_attn_implementation(before or "eager")
        for m in mods:
            del m._lpc_kv_sample, m._lpc_kv_impl

    return samples, undo


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
    "v_chan_amax"} fp32 over all calibration tokens, and the samples of the first sequence.

    batches: LongTensor (B, T) token ids on the model's device. Each sequence runs alone with a fresh
    recording cache (no states kept), so memory is one forward pass."""
    from lpc.pipeline.kvcache.cache import cache_argument

    key = cache_argument(model)
    found: dict[int, dict[str, torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    samples, undo = _record_samples(model)
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
        undo()
        model.train(was_training)
    for i, sample in samples.items():
        if i in found:
            found[i].update(sample)
    return found


def layer_cache_argument(layer: nn.Module) -> str | None:
    """The keyword a decoder layer takes its cache by (`cache` in transformers 5, `past_key_values` before)."""
    params = inspect.signature(layer.forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in params), None)


@contextmanager
def recording_layers(model: nn.Module, layers: nn.ModuleList
                     ) -> Iterator[Callable[[], dict[int, dict[str, torch.Tensor]]] | None]:
    """While active, every decoder layer of `layers` that runs (called directly, one layer at a time, as the
    streamed calibration does) writes its keys and values to one recording cache. Yields a function giving
    what `kv_statistics` gives for the same sequences, or None when the layers take no cache argument."""
    arg = layer_cache_argument(layers[0]) if len(layers) else None
    if arg is None:
        yield None
        return
    cache = RecordingCache()
    samples, undo = _record_samples(model)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs[arg] = cache
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]

    def result() -> dict[int, dict[str, torch.Tensor]]:
        found = {i: dict(layer.found) for i, layer in enumerate(cache.layers) if layer.found}
        for i, sample in samples.items():
            if i in found:
                found[i].update(sample)
        return found

    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        undo()
