"""FGMP block policy: model-wide top fraction, baselines, activation threshold, plan bits."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import get_format
from lpc.formats.fgmp import block_scores
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.allocation.fgmp import (
    activation_threshold, collect_activation_scores, fgmp_layer_bits, high_fraction_by_group,
    magnitude_high_blocks, plan_bits_per_weight, random_high_blocks, select_high_blocks,
    weight_block_scores,
)


def _brute_force(scores: dict, fraction: float) -> dict:
    """Sort (-score, layer order, block index) in Python and take the first round-half-up(p n)."""
    items = [(-float(v), li, bi, name) for li, (name, s) in enumerate(scores.items())
             for bi, v in enumerate(s.reshape(-1).tolist())]
    items.sort(key=lambda t: t[:3])
    k = int(fraction * len(items) + 0.5)
    masks = {name: torch.zeros(s.numel(), dtype=torch.bool) for name, s in scores.items()}
    for _, _, bi, name in items[:k]:
        masks[name][bi] = True
    return {name: m.view(scores[name].shape) for name, m in masks.items()}


def _random_scores(seed: int, quantized: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5, 2), (1, 7), (2, 3)]
    out = {}
    for i, shape in enumerate(shapes):
        s = torch.randn(shape, generator=g)
        out[f"layer{i}"] = s.round() if quantized else s  # rounding makes many ties
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_select_equals_brute_force(seed, fraction):
    scores = _random_scores(seed, quantized=seed % 2 == 1)
    got = select_high_blocks(scores, fraction)
    want = _brute_force(scores, fraction)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in got.values()) == int(fraction * total + 0.5)
    for name in scores:
        assert got[name].dtype == torch.bool and got[name].shape == scores[name].shape
        assert torch.equal(got[name], want[name]), name


def test_constructed_ordering():
    scores = {"a": torch.tensor([[5.0, 1.0], [3.0, 0.0]]), "b": torch.tensor([[4.0, 2.0]])}
    got = select_high_blocks(scores, 0.5)  # 3 of 6: scores 5, 4, 3
    assert got["a"].tolist() == [[True, False], [True, False]]
    assert got["b"].tolist() == [[True, False]]


def test_ties_by_layer_order_then_index():
    scores = {"first": torch.zeros(2, 2), "second": torch.zeros(1, 3), "third": torch.ones(1, 1)}
    got = select_high_blocks(scores, 4 / 8)  # the 1.0 plus the first three zeros in model order
    assert got["third"].tolist() == [[True]]
    assert got["first"].tolist() == [[True, True], [True, False]]
    assert got["second"].tolist() == [[False, False, False]]
    reordered = select_high_blocks({"second": scores["second"], "first": scores["first"],
                                    "third": scores["third"]}, 4 / 8)
    assert reordered["second"].tolist() == [[True, True, True]]
    assert not reordered["first"].any()


def test_rounding_half_up_and_extremes():
    scores = {"a": torch.arange(5.0).view(1, 5)}
    assert int(select_high_blocks(scores, 0.5)["a"].sum()) == 3  # 2.5 -> 3, not banker's 2
    assert not select_high_blocks(scores, 0.0)["a"].any()
    assert select_high_blocks(scores, 1.0)["a"].all()
    assert select_high_blocks({}, 0.3) == {}


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "0.3"])
def test_bad_fraction(fraction):
    with pytest.raises(RecipeError, match="fraction must be in"):
        select_high_blocks({"a": torch.ones(2, 2)}, fraction)


def test_bad_scores():
    with pytest.raises(InputError, match="NaN or inf"):
        select_high_blocks({"a": torch.tensor([[1.0, float("nan")]])}, 0.5)
    with pytest.raises(InputError, match=r"float \(R, nb\)"):
        select_high_blocks({"a": torch.ones(4)}, 0.5)


def test_deterministic_and_seeded_random():
    scores = _random_scores(3, quantized=True)
    a, b = select_high_blocks(scores, 0.4), select_high_blocks(scores, 0.4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    r1, r2 = random_high_blocks(shapes, 0.4, seed=7), random_high_blocks(shapes, 0.4, seed=7)
    r3 = random_high_blocks(shapes, 0.4, seed=8)
    assert all(torch.equal(r1[n], r2[n]) for n in r1)
    assert any(not torch.equal(r1[n], r3[n]) for n in r1)
    assert sum(int(m.sum()) for m in r1.values()) == sum(int(m.sum()) for m in a.values())


def _sensitive_small_block_case():
    """One layer (4, 32) = 8 blocks; row 0 block 1 is tiny in magnitude but has a huge Fisher."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 32, generator=g)
    w[0, 16:] *= 0.01
    fisher = torch.ones(4, 32)
    fisher[0, 16:] = 1e8
    return w, fisher


def test_fgmp_differs_from_magnitude_and_random():
    w, fisher = _sensitive_small_block_case()
    scores = weight_block_scores({"l": w}, {"l": fisher})
    torch.testing.assert_close(scores["l"], block_scores(w, fisher))
    fgmp = select_high_blocks(scores, 1 / 8)["l"]
    assert fgmp.tolist()[0] == [False, True] and int(fgmp.sum()) == 1
    for norm in ("l2", "amax"):
        mag = magnitude_high_blocks({"l": w}, 1 / 8, norm=norm)["l"]
        assert int(mag.sum()) == 1 and not mag[0, 1]
        blocks = w.view(4, 2, 16)
        strength = blocks.norm(dim=-1) if norm == "l2" else blocks.abs().amax(-1)
        assert mag.view(-1).nonzero().item() == int(strength.view(-1).argmax())
    # A random policy on a big layer overlaps FGMP only by chance (about p of FGMP's picks).
    g = torch.Generator().manual_seed(1)
    big = {"x": torch.randn(64, 8, generator=g).abs() ** 3}
    top = select_high_blocks(big, 0.25)["x"]
    rnd = random_high_blocks({"x": (64, 8)}, 0.25, seed=0)["x"]
    overlap = int((top & rnd).sum()) / int(top.sum())
    assert int(rnd.sum()) == int(top.sum()) == 128 and overlap < 0.5


def test_magnitude_pads_last_dim():
    w = torch.zeros(2, 20)
    w[1, 18] = 5.0  # in the zero-padded second block
    mask = magnitude_high_blocks({"l": w}, 0.25)["l"]
    assert mask.shape == (2, 2) and mask.tolist() == [[False, False], [False, True]]
    with pytest.raises(RecipeError, match="norm"):
        magnitude_high_blocks({"l": w}, 0.25, norm="l1")


def test_weight_scores_need_fisher():
    with pytest.raises(InputError, match="no Fisher statistics"):
        weight_block_scores({"l": torch.ones(2, 16)}, {})


def test_activation_threshold_quantile_rule():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, generator=g)
    for p in (0.0, 0.01, 0.3, 0.5, 0.999, 1.0):
        t = activation_threshold(s, p)
        assert int((s > t).sum()) == int(p * 1000 + 0.5), p
    assert activation_threshold(s, 0.0) == float(s.max())
    ties = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    t = activation_threshold(ties, 0.4)  # k=2 but s_2 == s_3: the tied 2.0s stay low
    assert t == 2.0 and int((ties > t).sum()) == 1
    assert int((ties > activation_threshold(ties, 1.0)).sum()) == 5
    with pytest.raises(InputError, match="no score samples"):
        activation_threshold(torch.zeros(0), 0.3)
    with pytest.raises(RecipeError):
        activation_threshold(s, 2.0)


@pytest.mark.parametrize("shape, p", [((8, 64), 0.3), ((5, 40), 0.5), ((3, 200), 0.0), ((16, 16), 0.9), ((16, 24), 1.0)])
def test_layer_bits_equal_stored_bits(shape, p):
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=g)
    mask = random_high_blocks({"w": (shape[0], -(-shape[1] // 16))}, p, seed=1)["w"]
    q = get_format("fgmp").quantize(w, mask=mask)
    assert fgmp_layer_bits(mask, shape[1]) == q.storage_bits()
    bpw = plan_bits_per_weight({"w": mask}, {"w": shape[1]})
    assert bpw == pytest.approx(q.bits_per_weight())


def test_plan_bits_formula_and_errors():
    masks = random_high_blocks({"a": (256, 64), "b": (128, 128)}, 0.3, seed=0)
    bpw = plan_bits_per_weight(masks, {"a": 1024, "b": 2048})
    n = 256 * 1024 + 128 * 2048
    assert bpw == pytest.approx(4.5 + 3.5 * 0.3 + 1 / 16 + 64 / n, rel=1e-4)
    with pytest.raises(InputError, match="in_features=100"):
        fgmp_layer_bits(masks["a"], 100)


def test_high_fraction_by_group():
    masks = {"l0.q_proj": torch.tensor([[True, False]]), "l1.q_proj": torch.tensor([[True, True]]),
             "l0.down_proj": torch.tensor([[False, False, False, True]])}
    got = high_fraction_by_group(masks, lambda n: n.rsplit(".", 1)[-1])
    assert got == {"q_proj": 0.75, "down_proj": 0.25}


@pytest.fixture(scope="module")
def tiny_llama(make_llama):
    return make_llama(vocab_size=64, max_position_embeddings=64).train()


def test_collect_activation_scores(tiny_llama):
    targets = {"down": tiny_llama.model.layers[0].mlp.down_proj, "q": tiny_llama.model.layers[1].self_attn.q_proj}
    fisher = {"down": torch.rand(40) + 0.5, "q": torch.rand(32) + 0.5}
    batches = [torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (1, 5))]
    seen: dict[str, list] = {"down": [], "q": []}
    handles = [m.register_forward_hook(lambda _m, i, _o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
               for n, m in targets.items()]
    with torch.no_grad():
        for b in batches:
            tiny_llama(input_ids=b)
    for h in handles:
        h.remove()
    tiny_llama.train()
    got = collect_activation_scores(tiny_llama, batches, targets, fisher, act_amax={"q": 10.0})
    assert tiny_llama.training and all(not m._forward_hooks for m in tiny_llama.modules())
    tiny_llama.eval()
    want_down = torch.cat([block_scores(x, fisher["down"]).reshape(-1) for x in seen["down"]])
    want_q = torch.cat([block_scores(x, fisher["q"], 10.0).reshape(-1) for x in seen["q"]])
    assert got["down"].shape == (19 * 3,) and got["q"].shape == (19 * 2,)
    torch.testing.assert_close(got["down"], want_down)
    torch.testing.assert_close(got["q"], want_q)
    sub = collect_activation_scores(tiny_llama, batches, targets, fisher, max_blocks_per_layer=10, seed=3)
    again = collect_activation_scores(tiny_llama, batches, targets, fisher, max_blocks_per_layer=10, seed=3)
    assert sub["down"].shape == (10,) and torch.equal(sub["down"], again["down"])
    assert all(bool((want_down == v).any()) for v in sub["down"])
    with pytest.raises(InputError, match="no activation Fisher"):
        collect_activation_scores(tiny_llama, batches, targets, {"q": fisher["q"]})


def test_plot_precision_map_masks_and_bits(tmp_path):
    from matplotlib.image import imread

    from lpc.pipeline.artifact.plots import block_position_profile, plot_precision_map
    masks = random_high_blocks({"l0.q_proj": (32, 4), "l0.down_proj": (32, 200)}, 0.3, seed=0)
    paths = [plot_precision_map(masks, tmp_path / "map.png"), plot_precision_map(masks, tmp_path / "map2.png"),
             plot_precision_map({"l0.q_proj": 5.2, "l0.down_proj": 4.5}, tmp_path / "bits.png")]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"tIME" not in data and b"Software" not in data
        assert imread(p).shape[0] > 100
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()
    prof = block_position_profile(torch.tensor([[True, False, False, True]] * 2), 2)
    assert prof.tolist() == [0.5, 0.5]
    assert block_position_profile(torch.tensor([[True, False]]), 4).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(InputError, match="do not mix"):
        plot_precision_map({"a": torch.ones(2, 2, dtype=torch.bool), "b": 4.5}, tmp_path / "x.png")
    with pytest.raises(InputError, match="no layers"):
        plot_precision_map({}, tmp_path / "x.png")


def test_score_pool_keeps_the_cap_smallest_keys_whenever_it_prunes():
    """A uniform subset: the `cap` scores with the smallest (random key, position), in the order added,
    whatever the sizes of the batches (pruning only now and then)."""
    from lpc.pipeline.allocation.fgmp import _Pool

    scores = torch.arange(1000, dtype=torch.float32)
    keys = torch.rand(1000, generator=torch.Generator().manual_seed(7))
    want = scores[torch.sort(torch.sort(keys, stable=True).indices[:25]).values]
    for sizes in ([1000], [10] * 100, [3, 997], [333, 333, 334]):
        pool, start, held = _Pool(25, 7), 0, []
        for n in sizes:
            pool.add(scores[start:start + n])
            start += n
            held.append(sum(v.numel() for v in pool.values))
        assert torch.equal(pool.result(), want), sizes
        if sizes == [10] * 100:  # bounded: scores whose key cannot make the cut are dropped on arrival
            assert max(held) <= 2 * 25 + 10 and sum(held[-50:]) / 50 < 40, held
