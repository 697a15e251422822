"""H2O (arXiv 2306.14048): a recent window plus the heavy hitters, the tokens with the most accumulated
attention, at full precision. Over budget, a layer keeps the most recent `recent` share of the tokens
it can afford and evicts, among the others, those with the least accumulated attention."""
from __future__ import annotations

from typing import Any

import torch

from lpc.pipeline.kvcache.evict import evict_in_order
from lpc.pipeline.kvcache.levels import token_bytes
from lpc.pipeline.kvcache.policy import POLICIES, KVPolicy, PolicyLayer


@POLICIES.register("h2o")
class H2OPolicy(KVPolicy):
    name = "h2o"
    meta_bytes = 8  # position (int32) and accumulated attention (fp32) of each held token
    needs_attention = True

    def __init__(self, budget: float = 1.0, recent: float = 0.5, **options: Any):
        """recent: share of the affordable tokens kept as the recent window"""
        super().__init__(budget, **options)
        self.recent = float(recent)

    def enforce(self, layer: PolicyLayer, index: int) -> None:
        if self.fits(layer):
            return
        afford = self.budget_bytes // (token_bytes("bf16", self.heads, self.head_dim) + self.meta_bytes)
        n = layer.held()
        window = min(n, int(afford * self.recent))
        old = torch.arange(n - window, device=layer.pos.device)
        order = old[torch.argsort(layer.score[old], stable=True)]  # least attended first
        evict_in_order(self, layer, torch.cat([order, torch.arange(n - window, n, device=old.device)]))
