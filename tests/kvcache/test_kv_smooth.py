"""Key/value smoothing folded into the attention weights: power-of-two factors equal on RoPE pairs, the
unquantized model's logits bit-identical, exact smoothed statistics, a smaller FP8 KV error when key
channels are uneven, and the artifact -> compressed-tensors / modelopt path with the smoothed weights."""
from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file

from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.kvcache import KV_PREFIX, KVSpec, attach_kv_quantization, kv_specs, kv_stat_tensors, kv_statistics
from lpc.pipeline.kvcache.smooth import (apply_transforms, exponents, rope_partner, smoothed_stats, smoothing_plan,
                                         weight_transforms)
from lpc.recipes import load_recipe

CALIB = ["calibrate.samples=4", "calibrate.seq_len=24"]
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"


def test_rope_partners_are_rotate_half_pairs():
    assert rope_partner(8).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert rope_partner(8, rotary_dim=4).tolist() == [2, 3, 0, 1, 4, 5, 6, 7]  # unrotated channels alone
    with pytest.raises(InputError, match="rotary dimension 5"):
        rope_partner(8, 5)


def test_exponents_are_equal_on_pairs_and_flatten_to_the_median():
    a = torch.tensor([[1.0, 1.0, 16.0, 1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    e = exponents(a, 1.0, rope_partner(8))
    assert e[0, 2] == e[0, 6] == 4 and e[1, 1] == e[1, 5] == 0  # a pair takes its larger member
    assert e[0, 3] == e[0, 7] == 0  # a zero channel keeps its partner's factor (here 1)
    assert torch.equal(exponents(a, 0.5, rope_partner(8))[0, 2], torch.tensor(2, dtype=torch.int32))
    assert not exponents(a, 0.0).any()
    assert torch.ldexp(a, -e.float())[0].amax() <= 1.0  # the outlier pair is brought to the median


@pytest.fixture(scope="module")
def uneven(make_llama):
    """The tiny Llama (head_dim 16, 4 query heads over 2 KV heads) with key channels 800x apart whose
    queries compensate (every channel matters to q.k, as in trained models), and its statistics."""
    m = make_llama(vocab_size=64, layers=2, head_dim=16)
    with torch.no_grad():
        for layer in m.model.layers:
            att = layer.self_attn
            att.k_proj.weight[[3, 11]] *= 40.0  # a RoPE pair of KV head 0 ...
            att.q_proj.weight[[3, 11, 19, 27]] /= 40.0  # ... read by query heads 0 and 1
            att.k_proj.weight[[20, 28]] *= 0.05  # channels 4 and 12 of KV head 1 ...
            att.q_proj.weight[[36, 44, 52, 60]] *= 20.0  # ... read by query heads 2 and 3
            att.v_proj.weight[5] *= 30.0
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    stats = {KV_PREFIX + k: v for k, v in kv_stat_tensors(kv_statistics(m, [ids])).items()}
    return m, ids, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothing_is_exact_and_its_statistics_are_the_smoothed_models(uneven, dtype):
    import copy

    m0, ids, stats = uneven
    m = copy.deepcopy(m0).to(dtype)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    plan = smoothing_plan(stats, m.config, keys=1.0, values=1.0)
    assert apply_transforms(m, weight_transforms(m, plan)) == 2 * 4  # q/k/v/o weights (no biases) x 2 layers
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref)  # bit-identical
    if dtype == torch.float32:
        measured = {KV_PREFIX + k: v for k, v in kv_stat_tensors(kv_statistics(m, [ids])).items()}
        predicted = smoothed_stats(stats, plan)
        for key, t in measured.items():
            assert torch.equal(predicted[key], t), key
        assert float(predicted[f"{KV_PREFIX}0.k_amax"].amax()) < 0.2 * float(stats[f"{KV_PREFIX}0.k_amax"].amax())


def test_smoothing_lowers_the_nvfp4_kv_error_of_uneven_keys(uneven):
    """Outlier channels set the NVFP4 block scales; flattened keys keep the small channels."""
    import copy

    m, ids, stats = uneven
    with torch.no_grad():
        ref = m(input_ids=ids).logits

    def kv_error(model, st) -> float:
        specs = kv_specs({"format": "nvfp4", "scales": "tensor"}, st, model.config.num_hidden_layers)
        handle = attach_kv_quantization(model, [(k, None) for k, _ in specs])  # keys only
        try:
            with torch.no_grad():
                return float((model(input_ids=ids).logits - ref).pow(2).mean())
        finally:
            handle.remove()

    smooth = copy.deepcopy(m)
    plan = smoothing_plan(stats, m.config, keys=1.0)
    apply_transforms(smooth, weight_transforms(smooth, plan))
    assert kv_error(smooth, smoothed_stats(stats, plan)) < 0.5 * kv_error(m, stats)


def test_models_that_normalize_keys_are_refused(family_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(family_dir("qwen3")))
    with pytest.raises(InputError, match="k_norm"):
        weight_transforms(m, {0: (torch.zeros(m.config.num_key_value_heads, m.config.head_dim, dtype=torch.int32),
                                  None)})


def test_missing_channel_statistics_are_an_input_error(uneven):
    m, _, stats = uneven
    with pytest.raises(InputError, match="per-channel"):
        smoothing_plan({k: v for k, v in stats.items() if "chan" not in k}, m.config, keys=1.0)


# ---- the artifact and its engine exports ---------------------------------------------------------

@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory, build_llama):
    """The aligned tiny Llama (head_dim 8) on disk with a key channel pair 30x the rest, values likewise."""
    path = tmp_path_factory.mktemp("uneven-llama")
    model = build_llama(path, intermediate=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[[1, 5]] *= 30.0  # a RoPE pair of KV head 0
            layer.self_attn.v_proj.weight[2] *= 30.0
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory, uneven_dir, text_files):
    d = tmp_path_factory.mktemp("kv-smooth")
    recipe = load_recipe("kv_fp8", CALIB + ["kv_cache.smooth=true", "kv_cache.smooth_values=1.0"])
    stages.calibrate(str(uneven_dir), str(text_files["jsonl"]), d / "calib", recipe)
    stages.quantize(str(uneven_dir), recipe, d / "q", calib=d / "calib")
    for fmt in ("compressed-tensors", "modelopt"):
        stages.export(d / "q", d / fmt, fmt)
    return d


def weight(tensors: dict[str, torch.Tensor], linear: str) -> torch.Tensor:
    """A Linear's weight in an lpc artifact: bf16 'quantization' keeps it as `qdata`."""
    w = tensors[f"{linear}.weight"]
    return w if w.numel() else tensors[f"{linear}.qdata"]


def test_the_artifact_holds_smoothed_weights_and_the_same_function(smoothed, uneven_dir):
    from transformers import AutoModelForCausalLM

    orig = load_file(str(uneven_dir / "model.safetensors"))
    art = load_file(str(smoothed / "q" / "model.safetensors"))
    e = art[f"{KV_PREFIX}0.k_smooth_log2"]
    assert e.dtype == torch.int32 and e.shape == (2, 8) and e[0, 1] == e[0, 5] > 3 and e[1].abs().max() <= 1
    s = torch.ldexp(torch.ones(e.shape), e.float()).reshape(-1, 1)
    key = "model.layers.0.self_attn.k_proj"
    assert torch.equal(weight(art, key), (orig[f"{key}.weight"].float() / s).to(torch.bfloat16))
    unsmoothed = stages.quantize(str(uneven_dir), load_recipe("kv_fp8", CALIB + ["kv_cache.smooth=false"]), smoothed / "u",
                                 calib=smoothed / "calib").out
    plain, tok = load(smoothed / "q", activations=False)  # the smoothed weights, unquantized cache
    base, _ = load(unsmoothed, activations=False)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, base(ids).logits)  # bit-identical


@pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_engine_exports_carry_the_smoothed_weights_and_scales(smoothed, fmt):
    art = load_file(str(smoothed / "q" / "model.safetensors"))
    out = load_file(str(smoothed / fmt / "model.safetensors"))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"model.layers.1.self_attn.{proj}"
        assert torch.equal(out[f"{key}.weight"], weight(art, key))
    name = "model.layers.1.self_attn.k_scale" if fmt == "compressed-tensors" else "model.layers.1.self_attn.k_proj.k_scale"
    assert float(out[name].reshape(())) == float(art[f"{KV_PREFIX}1.k_amax"].amax() / 448)
    if fmt == "compressed-tensors":
        lpc_model, tok = load(smoothed / "q")
        ct_model, _ = load(smoothed / fmt)
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.equal(ct_model(ids).logits, lpc_model(ids).logits)


def test_smoothing_with_compensation_is_refused(tmp_path, aligned_dir, text_files):
    recipe = load_recipe("kv_fp8", CALIB + ["kv_cache.smooth=true", "compensate={method: svd, rank: 2}"])
    stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    with pytest.raises(RecipeError, match="compensate"):
        stages.quantize(str(aligned_dir), recipe, tmp_path / "q", calib=tmp_path / "calib")
    assert not (tmp_path / "q").exists()
