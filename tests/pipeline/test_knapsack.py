"""Multiple-choice knapsack: exact DP vs brute force, budgets, hull, sensitivity."""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from fractions import Fraction

import pytest
import torch

from lpc.formats import LpcError, get_format, list_formats
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.allocation.knapsack import Layer, Option, lagrangian_hull, layer_sensitivity, pareto_front, solve

BPW = [2.0, 3.0, 4.0, 4.25, 4.5, 4.625, 8.0, 8.25, 16.0]
NUMELS = [16, 48, 100, 256, 4096, 11008]


def _instance(rng: random.Random) -> list[Layer]:
    """Half the instances have losses falling with bits (as real formats do), so budgets bind;
    losses rounded to quarters (exact sums) make equal-loss assignments that test the tie-breaks."""
    realistic = rng.random() < 0.5
    layers = []
    for j in range(rng.randint(1, 6)):
        opts = []
        for i in range(rng.randint(1, 4)):
            bpw = rng.choice(BPW)
            loss = rng.uniform(0, 3) * (2.0 ** -bpw * 16 if realistic else 1.0)
            opts.append(Option(f"f{i}", bpw, round(loss * 4) / 4 if rng.random() < 0.5 else loss))
        layers.append(Layer(f"l{j}", rng.choice(NUMELS), tuple(opts)))
    return layers


def _brute(layers, budget):
    """(least loss, fewest bits among those) over every feasible assignment, exact costs."""
    cap = Fraction(budget) * sum(lay.numel for lay in layers)
    best = None
    for combo in itertools.product(*(lay.options for lay in layers)):
        bits = sum(Fraction(o.bits_per_weight) * lay.numel for o, lay in zip(combo, layers))
        if bits <= cap:
            loss = math.fsum(o.loss for o in combo)
            if best is None or loss < best[0] - 1e-9 or (abs(loss - best[0]) <= 1e-9 and bits < best[1]):
                best = (loss, bits)
    return best


def _bits(sol, layers):
    labels = {lay.name: {o.label: o for o in lay.options} for lay in layers}
    return sum(Fraction(labels[lay.name][sol.choice[lay.name]].bits_per_weight) * lay.numel for lay in layers)


@pytest.mark.parametrize("seed", range(300))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    layers = _instance(rng)
    lo = sum(min(o.bits_per_weight for o in lay.options) * lay.numel for lay in layers)
    hi = sum(max(o.bits_per_weight for o in lay.options) * lay.numel for lay in layers)
    n = sum(lay.numel for lay in layers)
    # Mostly binding budgets; never below the exact minimum (lo / n may round down).
    budget = max(rng.uniform(lo / n, hi / n), math.nextafter(lo / n, math.inf)) if seed % 4 else hi / n + 0.5
    sol = solve(layers, budget)
    want_loss, want_bits = _brute(layers, budget)
    assert sol.exact
    assert sol.predicted_loss == pytest.approx(want_loss, abs=1e-9)
    assert _bits(sol, layers) == want_bits  # fewest bits among the least-loss assignments
    assert _bits(sol, layers) <= Fraction(budget) * n
    assert sol.bits == pytest.approx(float(want_bits)) and sol.bits_per_weight <= budget


def _stored_bits_instance(rng: random.Random) -> list[Layer]:
    """Costs as measured on padded layers: integer stored bits over odd numels (non-dyadic
    bits per weight such as 5.4 = 6912 / 1280), given exactly as Fractions."""
    layers = []
    for j in range(rng.randint(2, 6)):
        numel = rng.choice([40 * 32, 32 * 40, 172 * 64, 3 * 7 * 11, 1000])
        opts = []
        for i in range(rng.randint(2, 4)):
            bits = rng.randint(2 * numel, 16 * numel) // 8 * 8 + rng.choice([0, 32])
            opts.append(Option(f"f{i}", Fraction(bits, numel), rng.uniform(0, 3) * 2.0 ** (-bits / numel)))
        layers.append(Layer(f"l{j}", numel, tuple(opts)))
    return layers


@pytest.mark.parametrize("seed", range(60))
def test_dp_exact_on_non_dyadic_stored_bits(seed):
    rng = random.Random(1000 + seed)
    layers = _stored_bits_instance(rng)
    lo = sum(min(o.bits_per_weight for o in lay.options) * lay.numel for lay in layers)
    hi = sum(max(o.bits_per_weight for o in lay.options) * lay.numel for lay in layers)
    n = sum(lay.numel for lay in layers)
    budget = float(lo / n) + rng.uniform(0.01, 0.9) * float((hi - lo) / n)
    sol = solve(layers, budget, max_cells=2_000_000)
    want_loss, want_bits = _brute(layers, budget)
    assert sol.exact
    assert sol.predicted_loss == pytest.approx(want_loss, abs=1e-12)
    assert _bits(sol, layers) == want_bits and want_bits <= Fraction(budget) * n


def test_tie_break_prefers_earlier_option():
    layer = Layer("a", 16, (Option("x", 4.5, 1.0), Option("y", 4.5, 1.0), Option("z", 8.0, 1.0)))
    assert solve([layer], 16.0).choice == {"a": "x"}
    # The greedy shortcut cannot apply here (c's best does not fit), so this is the DP's tie-break.
    b = Layer("b", 16, (Option("p", 4.0, 2.0), Option("q", 8.0, 0.0)))
    c = Layer("c", 16, (Option("m", 4.0, 5.0), Option("n", 16.0, 0.0)))
    assert solve([layer, b, c], (72 + 128 + 64) / 48).choice == {"a": "x", "b": "q", "c": "m"}
    # Two least-loss assignments (loss 1) at 12 and 10 bits/weight-sum: the cheaper one wins.
    d = Layer("d", 16, (Option("d4", 4.0, 1.0), Option("d8", 8.0, 0.0)))
    e = Layer("e", 16, (Option("e4", 4.0, 1.0), Option("e6", 6.0, 0.0)))
    sol = solve([d, e], 6.0)
    assert sol.choice == {"d": "d4", "e": "e6"} and sol.bits_per_weight == 5.0


def test_deterministic():
    layers = _instance(random.Random(11))
    n = sum(lay.numel for lay in layers)
    budget = sum(lay.options[0].bits_per_weight * lay.numel for lay in layers) / n
    assert solve(layers, budget) == solve(layers, budget)


def test_infeasible_budget_names_minimum():
    layers = [Layer("a", 100, (Option("nvfp4", 4.5, 1.0), Option("fp8", 8.0, 0.1))),
              Layer("b", 300, (Option("mxfp4", 4.25, 2.0), Option("bf16", 16.0, 0.0)))]
    with pytest.raises(RecipeError, match="below the minimum feasible budget 4.3125 bits/weight") as err:
        solve(layers, 4.3)
    least = float(re.search(r"at least ([0-9.]+)", str(err.value)).group(1))
    assert solve(layers, least).choice == {"a": "nvfp4", "b": "mxfp4"}
    with pytest.raises(RecipeError, match="below the minimum"):
        pareto_front(layers, [16.0, 4.0])


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf")])
def test_bad_budget(budget):
    with pytest.raises(RecipeError, match="positive number of bits"):
        solve([Layer("a", 16, (Option("x", 4.5, 1.0),))], budget)


def test_bad_layers():
    opt = (Option("x", 4.5, 1.0),)
    for layers, match in [([], "no layers"), ([Layer("a", 16, opt), Layer("a", 16, opt)], "twice"),
                          ([Layer("a", 0, opt)], "numel=0"), ([Layer("a", 16, ())], "no candidate"),
                          ([Layer("a", 16, (Option("x", 0.0, 1.0),))], "bits_per_weight=0.0"),
                          ([Layer("a", 16, (Option("x", 4.0, float("nan")),))], "loss=nan")]:
        with pytest.raises(InputError, match=match):
            solve(layers, 8.0)


def test_coarse_grid_keeps_budget():
    """A non-dyadic bits value (5.1) makes the exact grid huge: costs round up, budget holds."""
    rng = random.Random(5)
    layers = [Layer(f"l{j}", rng.choice(NUMELS), (Option("a", 4.5, rng.uniform(1, 2)),
                                                   Option("b", 5.1, rng.uniform(0.5, 1)),
                                                   Option("c", 8.0, rng.uniform(0, 0.5)))) for j in range(5)]
    n = sum(lay.numel for lay in layers)
    for budget in (4.8, 5.5, 6.7):
        sol = solve(layers, budget, max_cells=10_000)
        assert not sol.exact
        assert _bits(sol, layers) <= Fraction(budget) * n
        assert sol.predicted_loss >= _brute(layers, budget)[0] - 1e-12


def test_lagrangian_hull_vertices_are_optimal_and_convex():
    layers = _instance(random.Random(3)) + _instance(random.Random(4))
    layers = [Layer(f"{i}", lay.numel, lay.options) for i, lay in enumerate(layers)]
    hull = lagrangian_hull(layers)
    bits = [h.bits for h in hull]
    losses = [h.predicted_loss for h in hull]
    assert bits == sorted(bits) and losses == sorted(losses, reverse=True)
    assert hull[0].bits == sum(min(o.bits_per_weight for o in lay.options) * lay.numel for lay in layers)
    for a, b, c in zip(hull, hull[1:], hull[2:]):  # slopes flatten: convex from below
        s1 = (a.predicted_loss - b.predicted_loss) / (b.bits - a.bits)
        s2 = (b.predicted_loss - c.predicted_loss) / (c.bits - b.bits)
        assert s1 >= s2 - 1e-12
    for h in hull:  # bits_per_weight is a rounded float: nudge it up to cover the exact bits
        exact = solve(layers, math.nextafter(h.bits_per_weight, math.inf))
        assert exact.predicted_loss == pytest.approx(h.predicted_loss, abs=1e-9)
    least = min(sum(o.loss for o in combo) for combo in itertools.product(*(l.options for l in layers[:3])))
    assert hull[-1].predicted_loss <= least + sum(min(o.loss for o in l.options) for l in layers[3:]) + 1e-9


def test_pareto_front_monotone():
    layers = _instance(random.Random(8)) + [Layer("extra", 4096, (Option("n", 4.5, 3.0), Option("f", 8.0, 0.2)))]
    budgets = [16.0, 8.0, 6.0, 5.0, 4.5]
    lo = sum(min(o.bits_per_weight for o in lay.options) * lay.numel for lay in layers)
    budgets = [b for b in budgets if b * sum(lay.numel for lay in layers) >= lo]
    front = pareto_front(layers, budgets)
    assert [p.budget_bits_per_weight for p in front] == budgets
    losses = [p.predicted_loss for p in front]
    assert losses == sorted(losses)  # budgets fall, loss can only rise
    assert all(p.bits_per_weight <= p.budget_bits_per_weight for p in front)
    assert front[0].to_dict()["choice"] == front[0].choice and front[0].measured_loss is None


def _weight_and_fisher(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 40, generator=g), torch.rand(24, 40, generator=g)


def test_layer_sensitivity_matches_definition():
    w, f = _weight_and_fisher()
    q = get_format("nvfp4").fake_quantize(w, importance=f)
    want = float(((w - q).double().square() * f.double()).sum())
    assert layer_sensitivity(w, f, "nvfp4") == pytest.approx(want, rel=1e-12)
    assert want > 0
    fp8 = layer_sensitivity(w, f, "fp8_e4m3")
    assert 0 < fp8 < want
    per_channel = layer_sensitivity(w, f[0], "nvfp4")
    assert per_channel == pytest.approx(float(((w - q).double().square() * f[0].double()).sum()), rel=1e-12)
    assert layer_sensitivity(w, torch.zeros_like(f), "nvfp4") == 0.0
    assert layer_sensitivity(w, f, "fp32") == 0.0
    assert 0 < layer_sensitivity(w, f, "bf16") < fp8


_EXPECTED = ["nvfp4", "fp8_e4m3", "mxfp4", "mxfp8", "fp8_e5m2", "int", "fgmp", "bcq", "bf16"]


@pytest.mark.parametrize("name", sorted(set(_EXPECTED) | set(list_formats())))
def test_layer_sensitivity_every_registered_format(name):
    if name not in list_formats():
        pytest.fail(f"format {name} is not registered (registered: {list_formats()})")
    w, f = _weight_and_fisher(1)
    val = layer_sensitivity(w, f, name)
    assert math.isfinite(val) and val > 0


def test_layer_sensitivity_spec_and_errors():
    w, f = _weight_and_fisher(2)
    plain = layer_sensitivity(w, f, "nvfp4")
    searched = layer_sensitivity(w, f, "nvfp4", {"scale_search": 3})
    assert searched < plain  # the importance-weighted scale search can only help the weighted error
    with pytest.raises(InputError, match="does not fit a weight"):
        layer_sensitivity(w, f[:, :3], "nvfp4")
    with pytest.raises(LpcError, match="unknown format"):
        layer_sensitivity(w, f, "fp3")
    with pytest.raises(LpcError, match="unknown key"):
        layer_sensitivity(w, f, "nvfp4", {"blocksize": 8})


def _png_pixels(path):
    from matplotlib.image import imread
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-12:]
    assert b"Software" not in data and b"tIME" not in data  # nothing that varies between runs
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # something was drawn
    return data


def test_plot_pareto_writes_deterministic_png(tmp_path):
    from lpc.pipeline.artifact.plots import plot_pareto
    layers = [Layer("a", 256, (Option("nvfp4", 4.5, 2.0), Option("fp8", 8.0, 0.5))),
              Layer("b", 512, (Option("nvfp4", 4.5, 1.0), Option("fp8", 8.0, 0.1), Option("bf16", 16.0, 0.0)))]
    front = [dataclasses.replace(p, measured_loss=p.predicted_loss * 1.1)
             for p in pareto_front(layers, [4.5, 6.0, 8.0, 12.0])]
    a = plot_pareto(front, tmp_path / "sub" / "a.png")
    b = plot_pareto(front + [{"bits_per_weight": 16.0, "predicted_loss": 0.0}], tmp_path / "b.png")
    again = plot_pareto(front, tmp_path / "c.png")
    assert _png_pixels(a) == _png_pixels(again) and _png_pixels(b) != _png_pixels(a)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "b.png", "c.png", "sub"]
    with pytest.raises(InputError, match="no points"):
        plot_pareto([], tmp_path / "x.png")
    with pytest.raises(InputError, match="no 'predicted_loss'"):
        plot_pareto([{"bits_per_weight": 4.5}], tmp_path / "x.png")
