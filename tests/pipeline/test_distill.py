"""Distillation-tuned rounding: it lowers the KL to the original, the artifact is what was tuned,
selection never returns something worse, the model is left untouched, and bad input fails."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lpc.pipeline import stages
from lpc.pipeline.quantization.distill import fake_quantizer
from lpc.pipeline.quantization.actquant import attach_activation_quant
from lpc.pipeline.quantization.distill import distill_weights
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.io.models import find_targets, load_hf_model
from lpc.pipeline.quantization.layers import layer_setups, plan_from_recipe, quantize_layers
from lpc.recipes import load_recipe

STEPS = 12


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model = load_hf_model(tiny_model_dir)
    targets = find_targets(model, ["*"], ["lm_head"])
    recipe = load_recipe("nvfp4", ["quantize.weights.spec.scale_search=0"])
    plan = plan_from_recipe(recipe, list(targets))
    setups = layer_setups(targets, plan, None, recipe.quantize.fuse_groups)
    quantizers = {n: fake_quantizer(f, s, c, torch.float32) for n, (f, s, c) in setups.items()}
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(3, vocab, (1, 24), generator=gen) for _ in range(8)]
    return model, targets, plan, quantizers, batches


def _kl(model, batches, teacher):
    total = 0.0
    with torch.no_grad():
        for b, t in zip(batches, teacher):
            q = F.log_softmax(model(input_ids=b).logits.float(), -1)
            total += float((t.exp() * (t - q)).sum(-1).mean())
    return total / len(batches)


def _teacher(model, batches):
    with torch.no_grad():
        return [F.log_softmax(model(input_ids=b).logits.float(), -1) for b in batches]


def test_tuning_lowers_the_kl_and_leaves_the_model_as_it_was(setup):
    model, targets, _, quantizers, batches = setup
    params = {n: m.weight for n, m in targets.items()}
    values = {n: p.detach().clone() for n, p in params.items()}
    tuned, report = distill_weights(model, targets, quantizers, batches, steps=STEPS, lr=3e-3,
                                    eval_every=4, val_fraction=0.0)
    assert report["kl_best"] < 0.7 * report["kl_start"]
    assert report["best_step"] > 0 and report["selected_on"] == "training sequences"
    assert any(not torch.equal(tuned[n], values[n]) for n in targets)
    for n, m in targets.items():
        assert m.weight is params[n] and torch.equal(m.weight, values[n])
        assert not hasattr(m, "parametrizations") or "weight" not in m.parametrizations
    assert not any(p.requires_grad for p in model.parameters())


def test_the_artifact_holds_exactly_the_tuned_quantization(setup):
    model, targets, plan, quantizers, batches = setup
    teacher = _teacher(model, batches)
    tuned, report = distill_weights(model, targets, quantizers, batches, steps=8, lr=3e-3,
                                    eval_every=4, val_fraction=0.0)
    qt, _ = quantize_layers(targets, plan, fuse=load_recipe("nvfp4").quantize.fuse_groups, weights=tuned)
    saved = {n: m.weight.detach().clone() for n, m in targets.items()}
    try:
        for n, m in targets.items():
            from lpc.formats import get_format
            deq = get_format(plan[n]["format"]).dequantize(qt[n])
            assert torch.equal(deq, quantizers[n](tuned[n]))
            m.weight.data.copy_(deq)
        # The selected KL is the KL of the model the artifact holds.
        assert _kl(model, batches, teacher) == pytest.approx(report["kl_best"], rel=1e-4)
    finally:
        for n, m in targets.items():
            m.weight.data.copy_(saved[n])


def test_padded_packs_equal_one_sequence_at_a_time(setup):
    model, targets, _, quantizers, _ = setup
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, model.config.vocab_size, (1, n), generator=gen) for n in (9, 30, 17, 30, 5, 22)]
    kls = [distill_weights(model, targets, quantizers, seqs, steps=0, val_fraction=0.0, batch_rows=rows)[1]["kl_start"]
           for rows in (1, 4)]
    assert kls[0] > 0 and kls[1] == pytest.approx(kls[0], rel=1e-3)  # fp32 padding noise on a KL of ~2e-5
    # token-weighted: the KL of each sequence on its own, weighted by its positions
    teacher = _teacher(model, seqs)
    saved = {n: m.weight.detach().clone() for n, m in targets.items()}
    try:
        for n, m in targets.items():
            m.weight.data.copy_(quantizers[n](saved[n]))
        with torch.no_grad():
            per = [float((t.exp() * (t - F.log_softmax(model(input_ids=b).logits.float(), -1))).sum())
                   for b, t in zip(seqs, teacher)]
    finally:
        for n, m in targets.items():
            m.weight.data.copy_(saved[n])
    assert kls[0] == pytest.approx(sum(per) / sum(b.shape[1] for b in seqs), rel=1e-4)


def test_a_diverging_run_keeps_plain_rounding(setup):
    model, targets, _, quantizers, batches = setup
    tuned, report = distill_weights(model, targets, quantizers, batches, steps=6, lr=50.0,
                                    eval_every=2, patience=2, val_fraction=0.25)
    assert report["best_step"] == 0 and report["kl_best"] == report["kl_start"]
    assert report["val_sequences"] == 2 and report["train_sequences"] == 6
    assert report["steps"] == 4  # two evaluations without improvement stop it
    for n, m in targets.items():
        assert torch.equal(tuned[n], m.weight.detach().float())


def test_straight_through_activation_quantization():
    lin = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    wrapper = torch.nn.Sequential()
    wrapper.add_module("lin", lin)
    plan = {"lin": {"format": "nvfp4"}}
    handles = attach_activation_quant(wrapper, plan, straight_through=True)
    y = wrapper(x)
    y.sum().backward()
    for h in handles:
        h.remove()
    assert torch.allclose(x.grad, lin.weight.detach().sum(0).expand(4, 32))
    from lpc.formats import get_format
    plain = F.linear(x, lin.weight)
    assert torch.allclose(y, F.linear(get_format("nvfp4").fake_quantize(x.detach()), lin.weight))
    assert not torch.allclose(y, plain)
    on = {"flag": False}
    handles = attach_activation_quant(wrapper, plan, straight_through=True, when=lambda: on["flag"])
    assert torch.equal(wrapper(x), plain)
    on["flag"] = True
    assert torch.equal(wrapper(x), y)
    for h in handles:
        h.remove()


def test_tuning_through_simulated_activation_quantization(setup):
    model, targets, _, quantizers, batches = setup
    acts = {n: {"format": "nvfp4"} for n in targets}
    _, report = distill_weights(model, targets, quantizers, batches, steps=8, lr=3e-3, eval_every=4,
                                val_fraction=0.0, activation_plan=acts)
    _, plain = distill_weights(model, targets, quantizers, batches, steps=0, val_fraction=0.0)
    # Quantized activations add error that weights alone do not have; tuning still lowers it.
    assert report["kl_start"] > plain["kl_start"]
    assert report["kl_best"] < 0.8 * report["kl_start"]
    assert not model.model.layers[0].mlp.up_proj._forward_pre_hooks


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps >= 0"),
    ({"lr": 0.0}, "lr > 0"),
    ({"val_fraction": 1.0}, "val_fraction < 1"),
    ({"batches": []}, "no calibration sequences"),
    ({"batches": [torch.zeros(1, 1, dtype=torch.long)]}, "T >= 2"),
    ({"quantizers": {}}, "no quantizer"),
])
def test_bad_arguments(setup, kwargs, message):
    model, targets, _, quantizers, batches = setup
    args = {"quantizers": quantizers, "batches": batches, **kwargs}
    with pytest.raises(InputError, match=message):
        distill_weights(model, targets, **args)


def test_stage_needs_a_calibration_and_is_deterministic(tmp_path, tiny_model_dir, text_files):
    recipe = load_recipe("nvfp4", ["quantize.method=distill", "quantize.distill.steps=4",
                                   "quantize.distill.eval_every=2", "calibrate.samples=6", "calibrate.seq_len=24"])
    with pytest.raises(RecipeError, match="no calibration was given"):
        stages.quantize(str(tiny_model_dir), recipe, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", recipe)
    digests = []
    for name in ("a", "b"):
        res = stages.quantize(str(tiny_model_dir), recipe, tmp_path / name, calib=tmp_path / "c")
        d = res.manifest["summary"]["distill"]
        assert d["val_sequences"] == 1 and d["train_sequences"] == 5
        assert d["kl_best"] <= d["kl_start"] and d["history"][0]["step"] == 0
        digests.append(res.manifest["files"]["model.safetensors"])
    assert digests[0] == digests[1]
    plain = stages.quantize(str(tiny_model_dir), load_recipe("nvfp4"), tmp_path / "rtn", calib=tmp_path / "c")
    assert plain.manifest["files"]["model.safetensors"] != digests[0]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["summary"]["distill"]["steps"] >= 2


def test_recipe_rejects_bad_distill_settings():
    for bad in ("quantize.distill.lr=0", "quantize.distill.steps=-2", "quantize.distill.stepz=3"):
        with pytest.raises(RecipeError):
            load_recipe("nvfp4", [bad])
    with pytest.raises(RecipeError, match="unknown quantize method 'adaround'.*distill.*gptq.*rtn"):
        stages.check_recipe_names(load_recipe("nvfp4", ["quantize.method=adaround"]))
