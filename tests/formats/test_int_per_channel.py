"""`int` with vector=0: one scale per row (per channel), the VS-Quant paper's baseline."""
import pytest
import torch

from lpc.formats import get_format


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 75])
@pytest.mark.parametrize("scale_format", ["bf16", "two_level", "e4m3"])
def test_per_channel_is_one_amax_scale_per_row(bits, cols, scale_format):
    torch.manual_seed(0)
    w = torch.randn(12, cols)
    fmt = get_format("int")
    spec = {"bits": bits, "vector": 0, "scale_format": scale_format}
    q = fmt.quantize(w, **spec)
    assert q.data["scale"].shape[0] == 12
    deq = fmt.dequantize(q)
    assert deq.shape == w.shape
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(1, keepdim=True) / qmax
    # the error is at most half a step, plus (E4M3 scales, rounded to 3 mantissa bits) the clipping of a
    # scale rounded down by up to 1/16 of the row's amax
    slack = w.abs().amax(1, keepdim=True) / 16 if scale_format == "e4m3" else 0.0
    assert ((deq - w).abs() <= 0.5 * step * 1.15 + slack + 1e-6).all()
    if scale_format == "bf16":
        ref = torch.round(w / step.bfloat16().float()).clamp(-qmax, qmax) * step.bfloat16().float()
        torch.testing.assert_close(deq, ref)
    assert fmt.block_width(**spec) is None


def test_per_vector_beats_per_channel_on_heavy_tailed_rows():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(4.0).sample((256, 512))
    fmt = get_format("int")
    err = {v: (fmt.fake_quantize(w, bits=4, vector=v, scale_format="bf16") - w).square().mean().item()
           for v in (0, 16)}
    assert err[16] < 0.5 * err[0]


def test_per_channel_int_is_refused_by_compressed_tensors_in_one_line():
    from lpc.pipeline.errors import ArtifactError
    from lpc.pipeline.export.compressed_tensors import check_exportable, expressible

    qconfig = {"layers": {"model.layers.0.mlp.down_proj": {"format": "int", "spec": {"bits": 4, "vector": 0}}}}
    with pytest.raises(ArtifactError, match="per-channel int"):
        check_exportable(qconfig)
    assert "vector: 0" in expressible(qconfig)
    assert expressible({"layers": {"x": {"format": "int", "spec": {"bits": 4, "vector": 16}}}}) is None
