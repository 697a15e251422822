"""ThinKV at a byte budget: thought types from attention sparsity, precision per type chosen from the
budget, demotion (least important, oldest first) before any eviction, eviction of transitions first,
and at least the tokens uniform quantization holds at the same bytes."""
from __future__ import annotations

import pytest
import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.decode import decode, use_eager_attention
from lpc.pipeline.kvcache.levels import LEVELS
from lpc.pipeline.kvcache.policy import PolicyCache, make_policy
from lpc.pipeline.kvcache.thinkv import ThinKVPolicy, calibrate_thresholds

G = 8  # segment length in the synthetic runs


def attention_rows(n: int, kind: str) -> torch.Tensor:
    """(1, heads=2, 1, n) attention over n held tokens: dense, concentrated on a few, or in between."""
    w = torch.ones(n)
    if kind == "sparse":
        w = torch.full((n,), 1e-4)
        w[:2] = 1.0
    elif kind == "medium":
        w[: n // 2] = 1e-4
    return (w / w.sum()).expand(1, 2, 1, n)


def fill(cache: PolicyCache, kinds: list[str], group: int = G) -> None:
    """Prompt of one group, then one segment of each kind, with the constructed attention."""
    for layer in cache.layers:
        layer.update(torch.randn(1, 2, group, 16), torch.randn(1, 2, group, 16))
    cache.end_step(None)
    for kind in kinds:
        for _ in range(group):
            for layer in cache.layers:
                layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
            cache.end_step(tuple(attention_rows(layer.held(), kind) for layer in cache.layers))


def typed_layer(targets: dict[str, str] | None = None, **options):
    """Segments R (prompt), R, E, T of 8 tokens each, all closed and in bf16 (no budget pressure yet)."""
    pol = ThinKVPolicy(0.99, group=G, thresholds=(0.3, 0.7), sinks=0, **options)
    cache = PolicyCache(pol, 1)
    pol.setup(2, 16, 10_000)
    fill(cache, ["dense", "medium", "sparse"])
    assert pol.types == {0: "R", 1: "R", 2: "E", 3: "T"}
    if targets:
        pol.targets = targets
    return pol, cache.layers[0]


def levels_of(layer) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for p, lv in zip(layer.pos.tolist(), layer.level.tolist()):
        out.setdefault(p // G, set()).add(LEVELS[lv])
    return out


def held_per_segment(layer) -> list[int]:
    return torch.bincount(layer.pos // G, minlength=4).tolist()


def test_thinkv_classifies_segments_by_attention_sparsity():
    pol = ThinKVPolicy(0.99, group=G, thresholds=(0.3, 0.7))
    cache = PolicyCache(pol, 2)
    pol.setup(2, 16, 10_000)
    fill(cache, ["dense", "sparse", "medium", "dense", "sparse"])
    assert pol.types == {0: "R", 1: "R", 2: "T", 3: "E", 4: "R", 5: "T"}


@pytest.mark.parametrize("budget, targets", [
    (0.05, {"R": "int2", "E": "int2", "T": "int2"}),  # nothing affords more than the lowest rung
    (0.2, {"R": "int2", "E": "int2", "T": "int2"}),  # int2 for all (152.25 B/token of 153.6)
    (0.3, {"R": "int4", "E": "int4", "T": "int2"}),  # int2 for all, what is left lifts R, then E
    (0.4, {"R": "fp8", "E": "int4", "T": "int4"}),  # int4 for all, what is left lifts R to fp8
    (0.6, {"R": "fp8", "E": "fp8", "T": "fp8"}),  # fp8 for all; bf16 is never a target
])
def test_precision_per_thought_type_comes_from_the_budget(budget, targets):
    pol = ThinKVPolicy(budget)
    pol.setup(3, 64, 1000)  # SmolLM2's layer: 768 bf16 bytes per token
    assert pol.targets == targets and not pol.evict_transitions
    floored = ThinKVPolicy(budget, floor="int4")  # R lifted to int4 where evicting transitions pays for it
    floored.setup(3, 64, 1000)
    assert floored.evict_transitions == (budget == 0.2)
    assert floored.targets == ({**targets, "R": "int4"} if budget == 0.2 else targets)
    assert pol.steady_cost("int2") == 96 + 8 + (1536 + 8) / 32  # payload, metadata, KIVI scales, table


def test_demotion_takes_the_least_important_thought_first():
    pol, layer = typed_layer({"R": "fp8", "E": "int4", "T": "int2"}, demote="direct")
    full = pol.held_bytes(layer)
    pol.budget_bytes = full - 500  # one segment must go down: the transition, to its level
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"bf16"}, 1: {"bf16"}, 2: {"bf16"}, 3: {"int2"}}
    pol.budget_bytes = pol.held_bytes(layer) - 1  # then the execution thought, not the reasoning ones
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"bf16"}, 1: {"bf16"}, 2: {"int4"}, 3: {"int2"}}
    assert held_per_segment(layer) == [8, 8, 8, 8] and pol.held_bytes(layer) <= pol.budget_bytes


def test_no_eviction_while_a_lower_precision_fits():
    pol, layer = typed_layer({"R": "fp8", "E": "int4", "T": "int2"})
    at_int2 = 4 * (8 * (16 + 8) + 4 * 2 * (16 + 8)) + 4 * 8  # 4 segments at int2 and the segment table
    pol.budget_bytes = at_int2
    pol.enforce(layer, 0)
    assert held_per_segment(layer) == [8, 8, 8, 8]  # everything held ...
    assert levels_of(layer) == {g: {"int2"} for g in range(4)}  # ... at the lowest rung
    assert pol.held_bytes(layer) == at_int2  # the budget, to the byte


def test_progressive_demotion_goes_one_rung_at_a_time():
    pol, layer = typed_layer({"R": "fp8", "E": "int4", "T": "int2"})
    pol.budget_bytes = pol.held_bytes(layer) - 1  # a little over: the transition to fp8 only, not int2
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"bf16"}, 1: {"bf16"}, 2: {"bf16"}, 3: {"fp8"}}
    pol.budget_bytes = pol.held_bytes(layer) - 1  # then the execution thought, to fp8 too
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"bf16"}, 1: {"bf16"}, 2: {"fp8"}, 3: {"fp8"}}
    assert held_per_segment(layer) == [8, 8, 8, 8] and pol.held_bytes(layer) <= pol.budget_bytes


def test_transitions_are_evicted_before_reasoning_goes_below_its_floor():
    pol, layer = typed_layer({"R": "int4", "E": "int2", "T": "int2"}, recent=0, demote="direct")
    pol.evict_transitions = True
    at_targets = 2 * (8 * (32 + 8) + 192) + 2 * (8 * (16 + 8) + 192) + 4 * 8  # payload, metadata, scales, table
    pol.budget_bytes = pol.held_bytes(layer) - 1
    pol.enforce(layer, 0)  # a little over: the least important segment to its level, no more
    assert levels_of(layer)[3] == {"int2"} and levels_of(layer)[0] == {"bf16"}
    pol.budget_bytes = at_targets - 5 * (16 + 8)  # everything at its level is five int2 tokens too many
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"int4"}, 1: {"int4"}, 2: {"int2"}, 3: {"int2"}}  # R keeps its floor ...
    assert held_per_segment(layer) == [8, 8, 8, 3]  # ... the transition paid
    assert pol.held_bytes(layer) <= pol.budget_bytes
    pol.budget_bytes = pol.held_bytes(layer) - 3 * (16 + 8) - 192 - 8 - 1  # the whole transition and a byte
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"int2"}, 1: {"int4"}, 2: {"int2"}}  # then R goes down, oldest first
    assert held_per_segment(layer)[:3] == [8, 8, 8] and pol.held_bytes(layer) <= pol.budget_bytes


def test_eviction_starts_with_the_least_attended_tokens_of_transitions():
    pol, layer = typed_layer({"R": "int2", "E": "int2", "T": "int2"}, recent=0)
    w = torch.arange(8.0, 0.0, -1.0)
    layer.score[24:32] = w * w  # mean attention per query seen (32 - pos = w queries): later tokens less attended
    pol.budget_bytes = 4 * (8 * 24 + 192) + 32 - 24 * 3  # int2 for all, three tokens short
    pol.enforce(layer, 0)
    assert held_per_segment(layer) == [8, 8, 8, 5]  # only the transition lost tokens ...
    assert layer.pos[layer.pos >= 24].tolist() == [24, 25, 26, 27, 28]  # ... its least attended ones
    assert pol.held_bytes(layer) <= pol.budget_bytes


def test_the_open_segment_goes_to_fp8_last():
    pol = ThinKVPolicy(0.99, group=G, thresholds=(0.3, 0.7), sinks=0)
    cache = PolicyCache(pol, 1)
    pol.setup(2, 16, 10_000)
    fill(cache, ["dense"])
    layer = cache.layers[0]
    layer.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))  # 5 tokens of an open segment
    pol.targets = {t: "int2" for t in "RET"}
    pol.budget_bytes = pol.held_bytes(layer) - 2 * 704 - 1  # both closed segments to int2 is not enough
    pol.enforce(layer, 0)
    assert levels_of(layer) == {0: {"int2"}, 1: {"int2"}, 2: {"fp8"}} and layer.held() == 21


@pytest.fixture(scope="module")
def model(make_llama):
    m = make_llama(vocab_size=64, layers=2, head_dim=16, max_position_embeddings=512)
    use_eager_attention(m)
    return m


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_thinkv_holds_at_least_what_uniform_quantization_holds(model, budget):
    g = torch.Generator().manual_seed(0)
    prompt, cont = torch.randint(0, 64, (8,), generator=g).tolist(), torch.randint(0, 64, (200,), generator=g).tolist()
    cap = len(prompt) + len(cont)
    think = make_policy("thinkv", budget, thresholds=(0.3, 0.7))
    t = decode(model, prompt, think, cap, len(cont), forced=cont)
    level = think.targets["T"]  # the base rung: the least important thought's
    u = decode(model, prompt, make_policy("uniform", budget, level=level), cap, len(cont), forced=cont)
    assert t.held_tokens[-1] >= u.held_tokens[-1] and t.peak_bytes <= think.budget_bytes * 2


def test_bad_thinkv_options_are_refused():
    with pytest.raises(InputError, match="ladder must start at bf16"):
        ThinKVPolicy(0.1, ladder=["fp8", "int2"])
    with pytest.raises(InputError, match="ladder"):
        ThinKVPolicy(0.1, ladder=["bf16", "int2", "int4"])
    with pytest.raises(InputError, match="unknown option"):
        ThinKVPolicy(0.1, keep=0.5)
    with pytest.raises(InputError, match="demote must be"):
        ThinKVPolicy(0.1, demote="fast")
    with pytest.raises(InputError, match="floor must be a lossy level"):
        ThinKVPolicy(0.1, floor="bf16")


def test_thinkv_thresholds_are_tertiles_of_calibration_sparsity(model):
    g = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, 64, (96,), generator=g).tolist() for _ in range(2)]
    lo, hi = calibrate_thresholds(model, windows, group=16)
    assert 0 < lo <= hi < 1
    with pytest.raises(InputError, match="two segments"):
        calibrate_thresholds(model, [windows[0][:20]], group=16)
