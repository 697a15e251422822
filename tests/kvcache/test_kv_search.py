"""Per-layer static K/V scale search (lpc.pipeline.kvcache.search): candidates never clip a calibrated
value, the chosen multiplier's attention error is the smallest (so never above m = 1's), statistics
without the calibration samples are refused clearly, the searched scales reach the artifact and the
engine export, and the samples themselves are never written to the artifact."""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file

from lpc.pipeline import stages
from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache import KV_PREFIX, KVSpec, kv_stat_tensors, kv_statistics
from lpc.pipeline.kvcache.search import CANDIDATES, SAMPLES, layer_errors, search_scales
from lpc.recipes import load_recipe

CALIB = ["calibrate.samples=4", "calibrate.seq_len=24"]
FORMATS = [("fp8_e4m3", {"granularity": "tensor"}), ("nvfp4", {})]


@pytest.fixture(scope="module")
def stats(make_llama):
    """The tiny Llama's K/V statistics (with the recorded samples), keys spread over several octaves."""
    m = make_llama(vocab_size=64, layers=2, head_dim=16)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_proj.weight[[2, 10]] *= 12.0
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(3))
    return {KV_PREFIX + k: v for k, v in kv_stat_tensors(kv_statistics(m, [ids])).items()}


def test_candidates_never_clip_a_calibrated_value():
    assert CANDIDATES[0] == 1.0 and all(1.0 <= m < 2.0 for m in CANDIDATES) and len(set(CANDIDATES)) == len(CANDIDATES)
    amax = torch.tensor(3.7)
    x = torch.tensor([-3.7, -1.1, 0.02, 2.5, 3.7]).reshape(1, 1, 1, 5)  # the calibrated extremes included
    for m in CANDIDATES:
        y = KVSpec("fp8_e4m3", {"granularity": "tensor"}, amax * m).fake(x)
        # E4M3 rounds to 3 mantissa bits: at most 1/16 relative error, and the extremes are not saturated
        assert torch.allclose(y, x, rtol=1 / 16, atol=0) and float(y.abs().amax()) >= 3.7 * (1 - 1 / 16), m
    clipped = KVSpec("fp8_e4m3", {"granularity": "tensor"}, amax * 0.5).fake(x)  # the control: m < 1 clips
    assert float(clipped.abs().amax()) < 0.6 * 3.7


@pytest.mark.parametrize("fmt,spec", FORMATS)
def test_the_chosen_multiplier_has_the_smallest_error_on_the_sample(stats, fmt, spec):
    out = search_scales(stats, {"format": fmt, "spec": spec, "scales": "tensor"}, prefix=KV_PREFIX)
    for i in (0, 1):
        sample = {n: stats[f"{KV_PREFIX}{i}.{n}"] for n in SAMPLES}
        amax = {p: stats[f"{KV_PREFIX}{i}.{p}_amax"].float().amax() for p in ("k", "v")}
        errs = layer_errors(sample, {"format": fmt, "spec": spec}, amax)
        for p in ("k", "v"):
            mult = float(out[f"{KV_PREFIX}{i}.{p}_scale_mult"])
            j = CANDIDATES.index(mult)
            assert errs[p][j] == min(errs[p]) and errs[p][j] <= errs[p][0]
            assert errs[p][0] > 0  # the sample is quantized with loss, so the comparison means something
            assert torch.equal(out[f"{KV_PREFIX}{i}.{p}_amax"], stats[f"{KV_PREFIX}{i}.{p}_amax"].float() * mult)
    # the statistics passed in are left as they were
    assert f"{KV_PREFIX}0.k_scale_mult" not in stats


def test_errors_depend_on_the_multiplier(stats):
    """The search has something to choose from: the candidates' errors are not all equal."""
    sample = {n: stats[f"{KV_PREFIX}0.{n}"] for n in SAMPLES}
    amax = {p: stats[f"{KV_PREFIX}0.{p}_amax"].float().amax() for p in ("k", "v")}
    errs = layer_errors(sample, {"format": "fp8_e4m3", "spec": {"granularity": "tensor"}}, amax)
    assert len(errs["k"]) == len(CANDIDATES) and max(errs["k"]) > min(errs["k"])


def test_statistics_without_samples_are_refused(stats):
    bare = {k: v for k, v in stats.items() if not k.endswith("_sample")}
    with pytest.raises(InputError, match="attention samples") as e:
        search_scales(bare, {"format": "fp8_e4m3", "spec": {}, "scales": "tensor"})
    assert "lpc calibrate" in e.value.hint  # the hint says how to get them
    for kv in ({"format": "fp8_e4m3", "scales": "head"}, {"format": "nvfp4", "scales": "tensor", "kivi": True}):
        with pytest.raises(InputError, match="one static scale per layer"):
            search_scales(stats, kv)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, aligned_dir, text_files):
    d = tmp_path_factory.mktemp("kv-search")
    recipe = load_recipe("kv_fp8", CALIB + ["kv_cache.scale_search=true"])
    stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), d / "calib", recipe)
    stages.quantize(str(aligned_dir), recipe, d / "q", calib=d / "calib")
    return d


def test_the_artifact_holds_searched_scales_and_no_samples(searched):
    calib = load_file(str(searched / "calib" / "kv_stats.safetensors"))
    assert "0.k_sample" in calib and calib["0.q_sample"].ndim == 3  # the calibration records them ...
    art = load_file(str(searched / "q" / "model.safetensors"))
    assert not [k for k in art if k.endswith("_sample")]  # ... the artifact does not carry them
    for i in (0, 1):
        for p in ("k", "v"):
            mult = float(art[f"{KV_PREFIX}{i}.{p}_scale_mult"])
            assert mult in CANDIDATES
            assert torch.equal(art[f"{KV_PREFIX}{i}.{p}_amax"], calib[f"{i}.{p}_amax"].float() * mult)


@pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_searched_scales_survive_export(searched, fmt):
    stages.export(searched / "q", searched / fmt, fmt)
    art = load_file(str(searched / "q" / "model.safetensors"))
    out = load_file(str(searched / fmt / "model.safetensors"))
    assert not [k for k in out if k.endswith("_sample") or k.endswith("_scale_mult")]
    for i in (0, 1):
        for p in ("k", "v"):
            name = (f"model.layers.{i}.self_attn.{p}_scale" if fmt == "compressed-tensors"
                    else f"model.layers.{i}.self_attn.{p}_proj.{p}_scale")
            assert float(out[name].reshape(())) == float(art[f"{KV_PREFIX}{i}.{p}_amax"].amax() / 448)
