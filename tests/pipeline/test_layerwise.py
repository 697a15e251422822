"""Layer-streaming quantize and calibrate: the same bytes as the whole-model path, one decoder layer
resident, statistics on disk per layer, sharded output readable like a single file."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import save_file

from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
from lpc.pipeline.artifact.shards import INDEX, ShardWriter, entries_of, parse_size, write_streamed
from lpc.pipeline.calibration.stored import read_stats
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.io.streaming import resident_params
from lpc.recipes import load_recipe

layerwise = importlib.import_module("lpc.pipeline.stages.layerwise")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.w": torch.randn(5, 3, generator=g).to(torch.bfloat16), "a.q": torch.randint(0, 255, (7,), dtype=torch.uint8),
            "a.s": torch.randn(4, generator=g).to(torch.float8_e4m3fn), "c": torch.zeros(0, dtype=torch.uint8),
            "z.n": torch.tensor([3], dtype=torch.int64), "m": torch.randn(2, 2, generator=g)}


def test_streamed_file_equals_save_file_byte_for_byte(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    for k, v in t.items():  # one source file per tensor: the writer gathers them one at a time
        save_file({k: v}, str(tmp_path / f"src-{k}.safetensors"))
    entries = {k: entries_of(tmp_path / f"src-{k}.safetensors")[k] for k in t}
    write_streamed(tmp_path / "out.safetensors", entries, {"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_shard_writer_splits_by_size_and_indexes(tmp_path):
    w = ShardWriter(tmp_path, shard_bytes=40)
    t = _tensors()
    w.add({k: t[k] for k in list(t)[:3]})
    w.add({k: t[k] for k in list(t)[3:]})
    names = w.close()
    index = json.loads((tmp_path / INDEX).read_text())
    shards = [n for n in names if n != INDEX]
    assert len(shards) > 1 and set(index["weight_map"]) == set(t)
    assert not any(p.name.startswith(".spill") for p in tmp_path.iterdir())
    for k, v in t.items():
        got = entries_of(tmp_path / index["weight_map"][k])[k].load()
        assert torch.equal(got.view(torch.uint8), v.view(torch.uint8))


@pytest.mark.parametrize("bad", ["lots", "-1", 0])
def test_bad_shard_size_is_an_input_error(tmp_path, bad):
    with pytest.raises(InputError):
        ShardWriter(tmp_path, parse_size(bad))


def _decoder(module) -> bool:
    return type(module).__name__.endswith("DecoderLayer")


def _whole(monkeypatch):
    monkeypatch.setattr(importlib.import_module("lpc.pipeline.stages.quantize"), "open_streamed", lambda *a: None)


@pytest.mark.parametrize("recipe, sets, calibrated", [("nvfp4", [], True), ("fp8", [], False),
                                                     ("nvfp4", ["quantize.method=gptq"], True), ("int4", [], True),
                                                     ("bcq", [], False), ("bcq", ["quantize.codebook_scope=tensor"], False)])
def test_streamed_quantize_equals_whole_model(tmp_path, tiny_model_dir, text_files, monkeypatch, recipe, sets,
                                              calibrated):
    r = load_recipe(recipe, ["calibrate.samples=3", "calibrate.seq_len=16", *sets])
    calib = None
    if calibrated:
        calib = tmp_path / "c"
        stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), calib, r)
    seen = []
    release = layerwise.release
    monkeypatch.setattr(layerwise, "release", lambda m: (seen.append(resident_params(m)) if _decoder(m) else None,
                                                         release(m)))
    streamed = stages.quantize(str(tiny_model_dir), r, tmp_path / "s", calib=calib)
    assert len(seen) == 2 and all(n > 0 for n in seen)  # the streamed path ran, layer by layer
    _whole(monkeypatch)
    whole = stages.quantize(str(tiny_model_dir), r, tmp_path / "w", calib=calib)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "w" / f).read_bytes(), f
    assert streamed.manifest["summary"] == whole.manifest["summary"]
    assert streamed.manifest["layers"] == whole.manifest["layers"]


def test_one_decoder_layer_resident(tmp_path, build_llama, monkeypatch):
    d = tmp_path / "m"
    build_llama(d, layers=4)
    peaks = []
    materialize = layerwise.materialize

    def spy(layer, prefix, store, device="cpu"):
        materialize(layer, prefix, store, device)
        peaks.append(sum(resident_params(m) for m in opened["model"].model.layers))
    opened = {}
    open_streamed = layerwise.open_streamed

    def grab(*a):
        got = open_streamed(*a)
        opened["model"] = got[0]
        return got
    monkeypatch.setattr(layerwise, "materialize", spy)
    monkeypatch.setattr(importlib.import_module("lpc.pipeline.stages.quantize"), "open_streamed", grab)
    stages.quantize(str(d), load_recipe("fp8"), tmp_path / "q")
    one = sum(p.numel() for p in opened["model"].model.layers[0].parameters())
    assert len(peaks) == 4 and max(peaks) == one


def test_sharded_artifact_loads_like_one_file(tmp_path, tiny_model_dir, monkeypatch):
    r = load_recipe("fp8")
    one = stages.quantize(str(tiny_model_dir), r, tmp_path / "one")
    many = stages.quantize(str(tiny_model_dir), r, tmp_path / "many", max_shard_size="20KB")
    assert (tmp_path / "many" / INDEX).is_file() and not (tmp_path / "many" / "model.safetensors").exists()
    assert INDEX in many.manifest["files"] and "model.safetensors" in one.manifest["files"]
    qa, pa = read_qtensors(tmp_path / "one", read_qconfig(tmp_path / "one"))
    qb, pb = read_qtensors(tmp_path / "many", read_qconfig(tmp_path / "many"))
    assert qa.keys() == qb.keys() and pa.keys() == pb.keys()
    assert all(torch.equal(qa[n].data[f].view(torch.uint8), qb[n].data[f].view(torch.uint8)) for n in qa for f in qa[n].data)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    ma, _ = load(tmp_path / "one")
    mb, _ = load(tmp_path / "many")
    assert torch.equal(ma(ids).logits, mb(ids).logits)


def test_statistics_on_disk_equal_in_memory(tmp_path, tiny_model_dir, text_files):
    from lpc.pipeline.artifact.store import load_tensors

    r = load_recipe("nvfp4", ["calibrate.samples=3", "calibrate.seq_len=16", "quantize.method=gptq"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "full", r)
    rd = load_recipe("nvfp4", ["calibrate.samples=3", "calibrate.seq_len=16"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "diag", rd)
    full, diag = load_tensors(tmp_path / "full" / "stats.safetensors"), read_stats(tmp_path / "diag")
    names = [k.removesuffix(".act_cov") for k in full if k.endswith(".act_cov")]
    assert names and set(names) == set(diag)
    for n in names:
        assert "act_cov" not in diag[n]
        torch.testing.assert_close(diag[n]["act_sqmean"], torch.diagonal(full[f"{n}.act_cov"]), rtol=1e-5, atol=1e-7)
        assert torch.equal(diag[n]["act_absmax"], full[f"{n}.act_absmax"])
    with pytest.raises(RecipeError, match="full input covariance"):
        stages.quantize(str(tiny_model_dir), r, tmp_path / "q", calib=tmp_path / "diag")
    assert not (tmp_path / "q").exists()


def test_calibration_spills_each_layer(tmp_path, tiny_model_dir, text_files, monkeypatch):
    """The statistics file is written from per-layer spills, and equals writing them all at once."""
    from lpc.pipeline.artifact.store import save_tensors
    from lpc.pipeline.calibration import stats as st

    calib = importlib.import_module("lpc.pipeline.stages.calibrate")
    added = []
    add = ShardWriter.add
    monkeypatch.setattr(ShardWriter, "add", lambda self, t: (added.append(len(t)), add(self, t)))
    kept = {}
    collect = st.collect_input_stats

    def keep(*a, **k):
        out = collect(*a, **{**k, "on_layer": lambda d: (kept.update({n: s.covariance().clone() for n, s in d.items()}),
                                                          k["on_layer"](d))})
        return out
    monkeypatch.setattr(calib, "collect_input_stats", keep)
    r = load_recipe("nvfp4", ["calibrate.samples=3", "calibrate.seq_len=16", "quantize.method=gptq"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", r)
    assert sum(1 for n in added if n) >= 2  # one spill per decoder layer
    got = read_stats(tmp_path / "c")
    for n, cov in kept.items():
        assert torch.equal(got[n]["act_cov"], cov)


def test_sharded_quant_artifact_compensates_and_exports(tmp_path, tiny_model_dir, text_files):
    r = load_recipe("nvfp4_eora", ["calibrate.samples=3", "calibrate.seq_len=16", "compensate.rank=2"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", r)
    stages.quantize(str(tiny_model_dir), r, tmp_path / "one", calib=tmp_path / "c")
    stages.quantize(str(tiny_model_dir), r, tmp_path / "many", calib=tmp_path / "c", max_shard_size="20KB")
    for d in ("one", "many"):
        stages.compensate(tmp_path / d, tmp_path / "c", r, tmp_path / f"comp-{d}")
        stages.export(tmp_path / f"comp-{d}", tmp_path / f"peft-{d}", "peft")
    assert not any(p.name.startswith("model-") for p in (tmp_path / "comp-many").iterdir())
    assert (tmp_path / "comp-many" / "model.safetensors").read_bytes() == \
        (tmp_path / "comp-one" / "model.safetensors").read_bytes()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    assert torch.equal(load(tmp_path / "comp-one")[0](ids).logits, load(tmp_path / "comp-many")[0](ids).logits)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_quantize_derives_the_familys_fuse_groups(tmp_path, family_dir, monkeypatch, family):
    """With none of the family's names in the recipe's groups, the streamed path finds q/k/v and gate/up
    from the layers' shared inputs, as the whole-model path does, and shares their global scales (same
    bytes)."""
    r = load_recipe("nvfp4", ["quantize.fuse_groups=[[wq, wk]]", "calibrate.samples=2", "calibrate.seq_len=8"])
    src = family_dir(family)
    seen = []
    release = layerwise.release
    monkeypatch.setattr(layerwise, "release", lambda layer: (seen.append(1), release(layer)))
    stages.quantize(str(src), r, tmp_path / "s")
    assert seen  # streamed
    want = [["wq", "wk"], ["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"]] if family == "llama" else [
        ["wq", "wk"], ["k_proj", "q_proj", "v_proj"]]
    assert json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]["fuse_groups"] == want
    _whole(monkeypatch)
    stages.quantize(str(src), r, tmp_path / "w")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "w" / f).read_bytes(), f


def test_each_released_layer_trims_the_heap(tmp_path, tiny_model_dir, monkeypatch):
    """Every decoder layer released after its turn gives the C heap's free pages back (peak RSS would
    otherwise drift with depth and timing), and trimming leaves the artifact's bytes alone."""
    import lpc.pipeline.io.streaming as streaming

    plain = stages.quantize(str(tiny_model_dir), load_recipe("nvfp4"), tmp_path / "a").out
    calls = []
    real = streaming.trim_heap
    monkeypatch.setattr(streaming, "trim_heap", lambda: calls.append(1) or real())
    trimmed = stages.quantize(str(tiny_model_dir), load_recipe("nvfp4"), tmp_path / "b", overwrite=True).out
    n_layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) >= n_layers
    assert (plain / "model.safetensors").read_bytes() == (trimmed / "model.safetensors").read_bytes()
