"""Fisher layer by layer (stored layer inputs, backward recomputing one layer at a time) equals the
whole-model Fisher, and calibrate --fisher on a checkpoint uses it without loading the model whole."""
from __future__ import annotations

import importlib

from pathlib import Path

import torch

from lpc.pipeline import stages
from lpc.pipeline.calibration.fisher import fisher_statistics
from lpc.pipeline.calibration.fisher_layerwise import layerwise_fisher
from lpc.pipeline.calibration.stored import read_stats
from lpc.pipeline.io.models import decoder_layers, find_targets
from lpc.recipes import load_recipe


def test_layerwise_fisher_equals_whole_model(make_llama):
    model = make_llama(layers=3).float().eval()
    targets = find_targets(model, ["*proj"], [])
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 60, (1, 12), generator=g) for _ in range(3)]
    whole = fisher_statistics(model, batches, targets)
    layered = layerwise_fisher(model, batches, targets, decoder_layers(model))
    assert set(layered) == set(whole)
    for n in whole:
        for key in ("weight_fisher", "act_fisher"):
            torch.testing.assert_close(layered[n][key], whole[n][key], rtol=2e-4, atol=1e-10)
            assert layered[n][key].abs().sum() > 0
        assert layered[n]["count"] == whole[n]["count"] and layered[n]["tokens"] == whole[n]["tokens"]


def test_samples_in_chunks_give_the_same_bits(make_llama, monkeypatch):
    """With room for the stored states of one sample only, every sample is its own chunk (each layer
    loaded twice per chunk) and the Fisher is bit-identical to one pass over all samples."""
    import lpc.pipeline.calibration.fisher_layerwise as fl

    model = make_llama(layers=3).float().eval()
    targets = find_targets(model, ["*proj"], [])
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(3, 60, (1, 10), generator=g) for _ in range(4)]
    loads = []
    one_pass = layerwise_fisher(model, batches, targets, decoder_layers(model), load=loads.append)
    assert len(loads) == 2 * 3
    monkeypatch.setattr(fl, "DISK_STATE_BYTES", 3 * 10 * fl._hidden_bytes(model))  # one sample's 3 layer inputs
    loads.clear()
    chunked = layerwise_fisher(model, batches, targets, decoder_layers(model), load=loads.append)
    assert len(loads) == 4 * 2 * 3
    for n in one_pass:
        for key in ("weight_fisher", "act_fisher"):
            assert torch.equal(chunked[n][key], one_pass[n][key]), (n, key)
        assert chunked[n]["count"] == 4


def test_a_streamed_models_layer_inputs_wait_on_disk_with_the_same_bits(make_llama, monkeypatch, tmp_path):
    """With a streamed model (layers loaded on demand) each layer's stored inputs wait in a file in the
    given directory between the forward and backward passes: none is held in memory, the files are gone
    afterwards, and the Fisher equals the in-memory pass bit for bit."""
    import lpc.pipeline.calibration.fisher_layerwise as fl

    model = make_llama(layers=3).float().eval()
    targets = find_targets(model, ["*proj"], [])
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(3, 60, (1, 12), generator=g) for _ in range(3)]
    in_memory = layerwise_fisher(model, batches, targets, decoder_layers(model))
    seen = []
    real_pop = fl._StoredInputs.pop

    def pop(self, i):
        seen.append((self.held == {}, sorted(p.name for p in Path(self.dir.name).iterdir())))
        return real_pop(self, i)

    monkeypatch.setattr(fl._StoredInputs, "pop", pop)
    offloaded = layerwise_fisher(model, batches, targets, decoder_layers(model), load=lambda i: None,
                                 park_dir=str(tmp_path))
    assert seen == [(True, ["0.safetensors", "1.safetensors", "2.safetensors"]),
                    (True, ["0.safetensors", "1.safetensors"]), (True, ["0.safetensors"])]
    assert list(tmp_path.iterdir()) == []
    for n in in_memory:
        for key in ("weight_fisher", "act_fisher"):
            assert torch.equal(offloaded[n][key], in_memory[n][key]), (n, key)


def test_each_layer_is_delivered_when_final_and_only_one_layer_holds_accumulators(make_llama, monkeypatch, tmp_path):
    """on_layer gets every layer once, last layer first, with the same bits as the returned statistics;
    between chunks the partial sums wait on disk: no more than one layer's accumulators are alive."""
    import lpc.pipeline.calibration.fisher_layerwise as fl

    model = make_llama(layers=3).float().eval()
    targets = find_targets(model, ["*proj"], [])
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 60, (1, 10), generator=g) for _ in range(4)]
    reference = layerwise_fisher(model, batches, targets, decoder_layers(model))
    alive, peak = [0], [0]
    real = fl.FisherAccumulator

    class Counted(real):
        def __init__(self, module):
            super().__init__(module)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def __del__(self):
            alive[0] -= 1

    monkeypatch.setattr(fl, "FisherAccumulator", Counted)
    parked = []
    real_park = fl._Parking.park
    monkeypatch.setattr(fl._Parking, "park", lambda self, names, accs: (parked.append(self._file(names).parent),
                                                                     real_park(self, names, accs)))
    for state_bytes in (None, 3 * 10 * fl._hidden_bytes(model)):  # one chunk; one sample per chunk
        if state_bytes:
            monkeypatch.setattr(fl, "STATE_BYTES", state_bytes)
        got, order = {}, []
        peak[0] = 0
        parked.clear()
        rest = layerwise_fisher(model, batches, targets, decoder_layers(model), park_dir=str(tmp_path),
                                on_layer=lambda done: (order.append(sorted({n.split(".")[2] for n in done})), got.update(done)))
        assert rest == {} and order == [["2"], ["1"], ["0"]]
        # partial sums wait in the given directory between chunks (3 layers x 3 earlier chunks), then are gone
        assert len(parked) == (9 if state_bytes else 0) and all(p.parent == tmp_path for p in parked)
        assert list(tmp_path.iterdir()) == []
        per_layer = len([n for n in targets if n.startswith("model.layers.0.")])
        assert peak[0] <= per_layer, (state_bytes, peak[0])
        for n in reference:
            for key in ("weight_fisher", "act_fisher"):
                assert torch.equal(got[n][key], reference[n][key]), (n, key)


def test_calibrate_fisher_streams_from_the_checkpoint(tmp_path, tiny_model_dir, text_files, monkeypatch):
    calib = importlib.import_module("lpc.pipeline.stages.calibrate")
    loaded = []
    monkeypatch.setattr(calib, "load_hf_model", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    r = load_recipe("fgmp_nvfp4", ["calibrate.samples=3", "calibrate.seq_len=16"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", r)
    assert loaded == []
    stats = read_stats(tmp_path / "c")
    n = "model.layers.1.mlp.down_proj"
    assert stats[n]["weight_fisher"].shape == (32, 40) and stats[n]["act_fisher"].shape == (40,)
    # FGMP weighs errors by Fisher information and E[x^2]: no full X^T X is collected for it
    assert stats[n]["weight_fisher"].sum() > 0 and "act_sqmean" in stats[n] and "act_cov" not in stats[n]


def test_fisher_forward_measures_the_input_statistics_with_the_same_bits(tmp_path, tiny_model_dir, text_files,
                                                                         monkeypatch):
    """A streamed Fisher calibration takes the diagonal input statistics in Fisher's own forward pass (no pass
    of their own): absmax, second moments and counts equal a calibration without Fisher bit for bit, in one
    chunk of samples and in one chunk per sample. The full X^T X keeps its own pass (same bits too)."""
    import lpc.pipeline.calibration.fisher_layerwise as fl

    calib = importlib.import_module("lpc.pipeline.stages.calibrate")
    sets = ["calibrate.samples=3", "calibrate.seq_len=16"]
    for recipe, field in (("fgmp_nvfp4", "act_sqmean"), ("nvfp4_eora", "act_cov")):
        plain = tmp_path / f"{recipe}-plain"
        stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), plain,
                         load_recipe(recipe, [*sets, "calibrate.fisher=false"]))
        reference = read_stats(plain)
        separate = calib.collect_input_stats
        for chunked in (False, True):
            calls = []
            monkeypatch.setattr(calib, "collect_input_stats", lambda *a, **k: calls.append(a) or separate(*a, **k))
            if chunked:  # room for one sample's stored layer inputs: every sample is its own chunk
                monkeypatch.setattr(fl, "DISK_STATE_BYTES", 1)
            out = tmp_path / f"{recipe}-{chunked}"
            stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), out,
                             load_recipe(recipe, [*sets, "calibrate.fisher=true"]))
            assert (calls == []) == (field == "act_sqmean")
            got = read_stats(out)
            assert set(got) == set(reference)
            for n in reference:
                for key in ("act_absmax", field, "count"):
                    assert torch.equal(got[n][key], reference[n][key]), (recipe, chunked, n, key)
                assert got[n]["weight_fisher"].abs().sum() > 0
            monkeypatch.undo()
