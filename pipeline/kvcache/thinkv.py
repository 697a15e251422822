"""ThinKV (arXiv 2510.01290): thought-adaptive KV compression for long generations.

The generated sequence is cut into segments of `group` positions (thoughts at the granularity the
cache compresses); each closed segment is classified from the attention sparsity its tokens showed
when they were generated (mean over layers, heads and steps of the share of held tokens whose attention
weight is below uniform, 1/N): sparsity <= `thresholds[0]` is a reasoning thought (R), >= `thresholds[1]`
a transition thought (T), between an execution thought (E). The prompt counts as reasoning. Importance
R > E > T decides everything else:

- Precision: a segment is compressed, oldest first and only when the budget requires it, to its type's
  level (`levels`, default R: fp8, E: int4, T: int2). The first `sinks` tokens and the open segment
  stay at full precision.
- Progressive eviction: when a new transition thought starts (the trajectory changes), every older
  transition thought keeps only the `keep` fraction of its tokens that received the most attention.
- Budget: over budget once nothing is left to compress, thought types give way in the order T, E, R:
  the type's segments lose precision one level at a time (fp8 -> int4 -> int2, oldest first), then
  its tokens beyond `min_tokens` per segment are evicted (least attended first, oldest segment first);
  only then the next type. Last, whole segments go in the same order, and the sinks at the very end.

Simulation choices where the paper leaves room: thoughts are fixed segments of `group` tokens (the unit
the cache compresses in), a segment's type is decided once it closes, attention is summed over heads
per layer (eviction is per layer, the type is shared by all layers), and nothing is compressed before
the budget requires it.

The sparsity thresholds come from calibration text (`calibrate_thresholds`: tertiles of the segment
sparsities of full-cache passes), never from the evaluated text.
"""
from __future__ import annotations

from typing import Any

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.evict import evict_in_order, oldest_full_chunk
from lpc.pipeline.kvcache.levels import KIVI_GROUP, LEVELS, check_level
from lpc.pipeline.kvcache.policy import POLICIES, KVPolicy, PolicyCache, PolicyLayer

TYPES = ("R", "E", "T")  # most important first
LADDER = ("fp8", "int4", "int2")


def sparsity(attn: torch.Tensor) -> torch.Tensor:
    """attn (1, heads, q, N) of the last q written tokens (causal: row i sees N - q + 1 + i tokens) ->
    (q,) share of each row's visible weights below uniform (1 / visible), mean over heads."""
    q, n = attn.shape[-2], attn.shape[-1]
    visible = torch.arange(n - q + 1, n + 1, device=attn.device, dtype=torch.float32)  # (q,)
    below = (attn[0].float() < 1.0 / visible[None, :, None]).float().sum(-1)  # (heads, q)
    masked = (q - 1 - torch.arange(q, device=attn.device)).float()  # zeros of the causal mask
    return ((below - masked) / visible).mean(0)


@torch.no_grad()
def calibrate_thresholds(model: Any, windows: list[list[int]], group: int = KIVI_GROUP) -> tuple[float, float]:
    """Tertiles of the segment sparsities of token `windows` run once each with the full cache and
    eager attention (each row of the causal attention read as a decode step): the (R|E, E|T) thresholds."""
    segs = []
    for w in windows:
        att = model(input_ids=torch.tensor([w], device=model.device), output_attentions=True).attentions
        rows = torch.stack([sparsity(a) for a in att]).mean(0)  # (len,): mean over layers
        segs += [float(rows[s:s + group].mean()) for s in range(group, len(w) - group + 1, group)]
    if not segs:
        raise InputError("thinkv calibration needs windows of at least two segments", f"give {2 * group}+ tokens")
    q = torch.tensor(segs).quantile(torch.tensor([1 / 3, 2 / 3]))
    return float(q[0]), float(q[1])


def classify(s: float, thresholds: tuple[float, float]) -> str:
    return "R" if s <= thresholds[0] else ("T" if s >= thresholds[1] else "E")


@POLICIES.register("thinkv")
class ThinKVPolicy(KVPolicy):
    name = "thinkv"
    meta_bytes = 8  # position (int32) and accumulated attention (fp32) of each held token
    table_entry_bytes = 8  # per live segment and layer: its type and range
    needs_attention = True

    def __init__(self, budget: float = 1.0, group: int = KIVI_GROUP, thresholds: tuple[float, float] = (0.80, 0.90),
                 levels: dict[str, str] | None = None, sinks: int = 4, keep: float = 0.5, min_tokens: int = 2,
                 evict_on_transition: bool = True, **options: Any):
        """group: segment length; thresholds: sparsity (R|E, E|T); levels: {R, E, T} -> fp8|nvfp4|int4|int2;
        sinks: full-precision leading tokens; keep: share an old transition keeps at a new transition;
        min_tokens: tokens a segment keeps before whole segments go; evict_on_transition"""
        super().__init__(budget, **options)
        lo, hi = (float(t) for t in thresholds)
        if not 0 <= lo <= hi <= 1:
            raise InputError(f"thinkv thresholds must be 0 <= R|E <= E|T <= 1, got {thresholds}",
                             "e.g. thresholds: [0.8, 0.9]")
        self.levels = {"R": "fp8", "E": "int4", "T": "int2", **(levels or {})}
        for t, lvl in self.levels.items():
            if t not in TYPES:
                raise InputError(f"thinkv levels: unknown thought type '{t}'", "use R, E and T")
            check_level(lvl)
        self.group, self.thresholds, self.sinks = int(group), (lo, hi), int(sinks)
        self.keep, self.min_tokens, self.evict_on_transition = float(keep), int(min_tokens), bool(evict_on_transition)
        self.types: dict[int, str] = {}  # segment -> type, shared by all layers
        self.stats: dict[int, list[float]] = {}  # open segment -> [sparsity sum, steps]
        self.prompt = None  # tokens of the prompt (the first forward)

    # -- classification ------------------------------------------------------------------
    def observe(self, cache: PolicyCache, attentions: tuple[torch.Tensor, ...] | None) -> None:
        super().observe(cache, attentions)
        written = cache.written()
        if self.prompt is None:  # the first forward is the prompt: reasoning
            self.prompt = written
            for g in range(0, (written - 1) // self.group + 1):
                self.types[g] = "R"
            return
        if attentions is not None:
            rows = sum(sparsity(a) for a in attentions) / len(attentions)  # (q,) mean over layers
            first = written - rows.numel()
            for i, s in enumerate(rows.tolist()):
                seg = (first + i) // self.group
                if seg not in self.types:
                    acc = self.stats.setdefault(seg, [0.0, 0])
                    acc[0], acc[1] = acc[0] + s, acc[1] + 1
        for seg in sorted(g for g in self.stats if (g + 1) * self.group <= written):  # closed segments
            total, steps = self.stats.pop(seg)
            kind = classify(total / steps, self.thresholds)
            starts_transition = kind == "T" and self.types.get(seg - 1) != "T"
            self.types[seg] = kind
            if starts_transition and self.evict_on_transition:
                for layer in cache.layers:
                    self._shrink_transitions(layer, seg)

    def segment_type(self, seg: int) -> str:
        return self.types.get(seg, "R")

    # -- budget -------------------------------------------------------------------------
    def table_bytes(self, layer: PolicyLayer) -> int:
        return self.table_entry_bytes * int((layer.pos // self.group).unique().numel())

    def enforce(self, layer: PolicyLayer, index: int) -> None:
        while not self.fits(layer):
            chunk = oldest_full_chunk(layer, self.group, self.sinks)
            if chunk is None:
                break
            seg = int(layer.pos[chunk[0]]) // self.group
            layer.compress(chunk, self.levels[self.segment_type(seg)])
        for kind in reversed(TYPES):  # T, then E, then R: lower precision, then tokens beyond min_tokens
            while not self.fits(layer) and self._demote_one(layer, kind):
                pass
            if self.fits(layer):
                return
            order, kinds, phase = self._eviction_order(layer)
            evict_in_order(self, layer, order[(kinds == TYPES.index(kind)) & (phase == 0)])
        if not self.fits(layer):  # everything but the sinks, then the sinks themselves
            rest = torch.cat([self._eviction_order(layer)[0], torch.nonzero(layer.pos < self.sinks).flatten()])
            evict_in_order(self, layer, rest)

    def _priority(self, layer: PolicyLayer) -> list[int]:
        """Closed segments with held tokens, least important and oldest first."""
        segs = sorted(set((layer.pos[layer.pos >= self.sinks] // self.group).tolist()))
        closed = [g for g in segs if g < layer.written // self.group]
        return sorted(closed, key=lambda g: (-TYPES.index(self.segment_type(g)), g))

    def _demote_one(self, layer: PolicyLayer, kind: str) -> bool:
        """Requantize the oldest compressed segment of type `kind` not yet at the ladder's end one step down."""
        lower = [LEVELS.index(name) for name in ("fp8", "nvfp4", "int4")]
        if not bool(torch.isin(layer.level, torch.tensor(lower, device=layer.level.device)).any()):
            return False
        for g in self._priority(layer):
            if self.segment_type(g) != kind:
                continue
            idx = torch.nonzero((layer.pos // self.group == g) & (layer.pos >= self.sinks)).flatten()
            level = LEVELS[int(layer.level[idx[0]])]
            if level in LADDER[:-1]:
                layer.compress(idx, LADDER[LADDER.index(level) + 1])
                return True
            if level == "nvfp4":
                layer.compress(idx, "int2")
                return True
        return False

    def _eviction_order(self, layer: PolicyLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held tokens (sinks excluded) in eviction order: first the tokens beyond `min_tokens` of each
        closed segment (least attended first), segment by segment least important and oldest first; then
        the rest of those segments in the same order; the open segment last. Also each one's type
        (index in TYPES) and phase (0: beyond min_tokens, 1: the last ones, 2: open segment)."""
        seg = layer.pos // self.group
        cand = torch.nonzero(layer.pos >= self.sinks).flatten()
        seg, score = seg[cand], layer.score[cand]
        n_seg = int(seg.max()) + 1 if cand.numel() else 0
        kinds = torch.tensor([TYPES.index(self.segment_type(g)) for g in range(n_seg)], dtype=torch.long)
        by_score = torch.argsort(score, stable=True)
        by_seg = by_score[torch.argsort(seg[by_score], stable=True)]  # grouped by segment, least attended first
        counts = torch.bincount(seg, minlength=n_seg)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(seg)
        rank[by_seg] = torch.arange(seg.numel()) - starts[seg[by_seg]]
        phase = (rank >= counts[seg] - self.min_tokens).long()  # 0: beyond min_tokens, 1: the last ones
        phase = torch.where(seg >= layer.written // self.group, torch.full_like(phase, 2), phase)
        order = by_score  # sort keys from the least significant: score, segment age, importance, phase
        for key in (seg, -kinds[seg], phase):
            order = order[torch.argsort(key[order], stable=True)]
        return cand[order], kinds[seg][order] if n_seg else seg, phase[order]

    def _shrink_transitions(self, layer: PolicyLayer, current: int) -> None:
        """Older transition thoughts keep their `keep` share of most attended tokens (at least min_tokens)."""
        if not layer.is_initialized:
            return
        mask = torch.ones(layer.held(), dtype=torch.bool, device=layer.pos.device)
        seg_of = layer.pos // self.group
        for g, kind in self.types.items():
            if kind != "T" or g >= current:
                continue
            idx = torch.nonzero((seg_of == g) & (layer.pos >= self.sinks)).flatten()
            keep = max(self.min_tokens, int(idx.numel() * self.keep))
            if idx.numel() > keep:
                order = idx[torch.argsort(layer.score[idx], descending=True, stable=True)]
                mask[order[keep:]] = False
        if not bool(mask.all()):
            layer.keep(mask)
