"""Simulated activation quantization: pre-hooks fake-quantize Linear inputs (W4A4, W8A8, FGMP)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lpc.formats import LpcError, get_format
from lpc.formats.fgmp import block_scores
from lpc.pipeline.quantization.actquant import attach_activation_quant
from lpc.pipeline.errors import InputError


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture
def x():
    return torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1)) * 2


def test_nvfp4_inputs_are_fake_quantized(net, x):
    plan = {"0": {"format": "nvfp4", "global_amax": 9.0}, "2": {"format": "nvfp4"}}
    handles = attach_activation_quant(net, plan)
    with torch.no_grad():
        got = net(x)
        nv = get_format("nvfp4")
        h = torch.relu(net[0](nv.fake_quantize(x, global_amax=9.0)))
        want = net[2](nv.fake_quantize(h))
    assert torch.equal(got, want)
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.equal(net(x), net[2](torch.relu(net[0](x))))


def test_w8a8_fp8_with_calibrated_scale(net, x):
    attach_activation_quant(net, {"0": {"format": "fp8_e4m3", "spec": {"granularity": "tensor"},
                                        "global_amax": 4.0}})
    with torch.no_grad():
        got = net[0](x)
        want = nn.functional.linear(
            get_format("fp8_e4m3").fake_quantize(x, granularity="tensor", global_amax=4.0),
            net[0].weight, net[0].bias)
    assert torch.equal(got, want)
    assert not torch.equal(got, nn.functional.linear(x, net[0].weight, net[0].bias))


def test_fgmp_blocks_follow_the_threshold(net, x):
    imp = torch.rand(40, generator=torch.Generator().manual_seed(2))
    scores = block_scores(x, imp, 9.0)
    threshold = float(scores.median())
    attach_activation_quant(net, {"0": {"format": "fgmp", "channel_importance": imp,
                                        "threshold": threshold, "global_amax": 9.0}})
    fg = get_format("fgmp")
    with torch.no_grad():
        got = net[0](x)
        xq = fg.dequantize(fg.quantize(x, mask=scores > threshold, global_amax=9.0))
        want = nn.functional.linear(xq, net[0].weight, net[0].bias)
    assert torch.equal(got, want)
    assert 0 < int((scores > threshold).sum()) < scores.numel()


@pytest.mark.parametrize("threshold, like", [(float("inf"), "nvfp4"), (-float("inf"), "fp8")])
def test_fgmp_extremes_are_all_low_or_all_high(net, x, threshold, like):
    attach_activation_quant(net, {"0": {"format": "fgmp", "channel_importance": torch.ones(40),
                                        "threshold": threshold, "global_amax": 9.0}})
    with torch.no_grad():
        got = net[0](x)
        if like == "nvfp4":
            xq = get_format("nvfp4").fake_quantize(x, global_amax=9.0)
        else:
            fg = get_format("fgmp")
            xq = fg.dequantize(fg.quantize(x, mask=torch.ones(15, 3, dtype=torch.bool), global_amax=9.0))
        assert torch.equal(got, nn.functional.linear(xq, net[0].weight, net[0].bias))


@pytest.mark.parametrize("plan, match", [
    ({"9": {"format": "nvfp4"}}, r"activation plan names '9' \(no such module\)"),
    ({"1": {"format": "nvfp4"}}, r"'1' \(ReLU\).*torch.nn.Linear"),
    ({"0": {"format": "fgmp", "threshold": 1.0}}, r"needs channel_importance"),
    ({"0": {"format": "nvfp4", "threshold": 1.0}}, r"only apply to format 'fgmp'"),
    ({"0": {"format": "nvfp4", "global_amax": -1.0}}, r"global_amax: Input should be greater than 0"),
    ({"0": {"format": "nvfp4", "bits": 4}}, r"bad activation plan for '0'.*bits"),
    ({"0": {"format": "bf16", "global_amax": 1.0}}, r"has no per-tensor scale for global_amax"),
    ({"0": {"format": "fgmp", "channel_importance": torch.ones(7), "threshold": 0.0}},
     r"channel_importance of '0' has shape \(7,\).*\(40,\)"),
])
def test_bad_plans_raise_input_error(net, plan, match):
    with pytest.raises(InputError, match=match):
        attach_activation_quant(net, plan)
    assert not net[0]._forward_pre_hooks  # nothing half-attached


def test_bad_spec_and_unknown_format(net):
    with pytest.raises(LpcError, match=r"bad nvfp4 spec: unknown key 'blok'"):
        attach_activation_quant(net, {"0": {"format": "nvfp4", "spec": {"blok": 1}}})
    with pytest.raises(LpcError, match=r"unknown format 'nvfp9'"):
        attach_activation_quant(net, {"0": {"format": "nvfp9"}})
