"""fisher_statistics against per-sample autograd on a tiny random Llama."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from lpc.pipeline.errors import InputError
from lpc.pipeline.calibration.fisher import fisher_statistics


@pytest.fixture(scope="module")
def tiny_llama(make_llama):
    model = make_llama(vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.no_grad():  # bigger weights than the default init: gradients far from zero
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model


def _targets(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 9), generator=g), torch.randint(0, 64, (1, 6), generator=g),
            torch.randint(0, 64, (12,), generator=g)]


def _reference(model, batches, targets):
    """Per sample: autograd.grad of its mean next-token loss w.r.t. each weight, squared; dL/dx of
    each Linear captured by a full backward hook (grad_input[0])."""
    names = list(targets)
    weights = [targets[n].weight for n in names]
    wsum = {n: torch.zeros_like(targets[n].weight) for n in names}
    asum = {n: torch.zeros(targets[n].in_features) for n in names}
    grads_x: dict[str, torch.Tensor] = {}
    handles = [targets[n].register_full_backward_hook(
        lambda m, gin, gout, n=n: grads_x.__setitem__(n, gin[0])) for n in names]
    samples = tokens = 0
    for batch in batches:
        batch = batch.reshape(-1, batch.shape[-1])
        for row in batch:
            ids = row.unsqueeze(0)
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
            # The embedding table is among the inputs so every Linear's dL/dx is needed.
            grads = torch.autograd.grad(loss, weights + [model.model.embed_tokens.weight])
            for n, g in zip(names, grads):
                wsum[n] += g.square()
                asum[n] += grads_x[n].reshape(-1, grads_x[n].shape[-1]).square().sum(0)
            samples += 1
            tokens += ids.shape[1] - 1
    for h in handles:
        h.remove()
    return {n: (wsum[n] / samples, asum[n] / tokens) for n in names}, samples, tokens


@pytest.mark.parametrize("checkpointing", [True, False])
def test_matches_per_sample_autograd(tiny_llama, checkpointing):
    targets = _targets(tiny_llama)
    ref, samples, tokens = _reference(tiny_llama, _batches(), targets)
    got = fisher_statistics(tiny_llama, _batches(), targets, checkpointing=checkpointing)
    assert set(got) == set(targets) and len(targets) == 14
    for name, (wf, af) in ref.items():
        assert got[name]["count"] == samples == 4
        assert got[name]["tokens"] == tokens == 8 + 8 + 5 + 11
        assert got[name]["weight_fisher"].dtype == torch.float32
        assert got[name]["weight_fisher"].shape == targets[name].weight.shape
        assert got[name]["act_fisher"].shape == (targets[name].in_features,)
        assert wf.abs().max() > 0 and af.abs().max() > 0
        torch.testing.assert_close(got[name]["weight_fisher"], wf, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(got[name]["act_fisher"], af, rtol=1e-4, atol=1e-12)


def test_mean_of_squares_not_square_of_mean(tiny_llama):
    """Two different samples: the Fisher must exceed the squared mean gradient somewhere."""
    targets = {"q": tiny_llama.model.layers[0].self_attn.q_proj}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]])
    got = fisher_statistics(tiny_llama, [ids], targets)["q"]["weight_fisher"]
    w = targets["q"].weight
    gs = [torch.autograd.grad(F.cross_entropy(tiny_llama(input_ids=r[None]).logits[0, :-1], r[1:]), w)[0]
          for r in ids]
    sq_mean = ((gs[0] + gs[1]) / 2).square()
    assert (got - sq_mean).max() > 1e-3 * got.max()
    torch.testing.assert_close(got, (gs[0].square() + gs[1].square()) / 2, rtol=1e-4, atol=1e-12)


def test_restores_model_state(tiny_llama):
    model = tiny_llama
    model.model.layers[1].train()  # an unusual mixed mode must come back as it was
    model.lm_head.weight.requires_grad_(False)
    targets = _targets(model)
    prior_grad = torch.full_like(targets["model.layers.0.mlp.up_proj"].weight, 3.0)
    targets["model.layers.0.mlp.up_proj"].weight.grad = prior_grad
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ckpt = {n: getattr(m, "gradient_checkpointing", None) for n, m in model.named_modules()}
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    try:
        fisher_statistics(model, _batches()[:1], targets)
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert {n: getattr(m, "gradient_checkpointing", None) for n, m in model.named_modules()} == ckpt
        assert all("_gradient_checkpointing_func" not in m.__dict__ for m in model.modules())
        assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
        assert targets["model.layers.0.mlp.up_proj"].weight.grad is prior_grad
        assert all(p.grad is None for n, p in model.named_parameters() if "up_proj" not in n or "layers.1" in n)
        assert all(not m._forward_hooks for m in model.modules())
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
                   if getattr(p, "_post_accumulate_grad_hooks", None) is not None)
    finally:
        model.eval()
        model.lm_head.weight.requires_grad_(True)
        targets["model.layers.0.mlp.up_proj"].weight.grad = None


def test_tied_weight_counted_once_per_target(tiny_llama):
    lin = tiny_llama.model.layers[0].mlp.down_proj
    got = fisher_statistics(tiny_llama, _batches()[:1], {"a": lin, "b": lin})
    single = fisher_statistics(tiny_llama, _batches()[:1], {"a": lin})
    torch.testing.assert_close(got["a"]["weight_fisher"], single["a"]["weight_fisher"])
    torch.testing.assert_close(got["b"]["weight_fisher"], single["a"]["weight_fisher"])


def test_progress_and_short_rows(tiny_llama):
    calls = []
    targets = {"o": tiny_llama.model.layers[1].self_attn.o_proj}
    out = fisher_statistics(tiny_llama, [torch.tensor([[5]]), torch.tensor([[1, 2, 3]])], targets,
                            progress=lambda task, done, total: calls.append((task, done, total)))
    assert out["o"]["count"] == 1 and out["o"]["tokens"] == 2
    assert calls[0] == ("fisher", 0, 2) and calls[-1] == ("fisher", 2, 2)


@pytest.mark.parametrize("batches, match", [
    ([], "no sample"),
    ([torch.tensor([[1]])], "no sample"),
    ([torch.rand(1, 5)], "integer token-id"),
    ([torch.zeros(1, 2, 3, dtype=torch.long)], r"shape \(B, T\)"),
])
def test_bad_batches(tiny_llama, batches, match):
    targets = {"o": tiny_llama.model.layers[1].self_attn.o_proj}
    with pytest.raises(InputError, match=match):
        fisher_statistics(tiny_llama, batches, targets)


def test_bad_targets(tiny_llama):
    with pytest.raises(InputError, match="not an nn.Linear"):
        fisher_statistics(tiny_llama, _batches(), {"norm": tiny_llama.model.norm})
    with pytest.raises(InputError, match="not a module of the given model"):
        fisher_statistics(tiny_llama, _batches(), {"x": torch.nn.Linear(4, 4)})
    with pytest.raises(InputError, match="no target"):
        fisher_statistics(tiny_llama, _batches(), {})


def test_checkpointing_is_used(tiny_llama, monkeypatch):
    import lpc.pipeline.calibration.fisher as fisher_mod
    calls = []
    real = fisher_mod.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(fisher_mod, "checkpoint", counting)
    fisher_statistics(tiny_llama, [torch.tensor([[1, 2, 3, 4]])], _targets(tiny_llama))
    assert calls == [False, False]  # two decoder layers, one sample
    calls.clear()
    fisher_statistics(tiny_llama, [torch.tensor([[1, 2, 3, 4]])], _targets(tiny_llama), checkpointing=False)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradient_squares_run_by_run_equal_the_whole_square(dtype, monkeypatch):
    """The CPU accumulation squares the gradient a run at a time (a short run here, and a length that is
    not a multiple of it): every accumulator of the group gets exactly acc + fp32(grad)^2."""
    import lpc.pipeline.calibration.fisher as fm

    monkeypatch.setattr(importlib.import_module("lpc.pipeline.sums"), "RUN", 100)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(37, 29, bias=False).to(dtype)
    grad = (torch.randn(29, 37, generator=g) * torch.exp(3 * torch.randn(29, 37, generator=g))).to(dtype)
    accs = [fm.FisherAccumulator(lin), fm.FisherAccumulator(lin)]
    start = torch.rand(29, 37, generator=g)
    accs[1].weight_sum.copy_(start)
    lin.weight.grad = grad.clone()
    fm._take_weight_grad(lin.weight, accs)
    assert lin.weight.grad is None
    assert torch.equal(accs[0].weight_sum, grad.to(torch.float32).square())
    assert torch.equal(accs[1].weight_sum, start + grad.to(torch.float32).square())


def test_activation_fisher_reads_this_linears_input_gradient_whether_or_not_the_input_requires_grad():
    """The input's gradient from this Linear alone (dL/dy @ W), not the sum over a shared input's uses: read
    in autograd's backward when the input requires grad, computed from dL/dy when it does not."""
    from lpc.pipeline.calibration.fisher import FisherAccumulator, fisher_hooks

    g = torch.Generator().manual_seed(3)
    a, b = torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(6, 5, bias=False)
    model = torch.nn.ModuleDict({"a": a, "b": b})
    x = torch.randn(2, 3, 6, generator=g)
    ca, cb = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 5, generator=g)
    want = {"a": (ca @ a.weight.detach()).square().sum((0, 1)), "b": (cb @ b.weight.detach()).square().sum((0, 1))}
    for needs_grad in (True, False):
        accs = {"a": FisherAccumulator(a), "b": FisherAccumulator(b)}
        inp = x.clone().requires_grad_(needs_grad)
        with fisher_hooks(model, {"a": a, "b": b}, accs), torch.enable_grad():
            loss = (a(inp) * ca).sum() + (b(inp) * cb).sum()  # both read one shared input
            loss.backward()
        for n in ("a", "b"):
            torch.testing.assert_close(accs[n].act_sum, want[n], rtol=1e-5, atol=1e-7)
        a.weight.grad = b.weight.grad = None
