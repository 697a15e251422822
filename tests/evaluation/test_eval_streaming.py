"""Evaluation cost: KL and perplexity streamed in bounded logit blocks give the whole-batch figures,
and lm-eval's batched log-likelihoods (the batch size `lpc eval --tasks` uses) equal unbatched ones."""
from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lpc.pipeline.evaluation.perplexity as ppl_mod  # noqa: E402
from lpc.pipeline.evaluation.perplexity import (_sub_batches, kl_divergence, perplexity,  # noqa: E402
                                                token_windows)

TEXT = ("Once upon a time there was a little dog named Max. Max liked to run in the park and play "
        "with his red ball. One day the ball rolled into the pond and Max was sad. ") * 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_builder, make_llama):
    """(tokenizer, model, perturbed copy, text file): windows of 48 tokens, the last one shorter."""
    folder = tmp_path_factory.mktemp("stream")
    tok = tokenizer_builder(folder / "tok")
    model = make_llama(len(tok), intermediate=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = folder / "text.txt"
    path.write_text(TEXT)
    return tok, model, other, path


def _whole_batch_kl(model, baseline, seqs, batch_size):
    """The former computation: one forward of the whole batch, each row's full fp32 log-softmax."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    parts = [0.0] * len(seqs)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            q = ppl_mod._batch_logits(model, [seqs[i] for i in batch])
            p = ppl_mod._batch_logits(baseline, [seqs[i] for i in batch])
            for k, i in enumerate(batch):
                lp = torch.log_softmax(p[k, :len(seqs[i]) - 1].float(), -1)
                lq = torch.log_softmax(q[k, :len(seqs[i]) - 1].float(), -1)
                parts[i] = float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
    return math.fsum(parts) / sum(len(s) - 1 for s in seqs)


def test_sub_batches_keep_each_block_within_the_budget():
    lengths = [10, 10, 8, 3, 2]
    groups = _sub_batches(lengths, vocab=4, budget=80)  # 2 rows of 10 x 4 = 80 fit, 3 do not
    assert groups == [[0, 1], [2, 3], [4]]
    assert all(len(g) * lengths[g[0]] * 4 <= 80 for g in groups)
    assert _sub_batches(lengths, vocab=4, budget=1) == [[0], [1], [2], [3], [4]]  # over budget: one row each
    assert _sub_batches(lengths, vocab=4, budget=10**9) == [[0, 1, 2, 3, 4]]


def test_streamed_kl_equals_the_whole_batch_kl(setup, monkeypatch):
    tok, model, other, path = setup
    seqs = token_windows(tok, path, 48)
    assert len(seqs) >= 4 and len(seqs[-1]) < 48  # several windows, a shorter last one
    want = _whole_batch_kl(other, model, seqs, batch_size=3)
    assert want > 0
    default = kl_divergence(other, model, tok, path, seq_len=48, batch_size=3)["kl"]
    monkeypatch.setattr(ppl_mod, "POSITION_CHUNK", 5)  # each row's KL summed over several position chunks
    streamed = kl_divergence(other, model, tok, path, seq_len=48, batch_size=3, logit_budget=1)["kl"]
    assert default == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert streamed == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert kl_divergence(model, model, tok, path, seq_len=48, batch_size=3, logit_budget=1)["kl"] == 0.0


def test_streamed_perplexity_equals_the_whole_batch_one(setup):
    tok, model, _, path = setup
    whole = perplexity(model, tok, path, seq_len=48, batch_size=8, logit_budget=10**9)
    streamed = perplexity(model, tok, path, seq_len=48, batch_size=8, logit_budget=1)
    assert streamed["tokens"] == whole["tokens"]
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_lm_eval_batched_loglikelihoods_equal_unbatched(setup):
    """lpc runs lm-eval's HFLM with batch_size 8; its per-request log-likelihoods and greedy flags
    are those of batch_size 1 (requests of different lengths, so batches are padded)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok, model, _, _ = setup
    pairs = [("Max liked to run", " in the park"), ("One day the ball", " rolled into the pond and Max was sad."),
             ("Once", " upon a time"), ("The dog named Max liked his red", " ball"),
             ("Max was", " sad"), ("In the park Max played with", " his red ball every day.")] * 2

    def run(batch_size):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=128)
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
        return lm.loglikelihood(reqs, disable_tqdm=True)

    one, eight = run(1), run(8)
    assert len(one) == len(eight) == len(pairs)
    assert all(math.isfinite(a[0]) and a[0] < 0 for a in one)
    for (ll1, g1), (ll8, g8) in zip(one, eight):
        assert ll8 == pytest.approx(ll1, rel=1e-5, abs=1e-5)
        assert g8 == g1


def test_bench_protocol_scores_like_lpc_eval(setup, monkeypatch):
    """bench/_protocol.py (the peers' evaluator, no lpc import) gives lpc eval's perplexity and KL,
    also when its logits are streamed one row at a time."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import _protocol

    tok, model, other, path = setup
    seqs = token_windows(tok, path, 48)
    want_kl = kl_divergence(other, model, tok, path, seq_len=48, batch_size=3)["kl"]
    want_ppl = perplexity(other, tok, path, seq_len=48, batch_size=3)["perplexity"]
    monkeypatch.setattr(_protocol, "LOGIT_BUDGET", 1)
    monkeypatch.setattr(_protocol, "POSITION_CHUNK", 7)
    assert _protocol._sub_batches([48, 48, 30], 10**3) == [[0], [1], [2]]  # one row per block
    got = _protocol.score(other, seqs, baseline=model, batch_size=3)
    assert got["predictions"] == sum(len(s) - 1 for s in seqs)
    assert got["kl_to_original"] == pytest.approx(want_kl, rel=1e-6)
    assert got["perplexity"] == pytest.approx(want_ppl, rel=1e-6)
