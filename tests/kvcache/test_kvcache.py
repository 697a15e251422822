"""KV cache quantization: the quantize-on-write cache, KIVI grouping, calibration of K/V absmax after
RoPE, and the artifact path (calibrate -> quantize -> load -> eval) on the tiny Llama."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.evaluation.perplexity import perplexity
from lpc.pipeline.kvcache import KVSpec, QuantizedKVCache, attach_kv_quantization, kv_statistics
from lpc.recipes import RecipeError, load_recipe


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(model):
    return torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))


def _raw_kv(model, ids):
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_lossless_cache_equals_the_plain_cache(model, ids):
    n = model.config.num_hidden_layers
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        same = model(input_ids=ids, cache=QuantizedKVCache([(None, None)] * n), use_cache=True).logits
        bf = model.to(torch.bfloat16)
        try:
            ref = bf(input_ids=ids).logits
            spec = KVSpec("bf16", {})
            lossless = bf(input_ids=ids, cache=QuantizedKVCache([(spec, spec)] * n), use_cache=True).logits
        finally:
            model.to(torch.float32)
    assert torch.equal(plain, same) and torch.equal(ref, lossless)


@pytest.mark.parametrize("fmt, spec", [("fp8_e4m3", {"granularity": "tensor"}), ("nvfp4", {}),
                                       ("int", {"bits": 4, "vector": 16})])
def test_stored_states_are_the_formats_fake_quantize(model, ids, fmt, spec):
    raw = _raw_kv(model, ids)
    amax = torch.tensor(3.0)
    specs = [(KVSpec(fmt, spec, amax), KVSpec(fmt, spec, amax))] * model.config.num_hidden_layers
    cache = QuantizedKVCache(specs)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    f = get_format(fmt)
    (k, v), first = raw[0], cache.layers[0]  # later layers see the quantized cache of earlier ones
    assert torch.equal(first.keys, f.fake_quantize(k, **spec, global_amax=amax))
    assert torch.equal(first.values, f.fake_quantize(v, **spec, global_amax=amax))
    assert not torch.equal(first.keys, k)
    for layer in cache.layers:  # every stored state lies on the format's grid
        assert torch.equal(layer.keys, f.fake_quantize(layer.keys, **spec, global_amax=amax))


def test_kivi_keys_keep_a_full_precision_tail_until_the_group_fills():
    spec = KVSpec("int", {"bits": 4, "vector": 16}, per_channel=True, group=32)
    cache = QuantizedKVCache([(spec, None)])
    k = torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(1))
    v = torch.randn(1, 2, 40, 8)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(keys[..., 32:, :], k[..., 32:, :]) and torch.equal(values, v)
    expect = get_format("int").fake_quantize(k[..., :32, :].transpose(-1, -2).reshape(1, 2, 8, 1, 32),
                                             bits=4, vector=16).reshape(1, 2, 8, 32).transpose(-1, -2)
    assert torch.equal(keys[..., :32, :], expect)
    more = torch.randn(1, 2, 24, 8)
    keys, _ = cache.update(more, torch.randn(1, 2, 24, 8), 0)
    assert keys.shape[-2] == 64 and not torch.equal(keys[..., 32:40, :], k[..., 32:, :])


def test_calibrated_amax_is_the_post_rope_absmax(model, ids):
    stats = kv_statistics(model, [ids[:1], ids[1:]])
    raw = _raw_kv(model, ids)
    assert sorted(stats) == list(range(model.config.num_hidden_layers))
    for i, (k, v) in enumerate(raw):
        assert torch.allclose(stats[i]["k_amax"], k.abs().amax(dim=(0, 2, 3)))
        assert torch.allclose(stats[i]["v_amax"], v.abs().amax(dim=(0, 2, 3)))
        assert stats[i]["k_amax"].shape == (model.config.num_key_value_heads,)


def test_hook_gives_every_call_and_generation_a_quantized_cache(model, ids):
    spec = KVSpec("nvfp4", {})
    handle = attach_kv_quantization(model, [(spec, spec)] * model.config.num_hidden_layers)
    try:
        with torch.no_grad():
            quant = model(input_ids=ids).logits
            gen = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False,
                                 return_dict_in_generate=True)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert not torch.equal(quant, plain) and (quant - plain).abs().max() < 1.0
    assert isinstance(gen.past_key_values, QuantizedKVCache) and gen.sequences.shape[1] == 14


def test_artifact_carries_the_kv_scheme(tmp_path, tiny_model_dir, text_files):
    recipe = load_recipe("fp8", ["calibrate.samples=4", "calibrate.seq_len=32",
                                 "kv_cache={format: nvfp4, scales: head}"])
    calib = stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", recipe).out
    assert (calib / "kv_stats.safetensors").is_file()
    quant = stages.quantize(str(tiny_model_dir), recipe, tmp_path / "q", calib=calib).out
    qconfig = json.loads((quant / "config.json").read_text())["quantization_config"]
    assert qconfig["kv_cache"]["format"] == "nvfp4" and qconfig["kv_cache"]["scales"] == "head"
    with_kv, tok = load(quant)
    plain = stages.quantize(str(tiny_model_dir), load_recipe("fp8"), tmp_path / "p").out
    without, _ = load(plain)
    ppl_kv = perplexity(with_kv, tok, text_files["jsonl"], seq_len=32)["perplexity"]
    ppl = perplexity(without, tok, text_files["jsonl"], seq_len=32)["perplexity"]
    assert ppl_kv != ppl and abs(ppl_kv / ppl - 1) < 0.5
    with pytest.raises(Exception, match="needs a calibration"):
        stages.quantize(str(tiny_model_dir), recipe, tmp_path / "x")


def test_bad_kv_sections_are_refused():
    with pytest.raises(RecipeError, match="kv_cache"):
        load_recipe("fp8", ["kv_cache={format: nvfp5}"])
    with pytest.raises(RecipeError, match="scales"):
        load_recipe("fp8", ["kv_cache={format: fp8_e4m3, scales: row}"])


def test_per_token_scales_quantize_each_token_with_its_own_amax():
    x = torch.randn(1, 2, 5, 32, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 30.0])[:, None, None]
    got = KVSpec("nvfp4", {}, per_token=True).fake(x)
    f = get_format("nvfp4")
    for h in range(2):
        for t in range(5):
            row = x[0, h, t]
            assert torch.allclose(got[0, h, t], f.fake_quantize(row, global_amax=row.abs().amax()), rtol=1e-6, atol=1e-7)
    assert KVSpec("nvfp4", {}, per_token=True).bits_per_element(64) == 4.5 + 0.5


def test_sink_tokens_stay_in_full_precision_across_writes():
    spec = KVSpec("int", {"bits": 4, "vector": 16}, sinks=3)
    cache = QuantizedKVCache([(spec, spec)])
    k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    cache.update(k, v, 0)  # two tokens: both sinks
    k2, v2 = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    keys, values = cache.update(k2, v2, 0)
    assert torch.equal(keys[..., :2, :], k) and torch.equal(values[..., 2:3, :], v2[..., :1, :])
    assert torch.equal(keys[..., 3:, :], spec.fake(k2[..., 1:, :])) and not torch.equal(keys[..., 3:, :], k2[..., 1:, :])


def test_kv_specs_carry_headroom_token_scales_and_sinks():
    from lpc.pipeline.kvcache import KV_PREFIX, kv_specs

    t = {f"{KV_PREFIX}0.k_amax": torch.tensor([2.0, 5.0]), f"{KV_PREFIX}0.v_amax": torch.tensor([1.0, 3.0])}
    k, v = kv_specs({"format": "fp8_e4m3", "scales": "tensor", "headroom": 2.0, "sinks": 1}, t, 1)[0]
    assert float(k.amax) == 10.0 and float(v.amax) == 6.0 and k.sinks == v.sinks == 1
    k, _ = kv_specs({"format": "nvfp4", "scales": "token"}, {}, 1)[0]  # per-token scales need no statistics
    assert k.per_token and k.amax is None
    x = torch.full((1, 1, 1, 16), 3.0)
    x[..., 0] = 7.0  # beyond a calibrated amax of 5: clipped without headroom, kept with it
    clipped = KVSpec("fp8_e4m3", {"granularity": "tensor"}, torch.tensor(5.0)).fake(x)
    kept = KVSpec("fp8_e4m3", {"granularity": "tensor"}, torch.tensor(10.0)).fake(x)
    assert float(clipped[..., 0]) == 5.0 and abs(float(kept[..., 0]) - 7.0) <= 7.0 / 16  # E4M3 rounding only


def test_rotated_states_are_the_format_grid_in_the_hadamard_basis():
    from lpc.formats.rotation import hadamard

    x = torch.randn(1, 2, 6, 64, generator=torch.Generator().manual_seed(4))
    x[..., 3] *= 25  # an outlier channel, as RoPE'd keys have
    h = hadamard(64)
    spec = KVSpec("nvfp4", {}, torch.tensor(float(x.abs().max())), rotate=True)
    got = spec.fake(x)
    plain = KVSpec("nvfp4", {}, torch.tensor(float(x.abs().max()))).fake(x @ h)
    assert torch.allclose(got @ h, plain, atol=1e-5)  # what is stored is NVFP4 of the rotated states
    lossless = KVSpec("bf16", {}, rotate=True).fake(x)
    assert torch.allclose(lossless, x, rtol=0, atol=0.25) and (lossless - x).abs().mean() < 0.02  # bf16 rounding only


def test_streamed_calibration_records_kv_in_its_layer_pass(tmp_path, tiny_model_dir, text_files, monkeypatch):
    """On a checkpoint that streams, the K/V statistics come from the layer-by-layer statistics pass (the
    model is never loaded whole) and equal a whole-model pass over the same sequences, samples included."""
    import importlib

    from safetensors.torch import load_file

    from lpc.pipeline.io.data import calibration_batches
    from lpc.pipeline.io.models import load_tokenizer

    calib_stage = importlib.import_module("lpc.pipeline.stages.calibrate")
    recipe = load_recipe("kv_fp8", ["calibrate.samples=3", "calibrate.seq_len=24"])
    whole = calib_stage.load_hf_model

    def refuse(*_a, **_k):
        raise AssertionError("the whole model was loaded for the K/V statistics")

    monkeypatch.setattr(calib_stage, "load_hf_model", refuse)
    calib = stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", recipe).out
    got = load_file(str(calib / "kv_stats.safetensors"))
    model = whole(str(tiny_model_dir))
    batches = calibration_batches(str(text_files["jsonl"]), load_tokenizer(str(tiny_model_dir)), 3, 24, model=model, seed=0)
    ref = kv_statistics(model, batches)
    assert len(ref) == model.config.num_hidden_layers
    for i, fields in ref.items():
        for name, t in fields.items():
            assert torch.equal(got[f"{i}.{name}"], t.float()), (i, name)
