"""LO-BCQ: codebook fitting, table encoding, shared codebooks, bits."""
from __future__ import annotations

import torch

from lpc.formats import get_format
from lpc.formats import codebooks as cbk


def test_fitting_never_increases_the_error(heavy):
    fit = cbk.fit_codebooks([heavy((64, 256), 1), heavy((32, 128), 2)], max_iters=40)
    for history in (fit.mse_fine, fit.mse):
        assert len(history) >= 2
        assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:])), history
    assert fit.mse_fine[-1] < fit.mse_fine[0] * 0.9  # it does learn
    assert fit.codebook.dtype == torch.int8 and fit.codebook.shape == (16, 16)
    assert (fit.codebook.diff(dim=-1) >= 0).all()  # rows sorted


def test_lloyd_step_alone_never_increases_the_error(heavy):
    u = cbk.normalize(heavy((32, 128), 4))
    book = cbk.initial_codebooks(u, 8)
    prev = None
    for _ in range(6):
        sel, idx, err = cbk.encode(u, *cbk.tables(book))
        total = float(err.double().sum())
        assert prev is None or total <= prev
        prev, book = total, cbk.lloyd_update(u, sel, idx, book)


def test_table_encoding_equals_brute_force(heavy):
    """Nearest entry by table equals argmin over all entries (ties to the lower entry) and the
    block's codebook is the first with least error, including duplicated codebooks and ties."""
    gen = torch.Generator().manual_seed(3)
    book = torch.randint(-32, 32, (16, 16), generator=gen).to(torch.int8).sort(-1).values
    book[5] = book[2]                                   # identical codebooks: ties everywhere
    book[7, 3:6] = book[7, 3]                           # duplicated entries
    u = torch.cat([heavy((500, 8), 5) * 12, torch.randint(-64, 64, (200, 8), generator=gen) / 2.0,
                   torch.full((1, 8), 40.0), torch.full((1, 8), -40.0)])
    sel, idx, err = cbk.encode(u, *cbk.tables(cbk.check_codebook(book, 16)))
    d = (u[:, None, :, None] - book.float()[None, :, None, :]).square()   # (N, Nc, 8, 16)
    near, near_idx = d.min(-1)
    b = near.sum(-1)
    assert torch.equal(sel, torch.argmin(torch.where(b <= b.min(-1, keepdim=True).values, 0, 1), -1))
    chosen = book.float()[sel.unsqueeze(-1), idx.long()]
    assert torch.equal(chosen, book.float()[sel.unsqueeze(-1), near_idx[torch.arange(len(u)), sel].long()])
    assert (sel != 5).all()                            # the duplicate of codebook 2 never wins


def test_shared_codebook_is_reused_and_stored(heavy):
    fmt = get_format("bcq")
    a, b = heavy((16, 128), 1), heavy((8, 64), 2)
    book = cbk.fit_codebooks([a, b]).codebook
    qa, qb = fmt.quantize(a, codebook=book), fmt.quantize(b, codebook=book)
    assert torch.equal(qa.data["codebook"], book) and torch.equal(qb.data["codebook"], book)
    own = fmt.quantize(a)  # fitted on a alone
    assert own.data["codebook"].shape == (16, 16)


def test_unsorted_codebook_is_stored_sorted(heavy):
    book = cbk.fit_codebooks([heavy((16, 128), 1)]).codebook
    shuffled = book[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    fmt = get_format("bcq")
    x = heavy((4, 128), 9)
    assert torch.equal(fmt.fake_quantize(x, codebook=shuffled), fmt.fake_quantize(x, codebook=book))


def test_bits_per_weight_nominal_and_stored(heavy):
    fmt = get_format("bcq")
    assert fmt.bits_per_weight() == 4.625 and fmt.bits_per_weight(codebooks=8) == 4.5
    x = heavy((256, 1024), 1)
    for nc in (8, 16):
        q = fmt.quantize(x, codebooks=nc)
        overhead = (q.data["codebook"].numel() * 8 + 32) / x.numel()  # codebook + global scale
        assert abs(q.bits_per_weight() - fmt.bits_per_weight(codebooks=nc) - overhead) < 1e-12


def test_codebook_sample_is_drawn_one_tensor_at_a_time_with_the_same_rows():
    """The fit's seeded sample of blocks equals sampling the concatenation of every normalized tensor, while
    normalizing one tensor at a time (no float32 copy of the whole model)."""
    from lpc.formats import codebooks as cb

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(64, 200, generator=g), torch.randn(3, 5, 130, generator=g), torch.randn(300, 64, generator=g) * 3]
    for n in (50, 1000, 10**6):  # a sample, and everything
        whole = cb._sample(torch.cat([cb.normalize(t) for t in ts]), n, 7)
        assert torch.equal(cb._sample_blocks(ts, n, 7), whole), n
    assert [cb._block_rows(t) for t in ts] == [cb.normalize(t).shape[0] for t in ts]


def test_lazy_weights_are_read_one_at_a_time_and_fit_the_same_codebook(heavy, monkeypatch):
    """`LazyWeight`s (shape known, tensor read on demand, as a streamed quantize reads the checkpoint) give
    the same codebook as the tensors themselves, each read once, one alive at a time."""
    ts = [heavy((64, 256), 1), heavy((32, 130), 2), heavy((48, 64), 3)]
    reads = []

    def reader(i):
        def load():
            reads.append(i)
            return ts[i].clone()
        return load

    lazy = [cbk.LazyWeight(tuple(t.shape), reader(i)) for i, t in enumerate(ts)]
    for max_blocks in (500, 1 << 16):  # a sample, and every block
        reads.clear()
        got = cbk.fit_codebooks(lazy, max_blocks=max_blocks, max_iters=10).codebook
        assert torch.equal(got, cbk.fit_codebooks(ts, max_blocks=max_blocks, max_iters=10).codebook)
        assert reads == [0, 1, 2]


def test_beyond_the_permutation_limit_the_sample_is_distinct_uniform_and_seeded(monkeypatch):
    """Above PERMUTE_MAX blocks the sample is drawn without a permutation of every block (memory of the
    sample only): n distinct rows of the concatenation, the same for the same seed, spread evenly."""
    monkeypatch.setattr(cbk, "PERMUTE_MAX", 100)
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(64, 200, generator=g), torch.randn(300, 64, generator=g) * 3]
    every = torch.cat([cbk.normalize(t) for t in ts])
    n = 1000
    got = cbk._sample_blocks(ts, n, 7)
    assert got.shape == (n, cbk.LB) and torch.equal(got, cbk._sample_blocks(ts, n, 7))
    assert not torch.equal(got, cbk._sample_blocks(ts, n, 8))
    picked = cbk._distinct(every.shape[0], n, torch.Generator().manual_seed(7))
    assert torch.equal(got, every[picked])  # those rows of the concatenation, in draw order
    assert picked.unique().numel() == n  # without replacement
    first = cbk._block_rows(ts[0])
    assert abs(float((picked < first).float().mean()) - first / every.shape[0]) < 0.06  # spread evenly
    idx = cbk._distinct(50, 50, torch.Generator().manual_seed(1))
    assert sorted(idx.tolist()) == list(range(50))  # all of them, when n == total
