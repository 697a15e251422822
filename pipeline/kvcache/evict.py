"""Shared mechanics of KV cache policies: pick the tokens to drop so that a layer fits its budget,
and find the oldest complete chunk of full-precision tokens to compress."""
from __future__ import annotations

import torch

from lpc.pipeline.kvcache.levels import LEVELS, token_bytes
from lpc.pipeline.kvcache.policy import KVPolicy, PolicyLayer


def evict_in_order(policy: KVPolicy, layer: PolicyLayer, order: torch.Tensor) -> int:
    """Drop held tokens in `order` (indices, first dropped first) until `layer` fits; returns how many.

    The bytes freed by each drop are exact: the token's payload and metadata, and its chunk's scales
    once the chunk's last token goes."""
    excess = policy.held_bytes(layer) - policy.budget_bytes
    if excess <= 0:
        return 0
    heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
    per_level = [token_bytes(name, heads, dim) + policy.meta_bytes for name in LEVELS]
    left = torch.bincount(layer.chunk[layer.chunk >= 0]).tolist() if bool((layer.chunk >= 0).any()) else []
    drop = []
    for i in order.tolist():
        freed = per_level[int(layer.level[i])] + policy.freed_table_bytes(layer, i)
        c = int(layer.chunk[i])
        if c >= 0:
            left[c] -= 1
            freed += layer.chunk_bytes[c] if left[c] == 0 else 0
        drop.append(i)
        excess -= freed
        if excess <= 0:
            break
    mask = torch.ones(layer.held(), dtype=torch.bool, device=layer.pos.device)
    mask[torch.tensor(drop, dtype=torch.long, device=mask.device)] = False
    layer.keep(mask)
    return len(drop)


def oldest_full_chunk(layer: PolicyLayer, group: int, sinks: int) -> torch.Tensor | None:
    """Indices of the held full-precision tokens of the oldest complete position group
    [g*group, (g+1)*group) (sinks excluded), or None when every complete group is compressed."""
    bf16 = (layer.level == 0) & (layer.pos >= sinks)
    done = (layer.pos // group) < (layer.written // group)  # the group is closed: no token will join it
    cand = bf16 & done
    if not bool(cand.any()):
        return None
    g = int((layer.pos[cand] // group).min())
    return torch.nonzero(cand & (layer.pos // group == g)).flatten()
