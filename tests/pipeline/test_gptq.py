"""GPTQ's invariant: the stored (dequantized) values are exactly the values fed back in the loop."""
from __future__ import annotations

import pytest
import torch

from lpc.formats import get_format, list_formats
from lpc.pipeline.quantization import gptq

BLOCK_FORMATS = [n for n in list_formats() if get_format(n).block_width() is not None]
SPECS = [(n, {}) for n in BLOCK_FORMATS] + [
    ("int", {"scale_format": "e4m3"}), ("int", {"scale_format": "bf16"}), ("int", {"bits": 8, "vector": 32}),
    ("int", {"clip": "mse"}), ("nvfp4", {"scale_search": 2}), ("fgmp", {"high_fraction": 0.3}),
    ("mxfp4", {"clip": "mse"}),
]


def _problem(k: int = 100, out: int = 24, seed: int = 0):
    """A weight with outliers (so row and block scales matter) and a correlated X^T X / n."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=gen)
    w[torch.rand(out, k, generator=gen) < 0.02] *= 8
    x = torch.randn(256, k, generator=gen) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen))
    return w, x.T @ x / x.shape[0]


def test_every_block_format_is_covered():
    assert {"nvfp4", "fgmp", "mxfp4", "mxfp8", "bcq", "int"} <= set(BLOCK_FORMATS)


@pytest.mark.parametrize("name,spec", SPECS, ids=[f"{n}-{s}" for n, s in SPECS])
def test_gptq_stores_the_values_it_fed_back(monkeypatch, name, spec):
    fmt = get_format(name)
    fed: list[torch.Tensor] = []
    real = type(fmt).fake_quantize

    def recording(self, x, **kw):
        y = real(self, x, **kw)
        fed.append(y.detach().clone())
        return y

    monkeypatch.setattr(type(fmt), "fake_quantize", recording)
    w, cov = _problem()
    q = gptq.gptq_quantize(w, cov, name, dict(spec), {})
    monkeypatch.undo()
    fed_back = torch.cat(fed, dim=1)
    stored = fmt.dequantize(q)
    assert fed_back.shape == w.shape and len(fed) == -(-w.shape[1] // fmt.block_width(**spec))
    assert torch.equal(stored, fed_back), (stored - fed_back).abs().max()


def test_int_two_level_row_scale_is_the_whole_rows():
    """The default int4 (two-level scales) keeps one row scale gamma across all column groups."""
    w, cov = _problem()
    q = gptq.gptq_quantize(w, cov, "int", {}, {})
    plain = get_format("int").quantize(w)
    assert torch.equal(q.data["row_scale"], plain.data["row_scale"])


def test_group_width_comes_from_the_format():
    assert gptq.group_width("nvfp4", {}) == 16 and gptq.group_width("int", {"vector": 64}) == 64
    assert gptq.group_width("fp8_e4m3", {}) is None and gptq.group_width("bf16", {}) is None
