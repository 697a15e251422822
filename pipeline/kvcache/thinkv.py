"""ThinKV (arXiv 2510.01290): thought-adaptive KV compression for long generations, budget-aware.

The generated sequence is cut into segments of `group` positions (thoughts at the granularity the
cache compresses); each closed segment is classified from the attention sparsity its tokens showed
when they were generated (mean over layers, heads and steps of the share of held tokens whose attention
weight is below uniform, 1/N): sparsity <= `thresholds[0]` is a reasoning thought (R), >= `thresholds[1]`
a transition thought (T), between an execution thought (E). The prompt counts as reasoning. Importance
R > E > T (the paper's order) decides where precision goes and what goes first:

- Precision from the budget: a ladder (default bf16 > fp8 > int4 > int2). At setup, each type's level
  is the most precise lossy level at which every token of the budgeted sequence fits (scales and
  metadata counted, as uniform quantization would choose); the budget left over lifts R, then E, one
  level up (type shares taken as the calibrated tertiles, a third each). With `floor` (off by
  default), R thoughts are lifted to that level when evicting the transition thoughts pays for it.
- Demotion before eviction, progressive: tokens stay bf16 until the budget requires compressing them;
  then, one segment at a time, a segment moves one rung down (bf16 -> fp8 -> int4 ...) but not below
  its type's level: the most precise first, among equals the least important type, then the oldest
  (`demote: direct` sends a closed segment straight to its type's level instead). Early in a
  generation, when the budget is still loose for the few tokens held, the prompt and first thoughts
  keep fp8 or int4; they reach their type's level only as the sequence grows. Still over budget: the
  transitions are evicted if `floor` was paid with them; then segments go below their type's level,
  one rung at a time, and the open segment (the current thought, the most important) may go from
  bf16 to fp8 (per-token scales), last.
- Eviction only when everything sits at the lowest level: whole thoughts in order T, E, R, among a type
  the least attended (mean attention each token received per query since it was written) first, and in
  a thought its least attended tokens first; the newest `recent` closed segments, the open segment and
  the first `sinks` tokens go last, in that order. So, but for transitions evicted to pay a floor, the
  cache never evicts a token it could hold at a lower precision, and spends the rest of the budget on
  the important thoughts.

Options chosen on held-out prompts (calib_tail.txt openings and arc_challenge questions, never the
evaluated ones; `bench/kvcache_policies.py --tune`, `bench/results/kvcache_policies_tune_*.jsonl`): at
20% of the bf16 bytes, progressive demotion gives KL 0.142 and 100% greedy agreement where direct
demotion gives 0.233 and 53%; a reasoning floor of int4 (transitions evicted for it) gives 0.51 and 89%.

Simulation choices where the paper leaves room: thoughts are fixed segments of `group` tokens (the unit
the cache compresses in), a segment's type is decided once it closes, attention is summed over heads
per layer (eviction is per layer, the type is shared by all layers), demotion requantizes the stored
values (an engine keeps no bf16 copy), and nothing is compressed before the budget requires it.

The sparsity thresholds come from calibration text (`calibrate_thresholds`: tertiles of the segment
sparsities of full-cache passes), never from the evaluated text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.evict import evict_in_order
from lpc.pipeline.kvcache.levels import KIVI_GROUP, LEVELS, check_level, scale_bytes, token_bytes
from lpc.pipeline.kvcache.policy import POLICIES, KVPolicy, PolicyCache, PolicyLayer

TYPES = ("R", "E", "T")  # most important first
LADDER = ("bf16", "fp8", "int4", "int2")


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


@dataclass
class Unit:
    """A segment's held tokens in one layer: what demotion and eviction act on."""

    seg: int
    index: torch.Tensor  # held-token indices
    rank: int  # importance: 0 R, 1 E, 2 T; -1 the open segment (most important)
    rung: int  # ladder position of its most precise token
    cost: int  # exact bytes it holds now (payload, metadata, its chunks' scales)


@POLICIES.register("thinkv")
class ThinKVPolicy(KVPolicy):
    name = "thinkv"
    meta_bytes = 8  # position (int32) and accumulated attention (fp32) of each held token
    table_entry_bytes = 8  # per live segment and layer: its type and range
    needs_attention = True

    def __init__(self, budget: float = 1.0, group: int = KIVI_GROUP, thresholds: tuple[float, float] = (0.80, 0.90),
                 ladder: tuple[str, ...] | list[str] = LADDER, sinks: int = 4, recent: int = 1,
                 floor: str | None = None, demote: str = "progressive",
                 **options: Any):
        """group: segment length; thresholds: sparsity (R|E, E|T); ladder: precisions from bf16 down
        (e.g. [bf16, fp8, int4, int2]); sinks: leading tokens evicted last; recent: newest closed
        segments evicted after every other closed one; floor: the level R thoughts are lifted to when
        evicting transition thoughts pays for it (a ladder level, or null for never); demote: progressive (one
        rung at a time, as the budget requires) or direct (a closed segment straight to its type's level)"""
        super().__init__(budget, **options)
        lo, hi = (float(t) for t in thresholds)
        if not 0 <= lo <= hi <= 1:
            raise InputError(f"thinkv thresholds must be 0 <= R|E <= E|T <= 1, got {thresholds}",
                             "e.g. thresholds: [0.8, 0.9]")
        ladder = tuple(check_level(x) for x in ladder)
        if len(ladder) < 2 or ladder[0] != "bf16" or len(set(ladder)) != len(ladder) \
                or [LEVELS.index(x) for x in ladder] != sorted(LEVELS.index(x) for x in ladder):
            raise InputError(f"thinkv ladder must start at bf16 and go down in precision, got {list(ladder)}",
                             "e.g. ladder: [bf16, fp8, int4, int2]")
        self.group, self.thresholds, self.sinks, self.recent = int(group), (lo, hi), int(sinks), int(recent)
        self.ladder = ladder
        if floor is not None and check_level(floor) not in ladder[1:]:
            raise InputError(f"thinkv floor must be a lossy level of the ladder {list(ladder)}, got {floor!r}",
                             "e.g. floor: int4 (or null)")
        if demote not in ("progressive", "direct"):
            raise InputError(f"thinkv demote must be progressive or direct, got {demote!r}", "e.g. demote: progressive")
        self.floor, self.demote = floor, demote
        self.evict_transitions = False  # R's floor is paid for by evicting T (set at setup)
        self.targets = {t: ladder[-1] for t in TYPES}  # set from the budget at setup
        self.types: dict[int, str] = {}  # segment -> type, shared by all layers
        self.stats: dict[int, list[float]] = {}  # open segment -> [sparsity sum, steps]
        self.prompt = None  # tokens of the prompt (the first forward)

    # -- precision from the budget ------------------------------------------------------------
    def setup(self, heads: int, head_dim: int, capacity: int) -> None:
        super().setup(heads, head_dim, capacity)
        per_token = self.budget_bytes / max(capacity, 1)
        cost = {lvl: self.steady_cost(lvl) for lvl in self.ladder}
        lossy = self.ladder[1:]
        base = next((lvl for lvl in lossy if cost[lvl] <= per_token), lossy[-1])
        self.targets = {t: base for t in TYPES}
        spare = per_token - cost[base]
        up = self.ladder[self.ladder.index(base) - 1]
        for t in TYPES:  # the importance order: R, then E, then T, while the budget lasts
            extra = (cost[up] - cost[base]) / len(TYPES)
            if up == "bf16" or extra > spare:
                break
            self.targets[t], spare = up, spare - extra
        self.evict_transitions = False
        rung = self.ladder.index
        if self.floor is not None and rung(self.targets["R"]) > rung(self.floor):
            need = (cost[self.floor] - cost[self.targets["R"]]) / len(TYPES)
            if need <= spare + cost[self.targets["T"]] / len(TYPES):  # T's bytes pay for R's floor
                self.targets["R"], self.evict_transitions = self.floor, True

    def steady_cost(self, level: str) -> float:
        """Bytes per token of a full segment held at `level`: payload, metadata, scales, table entry."""
        h, d, g = self.heads, self.head_dim, self.group
        return token_bytes(level, h, d) + self.meta_bytes + (scale_bytes(level, h, g, d) + self.table_entry_bytes) / g

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
            self.types[seg] = classify(total / steps, self.thresholds)

    def segment_type(self, seg: int) -> str:
        return self.types.get(seg, "R")

    # -- budget -------------------------------------------------------------------------
    def table_bytes(self, layer: PolicyLayer) -> int:
        return self.table_entry_bytes * int((layer.pos // self.group).unique().numel())

    def enforce(self, layer: PolicyLayer, index: int) -> None:
        if self.fits(layer):
            return
        self._demote(layer, below_target=False)
        if self.fits(layer):
            return
        if self.evict_transitions:
            evict_in_order(self, layer, self.eviction_order(layer, only_transitions=True))
            if self.fits(layer):
                return
        self._demote(layer, below_target=True)
        if not self.fits(layer):
            evict_in_order(self, layer, self.eviction_order(layer))

    def units(self, layer: PolicyLayer) -> list[Unit]:
        """Every segment with held tokens, oldest first."""
        seg_of = layer.pos // self.group
        segs, inv = torch.unique(seg_of, return_inverse=True)
        h, d = layer.keys.shape[1], layer.keys.shape[-1]
        per_level = torch.tensor([token_bytes(x, h, d) + self.meta_bytes for x in LEVELS], dtype=torch.float64)
        cost = torch.bincount(inv, weights=per_level[layer.level], minlength=segs.numel())
        for c, b in layer.chunk_bytes.items():  # a chunk lies inside one segment
            first = int(torch.nonzero(layer.chunk == c)[0, 0])
            cost[inv[first]] += b
        rungs = torch.tensor([self._rung(x) for x in LEVELS])[layer.level]
        rung = torch.full((segs.numel(),), len(self.ladder), dtype=torch.long).scatter_reduce(0, inv, rungs, "amin")
        open_seg = layer.written // self.group
        out = []
        for j, g in enumerate(segs.tolist()):
            rank = -1 if g >= open_seg else TYPES.index(self.segment_type(g))
            out.append(Unit(g, torch.nonzero(inv == j).flatten(), rank, int(rung[j]), int(cost[j])))
        return out

    def _rung(self, level: str) -> int:
        """Ladder position of `level` (a level off the ladder counts as the next lower rung)."""
        i = LEVELS.index(level)
        return next((r for r, x in enumerate(self.ladder) if LEVELS.index(x) >= i), len(self.ladder) - 1)

    def _next_rung(self, u: Unit, below_target: bool) -> int | None:
        """Where demoting `u` takes it: a closed segment above its type's level straight there, else (with
        below_target) one rung down; the open segment only with below_target, from bf16 to the first
        lossy rung with per-token scales (fp8/nvfp4)."""
        if u.rank < 0:
            first = self.ladder[1]
            return 1 if below_target and u.rung == 0 and first in ("fp8", "nvfp4") else None
        target = self.ladder.index(self.targets[TYPES[u.rank]])
        if u.rung < target:
            return u.rung + 1 if self.demote == "progressive" else target
        return u.rung + 1 if below_target and u.rung < len(self.ladder) - 1 else None

    def _demote(self, layer: PolicyLayer, below_target: bool) -> None:
        """Plan by exact bytes which segments go down and how far (most precise first, least important,
        oldest; below their type's level only with below_target), then requantize each changed segment
        once."""
        h, d = layer.keys.shape[1], layer.keys.shape[-1]
        units = self.units(layer)
        over = self.held_bytes(layer) - self.budget_bytes
        plan: dict[int, int] = {}
        while over > 0:
            movable = [u for u in units if self._next_rung(u, below_target) is not None]
            if not movable:
                break
            u = min(movable, key=lambda x: (x.rung, -x.rank, x.seg))
            rung = self._next_rung(u, below_target)
            level = self.ladder[rung]
            if u.rank < 0:  # the open segment: its bf16 tokens become per-token fp8 chunks
                bf = int((layer.level[u.index] == 0).sum())
                new = u.cost - bf * (token_bytes("bf16", h, d) - token_bytes(level, h, d)) + scale_bytes(level, h, bf, d)
            else:
                new = u.index.numel() * (token_bytes(level, h, d) + self.meta_bytes) + scale_bytes(level, h, u.index.numel(), d)
            over -= u.cost - new
            u.cost, u.rung, plan[u.seg] = new, rung, rung
        for u in units:
            if u.seg not in plan:
                continue
            level = self.ladder[plan[u.seg]]
            idx = u.index[layer.level[u.index] == 0] if u.rank < 0 else u.index
            if idx.numel():
                layer.compress(idx, level)

    def eviction_order(self, layer: PolicyLayer, only_transitions: bool = False) -> torch.Tensor:
        """Held-token indices, first evicted first: closed segments but the newest `recent` (type T, E, R;
        least mean attention first; their least attended tokens first), then those recent ones (oldest
        first), the open segment (oldest first), and the sinks last. only_transitions: the first part's
        T segments only."""
        mean = layer.score / (layer.written - layer.pos).clamp(min=1).float()
        units = self.units(layer)
        closed = [u for u in units if u.rank >= 0]
        recent = {u.seg for u in closed[-self.recent:]} if self.recent > 0 else set()
        sink = layer.pos < self.sinks

        def tokens(u: Unit) -> torch.Tensor:
            idx = u.index[~sink[u.index]]
            return idx[torch.argsort(mean[idx], stable=True)]

        old = sorted((u for u in closed if u.seg not in recent),
                     key=lambda u: (-u.rank, float(mean[u.index].mean()), u.seg))
        if only_transitions:
            parts = [tokens(u) for u in old if TYPES[u.rank] == "T"]
            return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        order = [tokens(u) for u in old] + [tokens(u) for u in closed if u.seg in recent]
        order += [u.index[~sink[u.index]] for u in units if u.rank < 0]
        order.append(torch.nonzero(sink).flatten())
        return torch.cat(order) if order else torch.empty(0, dtype=torch.long)
