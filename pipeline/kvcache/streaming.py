"""StreamingLLM (arXiv 2309.17453): the first `sinks` tokens (attention sinks) and a recent window,
at full precision; the oldest token after the sinks is evicted when the layer is over budget."""
from __future__ import annotations

from typing import Any

import torch

from lpc.pipeline.kvcache.evict import evict_in_order
from lpc.pipeline.kvcache.policy import POLICIES, KVPolicy, PolicyLayer


@POLICIES.register("streaming")
class StreamingPolicy(KVPolicy):
    name = "streaming"
    meta_bytes = 4  # the position of each held token (int32)

    def __init__(self, budget: float = 1.0, sinks: int = 4, **options: Any):
        """sinks: leading tokens always kept"""
        super().__init__(budget, **options)
        self.sinks = int(sinks)

    def enforce(self, layer: PolicyLayer, index: int) -> None:
        sink = layer.pos < self.sinks  # held order is position order; sinks go last, only if nothing else fits
        evict_in_order(self, layer, torch.cat([torch.nonzero(~sink).flatten(), torch.nonzero(sink).flatten()]))
