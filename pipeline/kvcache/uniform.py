"""Uniform KV quantization at a byte budget: every token is stored at one precision `level` (fp8, nvfp4,
int4, int2 KIVI-style). Tokens are compressed oldest first, a complete group of `group` positions at a
time, only as the budget requires (so the most recent tokens stay at full precision, as KIVI's residual
does); when every complete group is compressed and the layer is still over budget, the oldest tokens
after the first `sinks` are evicted."""
from __future__ import annotations

from typing import Any

import torch

from lpc.pipeline.kvcache.evict import evict_in_order, oldest_full_chunk
from lpc.pipeline.kvcache.levels import KIVI_GROUP, check_level
from lpc.pipeline.kvcache.policy import POLICIES, KVPolicy, PolicyLayer


@POLICIES.register("uniform")
class UniformPolicy(KVPolicy):
    name = "uniform"
    meta_bytes = 4  # the position of each held token (int32): needed once tokens are evicted

    def __init__(self, budget: float = 1.0, level: str = "fp8", group: int = KIVI_GROUP, sinks: int = 4,
                 **options: Any):
        """level: fp8 | nvfp4 | int4 | int2; group: positions compressed together; sinks: never evicted"""
        super().__init__(budget, **options)
        self.level, self.group, self.sinks = check_level(level), int(group), int(sinks)

    def enforce(self, layer: PolicyLayer, index: int) -> None:
        while not self.fits(layer):
            chunk = oldest_full_chunk(layer, self.group, 0)
            if chunk is None:
                break
            layer.compress(chunk, self.level)
        sink = layer.pos < self.sinks  # sinks go last, only when nothing else is left
        evict_in_order(self, layer, torch.cat([torch.nonzero(~sink).flatten(), torch.nonzero(sink).flatten()]))
