"""The compiled fast path equals the eager reference bit for bit; failures fall back to eager."""
from __future__ import annotations

import logging

import pytest
import torch

from lpc.formats import codebooks as cbk
from lpc.formats import fast, get_format, kernels
from lpc.formats.numerics import blocks_of


def _input(shape: tuple[int, int], dtype: torch.dtype, heavy) -> torch.Tensor:
    """Heavy-tailed rows at very different scales, with zero rows, -0.0 and tiny values."""
    x = heavy(shape, 9) * torch.logspace(-6, 3, shape[0]).unsqueeze(1)
    x[1] = 0.0
    x[2, ::3] = -0.0
    x[3] = 1e-30
    return x.to(dtype)


def _codebook():
    return cbk.fit_codebooks([torch.randn(64, 128, generator=torch.Generator().manual_seed(0))]).codebook


CASES = [
    ("nvfp4", lambda x: (blocks_of(x, 16), torch.tensor(0.37)), kernels.nvfp4, torch.bfloat16),
    ("nvfp4_fake", lambda x: (blocks_of(x, 16), torch.tensor(0.37)), kernels.nvfp4_fake, torch.float16),
    ("fgmp", lambda x: (blocks_of(x, 16), torch.tensor(2.5e-3)), kernels.fgmp, torch.float32),
    ("scaled_rows", lambda x: (blocks_of(x, 16), 448.0, torch.float8_e4m3fn), kernels.scaled_rows, torch.float16),
    ("scaled_given", lambda x: (blocks_of(x, 16), torch.tensor(0.01), 57344.0, torch.float8_e5m2),
     kernels.scaled_given, torch.float32),
    ("mxfp4", lambda x: (blocks_of(x, 32),), kernels.mxfp4, torch.float32),
    ("mxfp8", lambda x: (blocks_of(x, 32),), kernels.mxfp8, torch.bfloat16),
    ("int_two_level", lambda x: (blocks_of(x, 16), 4, 6), kernels.int_two_level, torch.float32),
    ("int_float_scale", lambda x: (blocks_of(x, 32), torch.tensor(3e-3), 8, True), kernels.int_float_scale,
     torch.float32),
    ("bcq", lambda x: (blocks_of(x, 64), torch.tensor(2e-3), *cbk.tables(_codebook())), cbk.kernel, torch.bfloat16),
]


@pytest.mark.parametrize("name, make_args, kernel, dtype", CASES, ids=[c[0] for c in CASES])
def test_compiled_kernel_equals_eager(name, make_args, kernel, dtype, heavy, same_bits):
    if not fast.enabled():
        pytest.skip("LPC_COMPILE=0 disables compiled kernels here")
    outs = {}
    for shape in [(37, 192), (5, 64)]:  # two shapes: the second runs the dynamic-shape kernel
        args = make_args(_input(shape, dtype, heavy))
        compiled = fast.run(kernel, *args, compiled=True)
        assert fast._compiled.get(kernel) is not None, f"{name} did not compile"
        eager = fast.run_eager(kernel, *args, chunk=64)  # several chunks
        assert len(compiled) == len(eager)
        for c, e in zip(compiled, eager):
            assert same_bits(c, e), name
        outs[shape] = eager


def test_quantize_takes_the_fast_path_for_large_tensors(monkeypatch, heavy, same_bits):
    x = heavy((64, 96), 2).to(torch.bfloat16)
    monkeypatch.setattr(fast, "MIN_NUMEL", 1 << 40)
    eager = get_format("nvfp4").quantize(x)
    monkeypatch.setattr(fast, "MIN_NUMEL", 0)
    fast_q = get_format("nvfp4").quantize(x)
    if fast.enabled():
        assert fast._compiled.get(kernels.nvfp4) is not None
    for k in eager.data:
        assert same_bits(eager.data[k], fast_q.data[k])


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_nvfp4_fake_quantize_is_quantize_then_dequantize(compiled, monkeypatch, heavy, same_bits):
    """The fused NVFP4 fake quantization (amax scales) equals the packing path bit for bit: padded
    rows, a calibrated global amax that clips, bf16 and fp32 inputs, zero and tiny rows; specs it
    does not cover (scale search, clipping, rotation) still take the packing path."""
    monkeypatch.setenv("LPC_COMPILE", compiled)
    fmt = get_format("nvfp4")
    calls = []
    real = kernels.nvfp4_fake
    monkeypatch.setattr(kernels, "nvfp4_fake", lambda *a: calls.append(1) or real(*a))
    for shape, dtype, ctx in [((37, 200), torch.bfloat16, {}), ((4, 3, 48), torch.float32, {"global_amax": 0.05}),
                              ((7, 16), torch.float16, {"global_amax": torch.tensor(3.0)})]:
        x = _input((shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1]), dtype, heavy).reshape(shape)
        want = fmt.dequantize(fmt.quantize(x, **ctx), dtype=x.dtype)
        got = fmt.fake_quantize(x, **ctx)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert same_bits(got, want), (shape, dtype)
    assert len(calls) == 3
    x = heavy((8, 64), 5)
    for spec in ({"scale_search": 1}, {"clip": "mse"}, {"rotate": True}):
        assert same_bits(fmt.fake_quantize(x, **spec), fmt.dequantize(fmt.quantize(x, **spec)))
    assert len(calls) == 3
    with pytest.raises(Exception, match="NaN or inf"):
        fmt.fake_quantize(torch.tensor([[float("nan")] * 16]))


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    def kernel(xb):  # a fresh kernel, so no real kernel's cache is touched
        return (xb * 2,)

    monkeypatch.setattr(torch, "compile", boom)
    with caplog.at_level(logging.WARNING, logger="lpc.formats.fast"):
        out = fast.run(kernel, torch.ones(3, 2, 4), compiled=True)
    assert torch.equal(out[0], torch.full((3, 2, 4), 2.0))
    assert "no C++ compiler" in caplog.text and fast._compiled[kernel] is None
    fast._compiled.pop(kernel)


def test_eager_chunks_match_one_piece(heavy):
    xb = blocks_of(heavy((50, 48), 3), 16)
    whole = kernels.nvfp4(xb, torch.tensor(0.1))
    chunked = fast.run_eager(kernels.nvfp4, xb, torch.tensor(0.1), chunk=100)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_plain_paths_equal_the_generic_numerics(heavy, same_bits):
    """The fused kernels compute what the generic code (numerics + clip machinery) computes."""
    from lpc.formats import fgmp, int as vs_int, mx, nvfp4
    from lpc.formats.numerics import e2m1_encode, pack_nibbles, pad_last

    x = heavy((9, 80), 4) * 0.3
    rows = pad_last(x, 16).view(9, 5, 16)
    s2 = nvfp4.global_scale_for(x.abs().amax())
    sb = nvfp4.block_scales(rows, s2)
    q = get_format("nvfp4").quantize(x)
    assert torch.equal(q.data["qdata"], pack_nibbles(e2m1_encode(rows / (sb * s2).unsqueeze(-1))).view(9, -1))
    assert torch.equal(q.data["scale"].float(), sb)

    xb32 = pad_last(x, 32).view(9, 3, 32)
    _, e = torch.frexp(xb32.abs().amax(-1))
    exp = (e - 1 - 2).clamp(-127, 127)
    assert torch.equal(get_format("mxfp4").quantize(x).data["scale"], (exp + 127).to(torch.uint8))
    assert torch.equal(mx.exp2(exp), torch.ldexp(torch.ones(exp.shape), exp))

    mask = torch.rand(9, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    spec = get_format("fgmp").spec()
    generic = fgmp._encode_general(x, mask, s2, spec, None, tuple(x.shape))
    fast_q = get_format("fgmp").quantize(x, mask=mask)
    for k, v in generic.items():
        assert same_bits(fast_q.data[k], v), k

    for fmt_spec in ({}, {"scale_format": "e4m3"}, {"scale_format": "bf16", "bits": 8}):
        s = get_format("int").spec(**fmt_spec)
        qmax = 2 ** (s.bits - 1) - 1
        unit = vs_int._units(x, s, qmax, None)
        xb = pad_last(x, 16).view(9, 5, 16)
        stored = vs_int._choose_stored(xb, unit if unit.numel() > 1 else unit.reshape(()), s, qmax, None)
        fast_int = get_format("int").quantize(x, **fmt_spec)
        step = vs_int._load_scales(fast_int.data, s, 9, 5)
        ref = stored * (unit if unit.numel() > 1 else unit.reshape(()))
        assert torch.equal(step, ref)
        codes = vs_int._round(xb / ref.unsqueeze(-1), qmax).float() * ref.unsqueeze(-1)
        assert torch.equal(get_format("int").dequantize(fast_int), codes.view(9, 80))
