"""Calibration, quantization, artifacts and loading on the tiny Llama (library level)."""
from __future__ import annotations

import importlib
import pytest
import torch

from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.calibration.stats import InputStats, _whole_model, collect_input_stats
from lpc.pipeline.calibration.stored import read_stats
from lpc.pipeline.io.data import calibration_batches, read_texts
from lpc.pipeline.errors import ArtifactError, InputError
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
from lpc.pipeline.io.models import find_targets, fuse_groups, load_hf_model, load_tokenizer
from lpc.recipes import load_recipe


@pytest.fixture(scope="module")
def model_and_batches(tiny_model_dir, text_files):
    model, tok = load_hf_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    return model, tok, calibration_batches(str(text_files["jsonl"]), tok, 6, 24)


def test_layerwise_calibration_equals_whole_model_hooks(model_and_batches):
    model, _, batches = model_and_batches
    targets = find_targets(model, ["*"], ["lm_head"])
    layerwise = collect_input_stats(model, batches, targets)
    reference = {n: InputStats.empty(m.in_features) for n, m in targets.items()}
    _whole_model(model, batches, targets, reference, None, "cpu")
    for name in targets:
        assert layerwise[name].count == reference[name].count == sum(b.shape[1] for b in batches)
        torch.testing.assert_close(layerwise[name].covariance(), reference[name].covariance(), rtol=1e-6, atol=1e-9)
        assert layerwise[name].xtx is None  # finished as soon as its layer was done
        torch.testing.assert_close(layerwise[name].absmax, reference[name].absmax)


def test_calibration_covariance_is_xtx_over_n(model_and_batches):
    model, _, batches = model_and_batches
    name = "model.layers.1.mlp.down_proj"
    target = {name: model.get_submodule(name)}
    seen = []
    h = target[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    x = torch.cat(seen).double()
    stats = collect_input_stats(model, batches, target)[name]
    torch.testing.assert_close(stats.covariance(), (x.T @ x / x.shape[0]).float(), rtol=1e-5, atol=1e-7)


def test_data_sources(tmp_path, text_files, model_and_batches):
    import datasets

    _, tok, _ = model_and_batches
    txt = calibration_batches(str(text_files["txt"]), tok, 3, 16)
    assert len(txt) == 3 and all(b.shape == (1, 16) for b in txt)
    jsonl = calibration_batches(str(text_files["jsonl"]), tok, 2, 1000)
    assert len(jsonl) == 2 and jsonl[0][0, 0].item() == tok.bos_token_id
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a small cat", "the sun was warm"]}).save_to_disk(str(ds_dir))
    assert read_texts(str(ds_dir)) == ["a small cat", "the sun was warm"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match=r'bad.jsonl, line 2: no string field "text"'):
        read_texts(str(bad))


def test_self_calibration_samples_from_the_model(model_and_batches):
    model, tok, _ = model_and_batches
    a = calibration_batches("self", tok, 2, 12, model=model, seed=3)
    b = calibration_batches("self", tok, 2, 12, model=model, seed=3)
    assert [x.shape for x in a] == [(1, 12), (1, 12)] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0][0, 0].item() == tok.bos_token_id


def test_fused_groups_share_global_scale(tmp_path, tiny_model_dir):
    recipe = load_recipe("nvfp4")
    stages.quantize(str(tiny_model_dir), recipe, tmp_path / "q")
    qconfig = read_qconfig(tmp_path / "q")
    qt, _ = read_qtensors(tmp_path / "q", qconfig)
    for layer in range(2):
        p = f"model.layers.{layer}"
        qkv = [qt[f"{p}.self_attn.{n}_proj"].data["global_scale"] for n in "qkv"]
        assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
        assert torch.equal(qt[f"{p}.mlp.gate_proj"].data["global_scale"], qt[f"{p}.mlp.up_proj"].data["global_scale"])
        assert not torch.equal(qt[f"{p}.mlp.down_proj"].data["global_scale"], qkv[0])


def test_load_matches_manual_dequantization(tmp_path, tiny_model_dir, model_and_batches):
    model, _, batches = model_and_batches
    stages.quantize(str(tiny_model_dir), load_recipe("nvfp4"), tmp_path / "q")
    loaded, _ = load(tmp_path / "q")
    qt, _ = read_qtensors(tmp_path / "q", read_qconfig(tmp_path / "q"))
    ref = load_hf_model(tiny_model_dir)
    for name, q in qt.items():
        ref.get_submodule(name).weight.copy_(get_format("nvfp4").dequantize(q))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]).logits, ref(batches[0]).logits, rtol=0, atol=0)
        assert not torch.equal(loaded(batches[0]).logits, model(batches[0]).logits)


def test_importance_weighted_scale_search_lowers_output_error(tmp_path, tiny_model_dir, text_files):
    recipe = load_recipe("nvfp4", ["calibrate.samples=6", "calibrate.seq_len=24"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", recipe)
    errs = {}
    for search in (0, 2):
        r = load_recipe("nvfp4", [f"quantize.weights.spec.scale_search={search}"])
        m = stages.quantize(str(tiny_model_dir), r, tmp_path / f"q{search}", calib=tmp_path / "c").manifest
        errs[search] = sum(rec["rel_output_error"] for rec in m["layers"].values())
    assert errs[2] < errs[0]


def test_failed_stage_leaves_nothing_and_keeps_old_output(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "q"
    stages.quantize(str(tiny_model_dir), load_recipe("fp8"), out)
    before = (out / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(importlib.import_module("lpc.pipeline.stages.quantize"), "quantize_layers", boom)
    monkeypatch.setattr(importlib.import_module("lpc.pipeline.stages.layerwise"), "quantize_layers", boom)
    with pytest.raises(RuntimeError):
        stages.quantize(str(tiny_model_dir), load_recipe("nvfp4"), out, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


def test_a_stage_is_skipped_only_for_an_output_of_this_lpc_version(tmp_path, tiny_model_dir, monkeypatch):
    store = importlib.import_module("lpc.pipeline.artifact.store")
    out = tmp_path / "q"
    first = stages.quantize(str(tiny_model_dir), load_recipe("fp8"), out)
    assert not first.skipped and first.manifest["lpc_version"] == store.lpc_version()
    assert stages.quantize(str(tiny_model_dir), load_recipe("fp8"), out).skipped  # same inputs, config, version
    monkeypatch.setattr(store, "lpc_version", lambda: "99.0.0")  # an upgraded lpc
    with pytest.raises(ArtifactError, match="already exists"):  # not reused: made again, with --overwrite
        stages.quantize(str(tiny_model_dir), load_recipe("fp8"), out)
    again = stages.quantize(str(tiny_model_dir), load_recipe("fp8"), out, overwrite=True)
    assert not again.skipped and again.manifest["lpc_version"] == "99.0.0"


def test_wrong_stage_artifact_is_refused(tmp_path, tiny_model_dir, text_files):
    recipe = load_recipe("nvfp4", ["calibrate.samples=2"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", recipe)
    with pytest.raises(ArtifactError, match="is a 'calibrate' artifact, expected quantize"):
        stages.export(tmp_path / "c", tmp_path / "e")
    # nvfp4 rounds to nearest (its scale search weighs by E[x^2]): only the diagonal of X^T X / n is collected
    assert set(read_stats(tmp_path / "c")["model.layers.0.mlp.up_proj"]) == {"act_absmax", "act_sqmean", "count"}


def test_fuse_groups_partition():
    names = ["m.l.0.a.q_proj", "m.l.0.a.k_proj", "m.l.0.a.v_proj", "m.l.0.a.o_proj", "m.l.1.a.q_proj"]
    groups = fuse_groups(names, [["q_proj", "k_proj", "v_proj"]])
    assert sorted(map(sorted, groups)) == [["m.l.0.a.k_proj", "m.l.0.a.q_proj", "m.l.0.a.v_proj"],
                                           ["m.l.0.a.o_proj"], ["m.l.1.a.q_proj"]]


def test_model_wide_codebook_is_stored_once(tmp_path, tiny_model_dir):
    from lpc.pipeline.artifact.store import load_tensors

    res = stages.quantize(str(tiny_model_dir), load_recipe("bcq"), tmp_path / "q")
    tensors = load_tensors(tmp_path / "q" / "model.safetensors")
    books = [k for k in tensors if "codebook" in k]
    assert books == ["lpc.shared.codebook.0"] and tuple(tensors[books[0]].shape) == (16, 16)
    qt, plain = read_qtensors(tmp_path / "q", read_qconfig(tmp_path / "q"))
    assert all(torch.equal(q.data["codebook"], tensors[books[0]]) for q in qt.values())
    assert not any(k.startswith("lpc.") for k in plain)
    per_tensor_copies = sum(q.storage_bits() for q in qt.values()) / sum(q.numel for q in qt.values())
    assert res.manifest["bits_per_weight"] < per_tensor_copies - 0.5  # 2048 bits saved per 32x32..40 layer
    model, _ = load(tmp_path / "q")
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    torch.testing.assert_close(layer.weight, get_format("bcq").dequantize(qt["model.layers.0.mlp.up_proj"]))


def test_streamed_calibration_equals_whole_model_and_holds_one_layer(tmp_path, text_files, build_llama):
    from lpc.pipeline.io.models import decoder_layers
    from lpc.pipeline.io.streaming import open_for_calibration, resident_params

    model_dir = tmp_path / "deep"
    whole = build_llama(model_dir, seed=1, layers=4)
    tok = load_tokenizer(model_dir)
    batches = calibration_batches(str(text_files["jsonl"]), tok, 4, 24)
    reference = collect_input_stats(whole, batches, find_targets(whole, ["*"], ["lm_head"]))
    skel, store = open_for_calibration(model_dir, ["*"], ["lm_head"])
    _, layers = decoder_layers(skel)
    outside = resident_params(skel)
    seen = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(resident_params(skel) - outside))
    streamed = collect_input_stats(skel, batches, find_targets(skel, ["*"], ["lm_head"]), store=store)
    per_layer = sum(p.numel() for p in whole.model.layers[0].parameters())
    # The capture of layer 0's inputs runs with no layer loaded; then exactly one layer at a time.
    assert seen.count(0) == len(batches) and seen.count(per_layer) == len(batches) * len(layers)
    assert set(seen) == {0, per_layer}
    assert resident_params(skel) == outside
    for name, s in reference.items():
        assert streamed[name].count == s.count
        torch.testing.assert_close(streamed[name].covariance(), s.covariance(), rtol=1e-6, atol=1e-9)
