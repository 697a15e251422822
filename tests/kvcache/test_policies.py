"""KV cache policies under a byte budget (uniform quantization, StreamingLLM, H2O, ThinKV) on the tiny
Llama: exact budgets, the full cache at 100%, which tokens eviction keeps (ThinKV's own behaviour:
test_thinkv.py)."""
from __future__ import annotations

import pytest
import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.decode import decode, use_eager_attention
from lpc.pipeline.kvcache.levels import compress, kivi_scale_bytes, token_bytes
from lpc.pipeline.kvcache.policy import POLICIES, PolicyCache, make_policy

CASES = [("streaming", {}), ("h2o", {}), ("thinkv", {}), ("uniform", {"level": "fp8"}),
         ("uniform", {"level": "nvfp4"}), ("uniform", {"level": "int4"}), ("uniform", {"level": "int2"})]


@pytest.fixture(scope="module")
def model(make_llama):
    m = make_llama(vocab_size=64, layers=2, head_dim=16, max_position_embeddings=512)
    use_eager_attention(m)
    return m


@pytest.fixture(scope="module")
def seq():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (8,), generator=g).tolist(), torch.randint(0, 64, (140,), generator=g).tolist()


def test_every_policy_is_registered():
    make_policy("thinkv", 0.5)  # importing through make_policy registers them all
    assert {"streaming", "h2o", "thinkv", "uniform"} <= set(POLICIES.names())


@pytest.mark.parametrize("name, opts", CASES)
@pytest.mark.parametrize("budget", [0.05, 0.15, 0.4])
def test_every_step_holds_at_most_the_budget(model, seq, name, opts, budget):
    prompt, cont = seq
    pol = make_policy(name, budget, **opts)
    r = decode(model, prompt, pol, capacity=len(prompt) + len(cont), steps=len(cont), forced=cont)
    total = pol.budget_bytes * model.config.num_hidden_layers
    assert 0.6 * total < r.peak_bytes <= total  # within the budget, and the budget is used
    assert r.held_tokens[-1] < len(prompt) + len(cont) or name == "uniform"


@pytest.mark.parametrize("name", ["thinkv", "h2o"])
def test_chunked_teacher_forcing_holds_the_budget_between_forwards(model, seq, name):
    prompt, cont = seq
    pol = make_policy(name, 0.15)
    one = decode(model, prompt, make_policy(name, 0.15), len(prompt) + len(cont), len(cont), forced=cont)
    r = decode(model, prompt, pol, len(prompt) + len(cont), len(cont), forced=cont, chunk=8)
    assert r.peak_bytes <= pol.budget_bytes * model.config.num_hidden_layers
    assert len(r.held_tokens) == 1 + (len(cont) - 1 + 7) // 8 and r.tokens == one.tokens == cont


def test_streaming_bytes_are_tokens_times_bf16_plus_position():
    pol = make_policy("streaming", 0.2)
    cache = PolicyCache(pol, 2)
    pol.setup(2, 16, 148)
    for _ in range(3):
        cache.layers[0].update(torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16))
        pol.enforce(cache.layers[0], 0)
    held = cache.layers[0].held()
    assert pol.held_bytes(cache.layers[0]) == held * (token_bytes("bf16", 2, 16) + 4) <= pol.budget_bytes
    assert (held + 1) * (token_bytes("bf16", 2, 16) + 4) > pol.budget_bytes  # no byte left unused for a token


@pytest.mark.parametrize("name, opts", CASES)
@pytest.mark.parametrize("chunk", [1, 5])
def test_a_full_budget_is_the_full_cache(model, seq, name, opts, chunk):
    prompt, cont = seq
    r = decode(model, prompt, make_policy(name, 1.0, **opts), capacity=len(prompt) + len(cont),
               steps=len(cont), forced=cont, keep_logprobs=True, chunk=chunk)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt + cont])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    assert torch.allclose(r.logprobs, ref, atol=1e-5) and r.held_tokens[-1] == len(prompt) + len(cont) - 1


def test_streaming_keeps_the_sinks_and_the_recent_window(model, seq):
    prompt, cont = seq
    pol = make_policy("streaming", 0.1, sinks=4)
    cache = run_cache(model, pol, prompt + cont[:100])
    for layer in cache.layers:
        pos = layer.pos.tolist()
        n = len(pos)
        assert pos[:4] == [0, 1, 2, 3] and pos[4:] == list(range(108 - (n - 4), 108))


def test_h2o_keeps_the_recent_window_and_the_heavy_hitters():
    pol = make_policy("h2o", 0.1, recent=0.5)
    pol.setup(1, 16, 100)  # budget 10 tokens of bf16: (64*10) bytes / (64 + 8) -> 8 affordable
    cache = PolicyCache(pol, 1)
    layer = cache.layers[0]
    layer.update(torch.randn(1, 1, 30, 16), torch.randn(1, 1, 30, 16))
    layer.score = torch.zeros(30)
    layer.score[[3, 11, 17, 20]] = torch.tensor([5.0, 9.0, 7.0, 1.0])
    pol.enforce(layer, 0)
    assert layer.pos.tolist() == [3, 11, 17, 20, 26, 27, 28, 29]


def run_cache(model, pol, ids):
    from lpc.pipeline.kvcache.decode import new_cache

    cache = new_cache(model, pol, len(ids))
    with torch.no_grad():
        for i, t in enumerate(ids):
            out = model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[i]]), cache_position=torch.tensor([i]),
                        past_key_values=cache, use_cache=True, output_attentions=pol.needs_attention)
            cache.end_step(out.attentions if pol.needs_attention else None)
    return cache


def test_levels_scale_bytes_and_grids():
    k, v = torch.randn(2, 40, 64), torch.randn(2, 40, 64)
    fk, fv, scales = compress("int2", k, v)
    assert scales == kivi_scale_bytes(2, 40, 64) == 4 * 2 * (2 * 64 + 40 * 2)
    # 4 levels per group: keys per channel over 32 tokens, values per token over 32 channels
    assert fk[0, :32, 5].unique().numel() <= 4 and fv[1, 7, 32:].unique().numel() <= 4
    assert fk[0, 0, :32].unique().numel() > 4  # ... and not along the other axis
    fk8, _, s8 = compress("fp8", k, v)
    assert s8 == 2 * 4 * 2 * 40 and (fk8 - k).abs().max() <= k.abs().amax() / 16
    _, _, s4 = compress("nvfp4", k, v)
    assert s4 == 2 * 4 * 2 * 40 + 2 * 2 * 40 * 4


def test_bad_policy_input_is_refused():
    with pytest.raises(InputError, match="unknown KV cache policy 'lru'"):
        make_policy("lru", 0.1)
    with pytest.raises(InputError, match="budget"):
        make_policy("h2o", 0)
    with pytest.raises(InputError, match="precision level"):
        make_policy("uniform", 0.1, level="int3")
    with pytest.raises(InputError, match="thresholds"):
        make_policy("thinkv", 0.1, thresholds=(0.9, 0.1))
    with pytest.raises(InputError, match="ladder"):
        make_policy("thinkv", 0.1, ladder=["int4", "fp8"])
    with pytest.raises(InputError, match="option"):
        make_policy("streaming", 0.1, window=3)
