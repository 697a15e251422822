"""Layer-wise tuned rounding (`quantize.method: tune`): a tuned layer reproduces the original layer better
than plain rounding, selection never returns worse on held-out samples, the streamed engine keeps one
layer resident and writes what the whole-model path writes, FGMP masks and scales survive, the artifact
loads and evaluates, and bad settings fail."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors import safe_open

from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.calibration.stats import capture_layer_inputs
from lpc.pipeline.errors import RecipeError
from lpc.pipeline.io.models import find_targets
from lpc.pipeline.io.streaming import resident_params
from lpc.pipeline.quantization.layers import layer_setups, plan_from_recipe
from lpc.pipeline.quantization.frozen import FrozenGrid, grid_quantizer
from lpc.pipeline.quantization.ste import fake_quantizer
from lpc.pipeline.quantization.tune import run_layer, tune_layer
from lpc.pipeline.stages import layerwise
from lpc.pipeline.stages.evaluate import evaluate_report
from lpc.recipes import load_recipe

SMALL = ["calibrate.samples=8", "calibrate.seq_len=16", "quantize.tune.steps=10", "quantize.tune.eval_every=5"]


class Settings:
    def __init__(self, **kw):
        base = dict(steps=16, lr=3e-3, eval_every=4, patience=2, val_fraction=0.25, samples_per_step=3)
        self.__dict__.update({**base, **kw})


@pytest.fixture(scope="module")
def one_layer(make_llama):
    """Decoder layer 0 of a tiny Llama, its targets and nvfp4 quantizers, inputs and original outputs."""
    model = make_llama(vocab_size=64, seed=3)
    layer = model.model.layers[0]
    targets = {n: m for n, m in find_targets(model, ["*"], ["lm_head"]).items() if n.startswith("model.layers.0.")}
    recipe = load_recipe("nvfp4", ["quantize.weights.spec.scale_search=0"])
    setups = layer_setups(targets, plan_from_recipe(recipe, list(targets)), None, recipe.quantize.fuse_groups)
    quantizers = {n: fake_quantizer(f, s, c, torch.float32) for n, (f, s, c) in setups.items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (1, 24), generator=gen) for _ in range(8)]
    with torch.no_grad():
        inputs = capture_layer_inputs(model, model.model.layers, batches, "cpu")
        wanted = [run_layer(layer, s).detach() for s in inputs]
    return model, layer, targets, quantizers, inputs, wanted


def _error(layer, targets, weights, inputs, wanted, idx):
    saved = {n: m.weight for n, m in targets.items()}
    try:
        for n, m in targets.items():
            m.weight = torch.nn.Parameter(weights[n], requires_grad=False)
        with torch.no_grad():
            num = sum(float((run_layer(layer, inputs[j]) - wanted[j]).square().sum()) for j in idx)
    finally:
        for n, m in targets.items():
            m.weight = saved[n]
    return num / sum(float(wanted[j].square().sum()) for j in idx)


def test_tuned_layer_reproduces_the_original_better_than_plain_rounding(one_layer):
    _, layer, targets, quantizers, inputs, wanted = one_layer
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    params = {n: m.weight for n, m in targets.items()}
    flags = [p.requires_grad for p in layer.parameters()]
    tuned, report = tune_layer(layer, targets, quantizers, inputs, wanted, Settings())
    plain = {n: quantizers[n](before[n]) for n in targets}
    rounded = {n: quantizers[n](tuned[n]) for n in targets}
    train, held = [0, 1, 2, 4, 5, 6], [3, 7]  # every 4th sample is held out (val_fraction 0.25)
    assert report["train_samples"] == 6 and report["val_samples"] == 2
    assert _error(layer, targets, rounded, inputs, wanted, train) < 0.8 * _error(layer, targets, plain, inputs, wanted, train)
    # the report's figures are the held-out errors of plain rounding and of what is returned
    assert report["error_start"] == pytest.approx(_error(layer, targets, plain, inputs, wanted, held), rel=1e-5)
    assert report["error_best"] == pytest.approx(_error(layer, targets, rounded, inputs, wanted, held), rel=1e-5)
    assert report["best_step"] > 0 and report["error_best"] < report["error_start"]
    for n, m in targets.items():  # the layer is left as it was
        assert m.weight is params[n] and torch.equal(m.weight, before[n])
        assert not hasattr(m, "parametrizations")
    assert [p.requires_grad for p in layer.parameters()] == flags and any(flags)


def test_a_diverging_layer_keeps_plain_rounding(one_layer):
    _, layer, targets, quantizers, inputs, wanted = one_layer
    tuned, report = tune_layer(layer, targets, quantizers, inputs, wanted, Settings(lr=50.0, steps=12))
    assert report["best_step"] == 0 and report["error_best"] == report["error_start"]
    assert report["steps"] == 8  # two measurements (steps 4 and 8) without improvement stop it
    for n, m in targets.items():
        assert torch.equal(tuned[n], m.weight.detach().float())


def _calibrated(tmp_path, model_dir, text, recipe):
    calib = tmp_path / "c"
    stages.calibrate(str(model_dir), str(text), calib, recipe)
    return calib


def test_streamed_tuning_keeps_one_layer_resident_and_equals_the_whole_model_path(tmp_path, build_llama, text_files,
                                                                                   monkeypatch):
    d = tmp_path / "m"
    build_llama(d, layers=3)
    recipe = load_recipe("nvfp4", ["quantize.method=tune", *SMALL])
    calib = _calibrated(tmp_path, d, text_files["txt"], recipe)
    seen, opened = [], {}
    materialize, open_streamed = layerwise.materialize, layerwise.open_streamed

    def spy(layer, prefix, store, device="cpu"):
        materialize(layer, prefix, store, device)
        seen.append(resident_params(opened["model"]))  # the whole model: embeddings released too

    def grab(*a):
        got = open_streamed(*a)
        opened["model"] = got[0]
        return got
    monkeypatch.setattr(layerwise, "materialize", spy)
    monkeypatch.setattr(importlib.import_module("lpc.pipeline.stages.quantize"), "open_streamed", grab)
    streamed = stages.quantize(str(d), recipe, tmp_path / "s", calib=calib)
    one = sum(p.numel() for p in opened["model"].model.layers[0].parameters())
    assert len(seen) == 3 and max(seen) == one
    report = streamed.manifest["summary"]["tune"]
    assert report["decoder_layers"] == 3 and report["improved_layers"] >= 1
    assert report["mean_error_final"] < report["mean_error_start"]
    monkeypatch.setattr(importlib.import_module("lpc.pipeline.stages.quantize"), "open_streamed", lambda *a: None)
    whole = stages.quantize(str(d), recipe, tmp_path / "w", calib=calib)
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "w" / "model.safetensors").read_bytes()
    plain = stages.quantize(str(d), load_recipe("nvfp4", SMALL), tmp_path / "r", calib=calib)
    assert plain.manifest["files"]["model.safetensors"] != streamed.manifest["files"]["model.safetensors"]


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.parametrize("recipe", ["fgmp_nvfp4a16", "fgmp_nvfp4"])
def test_fgmp_masks_and_scales_survive_tuning_and_the_artifact_evaluates(tmp_path, tiny_model_dir, text_files, recipe):
    # a few short sequences: selected on the training samples so that tuning surely moves some weights
    r = load_recipe(recipe, [*SMALL, "quantize.tune.val_fraction=0"])  # the FGMP recipes tune layer by layer
    assert r.quantize.method == "tune"
    calib = _calibrated(tmp_path, tiny_model_dir, text_files["txt"], r)
    stages.allocate(calib, r, tmp_path / "a", model=str(tiny_model_dir))
    tuned = stages.quantize(str(tiny_model_dir), r, tmp_path / "t", plan=tmp_path / "a")
    stages.quantize(str(tiny_model_dir), load_recipe(recipe, [*SMALL, "quantize.method=rtn"]), tmp_path / "p",
                    plan=tmp_path / "a")
    t, p = _tensors(tmp_path / "t"), _tensors(tmp_path / "p")
    masks = [k for k in t if k.endswith(".mask")]
    assert masks and all(torch.equal(t[k], p[k]) for k in masks)
    assert all(torch.equal(t[k], p[k]) for k in t if k.endswith(".global_scale"))
    # tuned weights are stored on the grid plain rounding chose: its block scales too, only the elements move
    scales = [k for k in t if k.endswith(".scale")]
    assert scales and all(torch.equal(t[k].view(torch.uint8), p[k].view(torch.uint8)) for k in scales)
    assert any(not torch.equal(t[k], p[k]) for k in t if k.endswith(".qdata") or k.endswith(".qdata_lo"))
    report = tuned.manifest["summary"]["tune"]
    assert report["mean_error_final"] < report["mean_error_start"]
    kept = [r for r in report["per_layer"] if r.get("kept") == "tuned"]
    assert kept  # what is stored is what the tuning measured: the held-out error does not move
    assert all(r["error_final"] == pytest.approx(r["error_best"], rel=1e-6) for r in kept)
    qconfig = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]
    assert ("activations" in qconfig) == (recipe == "fgmp_nvfp4")  # tuned through simulated FGMP activations
    ev = evaluate_report(str(tmp_path / "t"), baseline=str(tiny_model_dir), ppl=[str(text_files["txt"])], seq_len=32)
    kl = ev["kl_to_baseline"][str(text_files["txt"])]
    assert 0 < kl < 1.0 and ev["perplexity"][str(text_files["txt"])] > 1


def test_tuning_sees_the_simulated_activation_quantization(tmp_path, tiny_model_dir, text_files):
    w4a4 = load_recipe("nvfp4_w4a4", ["quantize.method=tune", *SMALL])
    calib = _calibrated(tmp_path, tiny_model_dir, text_files["txt"], w4a4)
    with_acts = stages.quantize(str(tiny_model_dir), w4a4, tmp_path / "a", calib=calib).manifest["summary"]["tune"]
    w4 = load_recipe("nvfp4", ["quantize.method=tune", *SMALL])
    weights_only = stages.quantize(str(tiny_model_dir), w4, tmp_path / "w", calib=calib).manifest["summary"]["tune"]
    # quantized inputs add error that the weights alone do not have; tuning still lowers it
    assert with_acts["mean_error_start"] > 1.5 * weights_only["mean_error_start"]
    assert with_acts["mean_error_final"] < with_acts["mean_error_start"]


def test_original_inputs_and_quantized_inputs_differ_after_the_first_layer(tmp_path, tiny_model_dir, text_files):
    base = load_recipe("nvfp4", ["quantize.method=tune", *SMALL])
    calib = _calibrated(tmp_path, tiny_model_dir, text_files["txt"], base)
    out = {}
    for mode in ("quantized", "original"):
        r = load_recipe("nvfp4", ["quantize.method=tune", *SMALL, f"quantize.tune.inputs={mode}"])
        out[mode] = stages.quantize(str(tiny_model_dir), r, tmp_path / mode, calib=calib).manifest["summary"]["tune"]
    q, o = out["quantized"]["per_layer"], out["original"]["per_layer"]
    assert q[0]["error_start"] == o[0]["error_start"]  # layer 0 sees the same embeddings either way
    assert q[1]["error_start"] > o[1]["error_start"]  # the earlier layer's rounding error reaches layer 1


def test_bad_tune_settings_and_a_missing_calibration_fail(tmp_path, tiny_model_dir):
    for bad in ("quantize.tune.lr=0", "quantize.tune.steps=-1", "quantize.tune.inputs=teacher",
                "quantize.tune.samples_per_step=0", "quantize.tune.stepz=3"):
        with pytest.raises(RecipeError):
            load_recipe("nvfp4", ["quantize.method=tune", bad])
    with pytest.raises(RecipeError, match="no calibration was given"):
        stages.quantize(str(tiny_model_dir), load_recipe("nvfp4", ["quantize.method=tune"]), tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("fmt_name, spec, k", [("nvfp4", {"clip": "sensitivity", "scale_search": 2}, 64),
                                               ("nvfp4", {}, 40), ("fgmp", {"clip": "sensitivity", "scale_search": 2}, 40),
                                               ("fgmp", {}, 64)])
def test_the_frozen_grid_rounds_the_original_weight_as_the_format_does(fmt_name, spec, k):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, k, generator=gen) * torch.rand(1, k, generator=gen)
    fmt = get_format(fmt_name)
    nb = (k + 15) // 16
    ctx = {"importance": torch.rand(k, generator=gen) + 0.1, "global_amax": w.abs().amax() * 1.1}
    if fmt_name == "fgmp":
        ctx["mask"] = torch.rand(24, nb, generator=gen) < 0.3
    if "clip" not in spec:
        ctx.pop("importance")
    for dtype in (torch.float32, torch.bfloat16):
        grid = grid_quantizer(fmt, spec, ctx, w, dtype)
        assert torch.equal(grid(w), fmt.fake_quantize(w.to(dtype), **spec, **ctx))
        moved = w + 0.05 * torch.randn(w.shape, generator=gen)  # other values round on the same grid
        q = grid(moved).float()
        assert not torch.equal(q, grid(w).float())
        assert (q - moved.to(dtype).float()).abs().max() <= (w.abs().max() + 0.3) / 6 * 1.1


@pytest.mark.parametrize("fmt_name, spec", [("nvfp4", {"clip": "sensitivity", "scale_search": 2}), ("nvfp4", {}),
                                            ("fgmp", {"clip": "sensitivity", "scale_search": 2}), ("fgmp", {})])
def test_a_weight_encoded_on_the_frozen_grid_is_what_the_grid_rounds_to(fmt_name, spec):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 40, generator=gen) * torch.rand(1, 40, generator=gen)
    fmt = get_format(fmt_name)
    ctx = {"importance": torch.rand(40, generator=gen) + 0.1} if "clip" in spec else {}
    if fmt_name == "fgmp":
        ctx["mask"] = torch.rand(24, 3, generator=gen) < 0.3
    for dtype in (torch.float32, torch.bfloat16):
        grid = grid_quantizer(fmt, spec, ctx, w, dtype)
        assert isinstance(grid, FrozenGrid)
        same = grid.encode(w)  # the original weight: exactly plain rounding, field for field
        assert same.meta() == grid.plain.meta() and same.data.keys() == grid.plain.data.keys()
        for key, t in grid.plain.data.items():
            assert torch.equal(same.data[key].view(torch.uint8), t.view(torch.uint8)), key
        for scale in (0.05, 3.0):  # moved weights, some saturating
            moved = w + scale * torch.randn(w.shape, generator=gen)
            q = grid.encode(moved)
            assert torch.equal(fmt.dequantize(q, dtype=dtype), grid(moved))
            assert not torch.equal(q.data["qdata"], grid.plain.data["qdata"])
            for key in set(q.data) - {"qdata", "qdata_hi"}:  # the grid: scales, mask, global scale
                assert torch.equal(q.data[key].view(torch.uint8), grid.plain.data[key].view(torch.uint8))
            assert q.storage_bits() == grid.plain.storage_bits()


def test_rotated_blocks_tune_through_the_formats_own_rounding():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    grid = grid_quantizer(get_format("nvfp4"), {"rotate": True}, {}, w, torch.float32)
    assert not isinstance(grid, FrozenGrid)  # its grid lives in the rotated basis
    assert torch.equal(grid(w), get_format("nvfp4").fake_quantize(w, rotate=True))


def test_a_stored_rounding_that_is_worse_than_plain_keeps_plain(one_layer):
    _, layer, targets, quantizers, inputs, wanted = one_layer
    # the stored rounding differs from the tuned one (a far coarser grid): tuning must not keep it
    coarse = {n: (lambda w: (w * 4).round() / 4) for n in targets}
    tuned, report = tune_layer(layer, targets, quantizers, inputs, wanted, Settings(), final=coarse)
    assert report["best_step"] > 0 and report["error_best"] < report["error_start"]
    assert report["error_final"] == report["error_start"] and report["kept"] == "plain rounding"
    for n, m in targets.items():
        assert torch.equal(tuned[n], m.weight.detach().float())


def test_the_stored_rounding_is_handed_back_only_when_kept(one_layer):
    """`rounded` receives final(tuned) when the tuned weights are kept (the caller reuses it instead of
    rounding again) and nothing when plain rounding wins."""
    _, layer, targets, quantizers, inputs, wanted = one_layer
    rounded: dict = {}
    tuned, report = tune_layer(layer, targets, quantizers, inputs, wanted, Settings(), final=quantizers,
                               rounded=rounded)
    assert report["kept"] == "tuned" and sorted(rounded) == sorted(targets)
    for n in targets:
        assert torch.equal(rounded[n], quantizers[n](tuned[n]))
    coarse = {n: (lambda w: (w * 4).round() / 4) for n in targets}
    rounded = {}
    tune_layer(layer, targets, quantizers, inputs, wanted, Settings(), final=coarse, rounded=rounded)
    assert rounded == {}


@pytest.mark.parametrize("fmt_name", ["nvfp4", "fgmp"])
def test_the_frozen_grid_rounds_the_same_compiled_and_eager(fmt_name, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(40, 72, generator=gen) * torch.rand(1, 72, generator=gen) * 3
    ctx = {"mask": torch.rand(40, 5, generator=gen) < 0.4} if fmt_name == "fgmp" else {}
    moved = [w + s * torch.randn(w.shape, generator=gen) for s in (0.0, 0.05, 2.0)]  # 2.0 saturates some
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LPC_COMPILE", flag)
        grid = grid_quantizer(get_format(fmt_name), {}, ctx, w, torch.bfloat16)
        outs[flag] = [grid(v) for v in moved]
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    if fmt_name == "fgmp":  # both kinds of block were exercised
        assert ctx["mask"].any() and not ctx["mask"].all()


def test_summed_gradients_equal_autograds_bit_for_bit(one_layer, monkeypatch):
    """With the straight-through weights summing their own gradients (a short run at a time here), the
    gradient handed to the optimizer equals autograd's accumulation over the same samples, bit for bit."""
    from lpc.pipeline.quantization.ste import quantized_weights
    from lpc.pipeline.quantization.tune import _backward

    monkeypatch.setattr(importlib.import_module("lpc.pipeline.sums"), "RUN", 100)
    _, layer, targets, quantizers, inputs, wanted = one_layer
    got = []
    for accumulate in (False, True):
        with quantized_weights(targets, quantizers) as latents, torch.enable_grad():
            mods = {n: targets[n].parametrizations.weight[0] for n in latents}
            for m in mods.values():
                m.accumulate = accumulate
            _backward(layer, inputs, wanted, [0, 1, 2], "cpu")
            got.append({n: (mods[n].take_grad() if accumulate else p.grad).clone() for n, p in latents.items()})
            assert all(m.take_grad() is None for m in mods.values()) or not accumulate  # handed over once
    for n in got[0]:
        assert torch.equal(got[0][n], got[1][n]), n
