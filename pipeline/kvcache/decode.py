"""Token-by-token decoding through a `PolicyCache`: teacher-forced scoring of a continuation and greedy
generation, as an engine holding a compressed cache would decode.

The model must run eager attention when the policy reads attention (`needs_attention`); positions are
absolute (`position_ids`) while the cache holds fewer tokens than were written.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lpc.pipeline.kvcache.cache import cache_argument
from lpc.pipeline.kvcache.policy import KVPolicy, PolicyCache


@dataclass
class DecodeResult:
    tokens: list[int]  # the continuation: forced, or generated
    nll: float = 0.0  # summed next-token loss of the continuation, nats
    kl: float | None = None  # summed KL(reference || this) over the continuation
    logprobs: torch.Tensor | None = None  # (M, vocab) fp32 when kept
    peak_bytes: int = 0  # most bytes the cache held between steps
    final_bytes: int = 0
    policy_seconds: float = 0.0  # time inside the policy (observe + enforce)
    seconds: float = 0.0
    held_tokens: list[int] = field(default_factory=list)  # tokens held by layer 0 after each step
    cache: PolicyCache | None = None  # the cache as the last step left it (to go on decoding with `step`)


ATTENTION = "lpc_policy_eager"


def _policy_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
    """Eager attention (it returns the weights) over however many tokens this layer holds: the mask
    spans every position written so far (`PolicyLayer.get_mask_sizes`) and is cut to the held ones,
    which a layer that evicted fewer or more tokens than another has."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if attention_mask is not None:
        attention_mask = attention_mask[..., -key.shape[-2]:] if attention_mask.shape[-1] > key.shape[-2] \
            else attention_mask
    return eager_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def use_eager_attention(model: nn.Module) -> None:
    """Policies read attention weights and layers hold different token counts: eager attention with
    the mask cut to each layer's held tokens."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _policy_attention)
        AttentionMaskInterface.register(ATTENTION, eager_mask)
    model.set_attn_implementation(ATTENTION)


def new_cache(model: nn.Module, policy: KVPolicy, capacity: int) -> PolicyCache:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    policy.setup(cfg.num_key_value_heads, head_dim, capacity)
    return PolicyCache(policy, cfg.num_hidden_layers)


@torch.no_grad()
def step(model: nn.Module, cache: PolicyCache, feed: list[int]) -> tuple[torch.Tensor, float]:
    """One forward of `feed` tokens after what `cache` has seen, then the policy acts: (logits (len, vocab)
    of the fed positions, seconds spent in the policy)."""
    policy = cache.policy
    want_attn = policy.active and policy.needs_attention
    start = cache.written()
    pos = torch.arange(start, start + len(feed), device=model.device)
    out = model(input_ids=torch.tensor([feed], device=model.device), position_ids=pos.unsqueeze(0),
                cache_position=pos, use_cache=True, output_attentions=want_attn, **{cache_argument(model): cache})
    t1 = time.perf_counter()
    cache.end_step(out.attentions if want_attn else None)
    return out.logits[0], time.perf_counter() - t1


@torch.no_grad()
def decode(model: nn.Module, prompt: list[int], policy: KVPolicy, capacity: int, steps: int,
           forced: list[int] | None = None, reference: torch.Tensor | None = None,
           keep_logprobs: bool = False, chunk: int = 1, stop: set[int] | None = None) -> DecodeResult:
    """Decode `steps` tokens after `prompt` with the cache kept by `policy` (budget relative to
    `capacity` tokens). `forced`: the continuation to score (teacher forcing, len >= steps), fed
    `chunk` tokens per forward (the policy acts between forwards); else greedy, one token per
    forward, ending early after a token in `stop`. `reference` (steps, vocab) log-probs:
    KL(reference || this) is summed per step."""
    cache = new_cache(model, policy, capacity)
    res = DecodeResult(tokens=[], kl=0.0 if reference is not None else None, cache=cache)
    kept = []
    feed = list(prompt)
    t0 = time.perf_counter()
    while len(res.tokens) < steps:
        start = cache.written()
        logits, spent = step(model, cache, feed)
        res.policy_seconds += spent
        res.peak_bytes = max(res.peak_bytes, cache.held_bytes())
        res.held_tokens.append(cache.layers[0].held())
        rows = logits[-1:] if start == 0 else logits
        for row in rows[: steps - len(res.tokens)]:
            logp = torch.log_softmax(row.float(), -1)
            i = len(res.tokens)
            tok = forced[i] if forced is not None else int(logp.argmax())
            res.tokens.append(tok)
            res.nll -= float(logp[tok])
            if reference is not None:
                ref = reference[i]
                res.kl += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
            if keep_logprobs:
                kept.append(logp)
        n = len(res.tokens)
        if forced is None and stop and res.tokens[-1] in stop:
            break
        feed = forced[n - 1:min(n - 1 + chunk, steps - 1)] if forced is not None else [res.tokens[-1]]
    res.seconds = time.perf_counter() - t0
    res.final_bytes = cache.held_bytes()
    res.logprobs = torch.stack(kept) if kept else None
    return res


def perplexity_with_policy(model: nn.Module, windows: list[list[int]], policy: str, budget: float,
                           options: dict[str, Any] | None = None, chunk: int = 16, progress: Any = None) -> dict:
    """Teacher-forced perplexity of token windows, each decoded through a fresh cache kept by `policy`
    at `budget` (a fraction of the bf16 bytes of the window), `chunk` tokens per forward: the first
    token is the prompt, every later one is predicted from the compressed cache."""
    from lpc.pipeline.kvcache.levels import token_bytes
    from lpc.pipeline.kvcache.policy import make_policy
    from lpc.pipeline.progress import track

    use_eager_attention(model)
    total, count, peak, held = 0.0, 0, 0, 0.0
    for w in track(windows, f"perplexity, KV policy {policy} at {budget:g}", progress):
        pol = make_policy(policy, budget, **(options or {}))
        r = decode(model, w[:1], pol, capacity=len(w), steps=len(w) - 1, forced=w[1:], chunk=chunk)
        total, count = total + r.nll, count + len(w) - 1
        full = len(w) * model.config.num_hidden_layers * token_bytes("bf16", pol.heads, pol.head_dim)
        peak, held = max(peak, r.peak_bytes), max(held, r.peak_bytes / full)
    return {"perplexity": math.exp(total / count), "tokens": count, "nll": total / count, "peak_bytes": peak,
            "held_fraction": held, "protocol": f"KV policy {policy}, budget {budget:g} of the bf16 cache, "
                                               f"teacher-forced {chunk} tokens per forward"}
