"""KV cache policies: what a cache holds under a byte budget as decoding proceeds (eviction, mixed
precision), simulated through a transformers `Cache`.

A policy is registered by name in `POLICIES` (one module each: uniform, streaming, h2o, thinkv). The
budget is a fraction of the bf16 cache's bytes for `capacity` tokens (the sequence the budget is
relative to, e.g. prompt + generated tokens); every layer gets that fraction of its own bf16 bytes.
Bytes held are counted exactly: element payloads at each token's precision, every chunk's scales,
the policy's per-token metadata (`meta_bytes`: position, scores, tags) and its per-layer tables.

Protocol: a forward writes its tokens at full precision (attention of that forward reads them as
written); after the forward, `PolicyCache.end_step(attentions)` lets the policy observe the attention
rows (eager attention, `output_attentions=True`) and compress/evict until every layer is within its
budget. So between steps every layer holds at most its budget. A budget of 1.0 or more is the full
cache: the policy does nothing (and needs no metadata).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lpc.formats.registry import Registry
from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.levels import LEVELS, compress, token_bytes

POLICIES: Registry[type["KVPolicy"]] = Registry("KV cache policy", InputError)


class PolicyLayer(DynamicLayer):
    """One decoder layer's held tokens: keys/values (1, H, N, D) as attention reads them, and per held
    token its absolute position, precision level (index in LEVELS), chunk id (-1: not compressed) and
    accumulated attention."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        dev = key_states.device
        self.pos = torch.empty(0, dtype=torch.long, device=dev)
        self.level = torch.empty(0, dtype=torch.long, device=dev)
        self.chunk = torch.empty(0, dtype=torch.long, device=dev)
        self.score = torch.empty(0, dtype=torch.float32, device=dev)
        self.chunk_bytes: dict[int, int] = {}  # chunk id -> bytes of its scales
        self.next_chunk = 0
        self.written = 0  # tokens ever written (the next absolute position)

    @property
    def written(self) -> int:
        return getattr(self, "_written", 0)

    @written.setter
    def written(self, n: int) -> None:
        self._written = n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise InputError("a KV cache policy simulates one sequence at a time",
                             f"got a batch of {key_states.shape[0]}; run sequences one by one")
        keys, values = super().update(key_states, value_states)
        n, dev = key_states.shape[-2], key_states.device
        self.pos = torch.cat([self.pos, torch.arange(self.written, self.written + n, device=dev)])
        self.level = torch.cat([self.level, torch.zeros(n, dtype=torch.long, device=dev)])
        self.chunk = torch.cat([self.chunk, torch.full((n,), -1, dtype=torch.long, device=dev)])
        self.score = torch.cat([self.score, torch.zeros(n, device=dev)])
        self.written += n
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Mask over every position written so far (called before `update`): attention slices it to the
        held tokens, all of which precede the new ones, so no held token is ever masked."""
        return self.written + query_length, 0

    def held(self) -> int:
        return 0 if not self.is_initialized else int(self.pos.numel())

    def payload_bytes(self) -> int:
        heads, dim = self.keys.shape[1], self.keys.shape[-1]
        counts = torch.bincount(self.level, minlength=len(LEVELS)).tolist()
        return sum(c * token_bytes(LEVELS[i], heads, dim) for i, c in enumerate(counts))

    def compress(self, index: torch.Tensor, level: str) -> None:
        """Store the held tokens at `index` (1-D, one chunk) at `level` (from what they hold now: a
        demoted token is requantized from its stored value); their scales form one chunk, and a chunk
        left with no token frees its scales."""
        k, v, scale_bytes = compress(level, self.keys[0][:, index], self.values[0][:, index])
        self.keys[0][:, index], self.values[0][:, index] = k, v
        before = set(self.chunk[index].tolist()) - {-1}
        self.level[index] = LEVELS.index(level)
        self.chunk[index] = self.next_chunk if level != "bf16" else -1
        if level != "bf16":
            self.chunk_bytes[self.next_chunk] = scale_bytes
            self.next_chunk += 1
        alive = set(self.chunk.tolist()) if before else set()
        for c in before - alive:
            del self.chunk_bytes[c]

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the held tokens where `mask` (N,) bool is true; a chunk with no token left frees its scales."""
        self.keys, self.values = self.keys[:, :, mask], self.values[:, :, mask]
        self.pos, self.level, self.chunk, self.score = self.pos[mask], self.level[mask], self.chunk[mask], self.score[mask]
        alive = set(self.chunk.unique().tolist())
        self.chunk_bytes = {c: b for c, b in self.chunk_bytes.items() if c in alive}


class KVPolicy(ABC):
    """Base: holds the budget and the byte accounting; subclasses implement `enforce` (and `observe`)."""

    name = "full"
    meta_bytes = 0  # per held token and layer
    needs_attention = False

    def __init__(self, budget: float = 1.0, **options: Any):
        if not isinstance(budget, (int, float)) or not budget > 0:
            raise InputError(f"KV budget must be a positive fraction of the bf16 cache, got {budget!r}",
                             "e.g. budget: 0.1 for 10% of the bf16 bytes")
        if options:
            raise InputError(f"unknown option(s) for KV cache policy '{self.name}': {', '.join(sorted(options))}",
                             f"{self.name} takes: {(type(self).__init__.__doc__ or 'budget only').strip()}")
        self.budget = float(budget)
        self.budget_bytes = 0

    @property
    def active(self) -> bool:
        return self.budget < 1.0

    def setup(self, heads: int, head_dim: int, capacity: int) -> None:
        """Per-layer byte budget: the fraction of `capacity` bf16 tokens of one layer."""
        self.heads, self.head_dim = heads, head_dim
        self.budget_bytes = int(self.budget * capacity * token_bytes("bf16", heads, head_dim))

    def table_bytes(self, layer: PolicyLayer) -> int:
        """Per-layer tables of the policy beyond per-token metadata (0 unless a policy keeps one)."""
        return 0

    def held_bytes(self, layer: PolicyLayer) -> int:
        """Exact bytes `layer` holds: payloads + chunk scales + per-token metadata + tables."""
        if not layer.is_initialized:
            return 0
        if not self.active:
            return layer.payload_bytes()
        return (layer.payload_bytes() + sum(layer.chunk_bytes.values()) + self.meta_bytes * layer.held()
                + self.table_bytes(layer))

    def freed_table_bytes(self, layer: PolicyLayer, index: int) -> int:
        """Table bytes freed when held token `index` goes (0 unless a policy's tables shrink)."""
        return 0

    def observe(self, cache: "PolicyCache", attentions: tuple[torch.Tensor, ...] | None) -> None:
        """After a forward: accumulate what the policy tracks (default: attention received per held token)."""
        if attentions is None:
            return
        for layer, attn in zip(cache.layers, attentions):
            # attn (1, heads, q, N): summed over query heads and the step's queries
            layer.score += attn[0].float().sum(dim=(0, 1))[: layer.held()]

    @abstractmethod
    def enforce(self, layer: PolicyLayer, index: int) -> None:
        """Bring `layer` (its layer number `index`) back within the budget after a write."""

    def fits(self, layer: PolicyLayer) -> bool:
        return self.held_bytes(layer) <= self.budget_bytes


class PolicyCache(Cache):
    """A Cache whose layers a `KVPolicy` keeps within its byte budget. Positions: the model must be called
    with `position_ids` = the absolute positions of the new tokens and `cache_position` counting held
    tokens (see `lpc.pipeline.kvcache.decode`)."""

    def __init__(self, policy: KVPolicy, n_layers: int):
        super().__init__(layers=[PolicyLayer() for _ in range(n_layers)])
        self.policy = policy

    def end_step(self, attentions: tuple[torch.Tensor, ...] | None = None) -> None:
        if not self.policy.active:
            return
        self.policy.observe(self, attentions)
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                self.policy.enforce(layer, i)

    def held_bytes(self) -> int:
        return sum(self.policy.held_bytes(layer) for layer in self.layers)

    def budget_bytes(self) -> int:
        """The whole cache's budget: every layer's."""
        return self.policy.budget_bytes * len(self.layers)

    def written(self) -> int:
        return self.layers[0].written if self.layers[0].is_initialized else 0


def make_policy(name: str, budget: float, **options: Any) -> KVPolicy:
    """The registered policy `name` at `budget` (fraction of the bf16 cache bytes)."""
    from lpc.pipeline.kvcache import h2o, streaming, thinkv, uniform  # noqa: F401  (they register)

    cls = POLICIES.get(name)
    try:
        return cls(budget, **options)
    except TypeError as err:
        raise InputError(f"bad option for KV cache policy '{name}': {err}",
                         f"{name} takes: {cls.__init__.__doc__ or 'budget only'}") from None
