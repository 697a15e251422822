"""FP8 with one scale per 128x128 block (granularity 'block'), as DeepSeek-style checkpoints and
compressed-tensors' `block` strategy hold it."""
from importlib.util import find_spec

import pytest
import torch

from lpc.formats import get_format
from lpc.formats.errors import FormatError


def test_block_scales_are_each_blocks_amax_over_448():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.linspace(0.1, 10, 200)  # columns of very different range
    fmt = get_format("fp8_e4m3")
    q = fmt.quantize(w, granularity="block")
    assert q.data["scale"].shape == (3, 2) and q.data["qdata"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(q.data["scale"][2, 1], w[256:, 128:].abs().amax() / 448)
    deq = fmt.dequantize(q)
    # inside each block the error is FP8's: at most half an E4M3 step of the block's largest value
    assert ((deq - w).abs() <= w[:, :].abs().amax() / 448 * 16 + 1e-6).all()
    assert (deq - w).norm() / w.norm() < 0.04
    with pytest.raises(FormatError, match="block"):
        fmt.quantize(w, granularity="block", clip="mse")


@pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
def test_compressed_tensors_block_dequantization_equals_lpc():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from lpc.pipeline.export.ct_layouts import SCHEMES, fp8_tensors

    torch.manual_seed(1)
    q = get_format("fp8_e4m3").quantize(torch.randn(300, 200), granularity="block")
    tensors, key = fp8_tensors(q)
    args = QuantizationArgs(**SCHEMES[key][1])
    got = dequantize(tensors["weight"], scale=tensors["weight_scale"], args=args, dtype=torch.float32)
    assert torch.equal(got, get_format("fp8_e4m3").dequantize(q))
