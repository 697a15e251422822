"""The compensate stage (EoRA, SVD, ESPACE), its storage and loading, PEFT/dense export, and `lpc compensate`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.pipeline import stages
from lpc.recipes import RecipeError
from lpc.pipeline.artifact.store import load_tensors, save_tensors
from lpc.pipeline.calibration.stored import STATS_FILE, read_stats
from lpc.pipeline.stages.compensate import compensate
from lpc.pipeline.errors import InputError
from lpc.pipeline.artifact.load import load
from lpc.pipeline.compensation.lowrank import output_error
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.io.models import load_hf_model
from lpc.recipes import load_recipe

SMALL = ["calibrate.samples=4", "calibrate.seq_len=32", "calibrate.fisher=true"]
runner = CliRunner()


def recipe(*sets: str):
    return load_recipe("nvfp4_eora", [*SMALL, *sets])


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    """calibrate (with Fisher) and quantize the tiny Llama once for the module."""
    d = tmp_path_factory.mktemp("comp")
    r = recipe()
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), d / "calib", r)
    stages.quantize(str(tiny_model_dir), r, d / "quant", calib=d / "calib")
    return {"dir": d, "calib": d / "calib", "quant": d / "quant", "model": tiny_model_dir}


@pytest.fixture(scope="module")
def ids(staged) -> torch.Tensor:
    _, tok = load(staged["model"])
    return tok("once upon a time the little cat found a shiny red ball in the park", return_tensors="pt").input_ids


def run(staged, name: str, *sets: str):
    return compensate(staged["quant"], staged["calib"], recipe(*sets), staged["dir"] / name, overwrite=True)


def logits(path: Path, ids: torch.Tensor, **kw) -> torch.Tensor:
    model, _ = load(path, **kw)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("sets", [[], ["compensate.method=svd"], ["compensate.method=espace"],
                                  ["compensate.method=espace", "compensate.espace_stat=weight"],
                                  ["compensate.method=espace", "compensate.espace_stat=grad"]],
                         ids=["eora", "svd", "espace-act", "espace-weight", "espace-grad"])
def test_stage_end_to_end_lowers_every_layers_error(staged, ids, sets):
    res = run(staged, "c-" + "-".join(sets), *sets)
    quant = json.loads((staged["quant"] / "manifest.json").read_text())
    m = res.manifest
    assert m["stage"] == "compensate" and set(m["layers"]) == set(quant["layers"])
    for name, rec in m["layers"].items():
        assert rec["rank"] == 8 and rec["method"] == recipe(*sets).compensate.method
        assert rec["rel_output_error"] < rec["rel_output_error_before"], name
        shape = quant["layers"][name]["shape"]
        assert rec["factor_bits"] == 16 * 8 * sum(shape)  # bf16 B (out, 8) and A (8, in)
        assert rec["bits_per_weight"] == pytest.approx(quant["layers"][name]["bits_per_weight"]
                                                       + rec["factor_bits"] / (shape[0] * shape[1]))
    assert m["bits_per_weight"] > quant["bits_per_weight"]
    lowrank = read_qconfig(res.out)["lowrank"]
    assert lowrank["method"] == recipe(*sets).compensate.method and len(lowrank["layers"]) == len(quant["layers"])
    # the low-rank paths are live in load(): the model is no longer the quantized one
    assert not torch.allclose(logits(res.out, ids), logits(staged["quant"], ids))
    again = run(staged, "c-" + "-".join(sets), *sets)
    assert again.skipped


def test_eora_output_error_below_svd_at_the_same_rank(staged):
    eora = run(staged, "e4", "compensate.rank=4", "compensate.factor_format=fp32").manifest["layers"]
    svd = run(staged, "s4", "compensate.rank=4", "compensate.factor_format=fp32",
              "compensate.method=svd").manifest["layers"]
    for name in eora:  # EoRA minimizes exactly this error at each rank
        assert eora[name]["rel_output_error"] <= svd[name]["rel_output_error"] * (1 + 1e-6), name
    assert sum(r["rel_output_error"] for r in eora.values()) < 0.9 * sum(r["rel_output_error"] for r in svd.values())


def test_full_rank_reproduces_the_unquantized_layers(staged, ids):
    original = load_hf_model(staged["model"])
    stats = read_stats(staged["calib"])
    for method in ("eora", "svd"):
        res = run(staged, f"full-{method}", "compensate.rank=64", f"compensate.method={method}",
                  "compensate.factor_format=fp32")
        model, _ = load(res.out, merge_lowrank=True)
        for name, rec in res.manifest["layers"].items():
            # not exactly 0: fp32 rounding of A = V^T S^-1 grows with the conditioning of C
            assert rec["rank"] == min(rec["shape"]) and rec["rel_output_error"] < 1e-6, (method, name)
            # the merged layer's weight error, weighted by the layer's real inputs
            err = model.get_submodule(name).weight - original.get_submodule(name).weight
            ref = output_error(original.get_submodule(name).weight, stats[name]["act_cov"])
            assert output_error(err, stats[name]["act_cov"]) / ref < 1e-6, (method, name)
    with torch.no_grad():
        torch.testing.assert_close(logits(res.out, ids), original(ids).logits, atol=1e-4, rtol=1e-4)


def test_budget_is_spread_over_layers_and_respected(staged):
    budget = 1500
    res = run(staged, "budget", f"compensate.budget_params={budget}")
    layers = res.manifest["layers"]
    spent = sum(r["rank"] * sum(r["shape"]) for r in layers.values())
    assert budget - 72 <= spent <= budget and res.manifest["summary"]["factor_params"] == spent
    assert len({r["rank"] for r in layers.values()}) > 1
    loaded = read_qconfig(res.out)["lowrank"]["layers"]
    assert {n: e["rank"] for n, e in loaded.items()} == {n: r["rank"] for n, r in layers.items() if r["rank"]}


def test_quantized_factors_are_packed_counted_and_loaded(staged, ids):
    res = run(staged, "nvfp4-factors", "compensate.factor_format=nvfp4")
    entry = read_qconfig(res.out)["lowrank"]["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["factors"]["lora_A"]["format"] == "nvfp4" and entry["factors"]["lora_B"]["shape"] == [32, 8]
    tensors = load_tensors(res.out / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.lora_A.qdata" in tensors
    assert "model.layers.0.mlp.down_proj.lora_A" not in tensors
    for name, rec in res.manifest["layers"].items():
        n_factor = 8 * sum(rec["shape"])
        assert 4.5 * n_factor < rec["factor_bits"] < 16 * n_factor, name  # rank 8 pads to blocks of 16
        assert rec["rel_output_error"] < rec["rel_output_error_before"], name
    dense = stages.export(res.out, staged["dir"] / "nvfp4-dense", "dense", overwrite=True)
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(dense.out)(ids).logits
    torch.testing.assert_close(merged, logits(res.out, ids), atol=1e-4, rtol=1e-4)


def test_espace_compress_mode_is_stored_as_the_factored_layer(staged):
    res = run(staged, "compress", "compensate.method=espace", "compensate.mode=compress", "compensate.rank=24")
    qconfig = read_qconfig(res.out)
    assert not qconfig["layers"] and qconfig["lowrank"]["mode"] == "compress"
    assert qconfig["lowrank"]["layers"]["model.layers.0.self_attn.q_proj"]["factors"]["lora_B"]["format"] == "nvfp4"
    model, _ = load(res.out, merge_lowrank=True)
    original, stats = load_hf_model(staged["model"]), read_stats(staged["calib"])
    for name, rec in res.manifest["layers"].items():
        w = original.get_submodule(name).weight
        err = output_error(w - model.get_submodule(name).weight, stats[name]["act_cov"])
        assert err / output_error(w, stats[name]["act_cov"]) == pytest.approx(rec["rel_output_error"], rel=1e-3)
        out, n_in = rec["shape"]  # no W_q left: the bits are W P (nvfp4, padded) and P^T (bf16)
        assert rec["bits_per_weight"] == rec["factor_bits"] / (out * n_in)
        r, padded = rec["rank"], -(-rec["rank"] // 16) * 16  # 24, or 16 where out = 16 caps it
        assert rec["factor_bits"] == 4.5 * out * padded + 32 + 16 * r * n_in


def test_peft_export_gives_the_logits_of_lpc_load(staged, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    comp = run(staged, "peft-src", "compensate.budget_params=1500")  # unequal ranks: rank_pattern
    out = stages.export(comp.out, staged["dir"] / "peft", "peft", overwrite=True).out
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = {n: e["rank"] for n, e in read_qconfig(comp.out)["lowrank"]["layers"].items()}
    assert cfg["lora_alpha"] == cfg["r"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert {n: cfg["rank_pattern"].get(n, cfg["r"]) for n in cfg["target_modules"]} == ranks
    adapter = load_tensors(out / "adapter" / "adapter_model.safetensors")
    name = next(iter(ranks))
    assert adapter[f"base_model.model.{name}.lora_A.weight"].shape[0] == ranks[name]
    base = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        # the base is the quantized model, not merged
        torch.testing.assert_close(base(ids).logits, logits(staged["quant"], ids), atol=1e-5, rtol=1e-5)
        peft_logits = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    torch.testing.assert_close(peft_logits, logits(comp.out, ids), atol=1e-5, rtol=1e-5)
    assert "adapter/adapter_model.safetensors" in json.loads((out / "manifest.json").read_text())["files"]


def test_bad_inputs_raise_with_the_fix(staged, tmp_path):
    with pytest.raises(InputError, match="has no compensate section"):
        compensate(staged["quant"], staged["calib"], load_recipe("nvfp4", SMALL), tmp_path / "x")
    with pytest.raises(RecipeError, match="mode=compress needs method espace"):  # refused at the recipe
        recipe("compensate.mode=compress")
    with pytest.raises(InputError, match="no low-rank paths"):
        stages.export(staged["quant"], tmp_path / "p", "peft")
    calib = _calib_without(staged, tmp_path, "model.layers.1.mlp.up_proj.weight_fisher")
    with pytest.raises(InputError, match="needs weight_fisher.*--fisher"):
        compensate(staged["quant"], calib, recipe("compensate.method=espace", "compensate.espace_stat=grad"),
                   tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _calib_without(staged, tmp_path: Path, key: str) -> Path:
    """A copy of the calibration artifact whose stats lack one tensor."""
    calib = tmp_path / f"calib-no-{key}"
    calib.mkdir()
    (calib / "manifest.json").write_text((staged["calib"] / "manifest.json").read_text())
    stats = load_tensors(staged["calib"] / STATS_FILE)
    stats.pop(key)
    save_tensors(stats, calib / STATS_FILE)
    return calib


def cli(*args, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def test_cli_compensate_and_inspect(staged):
    out = staged["dir"] / "cli"
    res = json.loads(cli("compensate", staged["quant"], "--calib", staged["calib"], "-o", out,
                         "--set", "compensate.rank=4", "--set", "compensate.method=svd", "--json").stdout)
    assert res["stage"] == "compensate" and res["method"] == "svd" and res["rank"] == 4
    info = json.loads(cli("inspect", out, "--json").stdout)
    row = next(r for r in info["layers"] if r["layer"] == "model.layers.0.self_attn.q_proj")
    assert row["rank"] == 4 and row["method"] == "svd" and row["rel_output_error"] < row["rel_output_error_before"]
    assert "rank" in cli("inspect", out).stdout
    cli("verify", out)


@pytest.mark.parametrize("case, message", [
    ("missing-calib", "does not exist"),
    ("no-act-cov", "has no act_cov for layer model.layers.0.self_attn.q_proj"),
    ("rank-0", "compensate.rank=0"),
])
def test_cli_bad_input_is_one_line_exit_1(staged, tmp_path, case, message):
    calib, sets = staged["calib"], []
    if case == "missing-calib":
        calib = tmp_path / "nowhere"
    elif case == "no-act-cov":
        calib = _calib_without(staged, tmp_path, "model.layers.0.self_attn.q_proj.act_cov")
    else:
        sets = ["--set", "compensate.rank=0"]
    res = cli("compensate", staged["quant"], "--calib", calib, "-o", tmp_path / "out", *sets, code=1)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not (tmp_path / "out").exists()


def _correlated(n_in: int = 24, n_out: int = 16, seed: int = 0):
    """A layer whose input channels are strongly correlated, and a quantization-like error."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    X = torch.randn(4096, n_in, generator=g, dtype=torch.float64) @ mix
    C = (X.T @ X / X.shape[0]).float()
    W = torch.randn(n_out, n_in, generator=g)
    dW = 0.05 * torch.randn(n_out, n_in, generator=g)
    fisher = torch.rand(n_out, generator=g, dtype=torch.float64) * 10
    return W, W - dW, C, fisher


def _output_error(dW, B, A, C):
    E = (dW - B @ A).double()
    return float((E @ C.double() * E).sum())


@pytest.mark.parametrize("stat", ["act", "weight", "grad"])
def test_espace_residual_never_raises_the_output_error_and_its_curve_is_exact(stat):
    from lpc.pipeline.compensation.methods import LayerInputs, espace
    from lpc.recipes.schema import CompensateConfig

    W, Wq, C, g_out = _correlated()
    cfg = CompensateConfig(method="espace", espace_stat=stat, rank=4)
    path = espace(cfg, LayerInputs(W, Wq, C, g_in=C.diagonal(), g_out=g_out))
    curve = path.curve(12)
    dW = W - Wq
    none = _output_error(dW, torch.zeros(16, 1), torch.zeros(1, 24), C)
    assert curve[0] == pytest.approx(none, rel=1e-6)
    for r in (1, 4, 8, 12):
        B, A = path.factors(r)
        err = _output_error(dW, B, A, C)
        assert err == pytest.approx(curve[r], rel=1e-4, abs=1e-9)
        assert err < none and curve[r] <= curve[r - 1] + 1e-12
        # B is the least-squares fit for the kept directions: any other B on the same A does no better
        B_ls = torch.linalg.lstsq((A.double() @ C.double() @ A.double().T),
                                  (A.double() @ C.double() @ dW.double().T)).solution.T
        assert err <= _output_error(dW, B_ls.float(), A, C) * (1 + 1e-4)


def test_espace_act_residual_is_the_plain_projection():
    """For the activation statistic the fitted path is B = dW P, A = P^T up to a per-direction scale."""
    from lpc.pipeline.compensation.espace import espace_projection, espace_residual
    from lpc.pipeline.compensation.methods import LayerInputs, espace
    from lpc.recipes.schema import CompensateConfig

    W, Wq, C, _ = _correlated(seed=1)
    B, A = espace(CompensateConfig(method="espace", rank=6), LayerInputs(W, Wq, C)).factors(6)
    B0, A0 = espace_residual(W - Wq, espace_projection("act", 6, C))
    torch.testing.assert_close(B @ A, B0 @ A0, rtol=1e-4, atol=1e-5)


def test_the_unfitted_projection_can_raise_the_output_error():
    """Why the residual path fits B: two anti-correlated inputs whose errors cancel. Weight- and
    gradient-aware statistics keep the first channel; B = dW P then drops the second channel's
    cancelling half and leaves ~29x the error of no path at all. The fitted path stays below it."""
    from lpc.pipeline.compensation.espace import espace_projection, espace_residual
    from lpc.pipeline.compensation.methods import LayerInputs, espace
    from lpc.recipes.schema import CompensateConfig

    C = torch.tensor([[1.0, -0.99], [-0.99, 1.0]])
    dW = torch.tensor([[1.0, 0.9]])
    none = _output_error(dW, torch.zeros(1, 1), torch.zeros(1, 2), C)
    for stat in ("weight", "grad"):
        B, A = espace_residual(dW, espace_projection(stat, 1, C, W=dW, C_g=dW.T @ dW))
        assert _output_error(dW, B, A, C) > 10 * none
        x = LayerInputs(dW, torch.zeros_like(dW), C, g_out=torch.ones(1, dtype=torch.float64))
        B, A = espace(CompensateConfig(method="espace", espace_stat=stat, rank=1), x).factors(1)
        assert _output_error(dW, B, A, C) < none


@pytest.mark.parametrize("mode", ["eora", "espace-compress"])
def test_one_quantized_layer_resident_and_the_rest_copied(staged, monkeypatch, mode):
    """The stage reads one quantized layer at a time (never the whole artifact) and writes factors as
    each layer is done; the unchanged tensors are copied, the replaced ones (compress mode) are gone."""
    from safetensors import safe_open

    from lpc.pipeline.artifact.shards import ModelTensors
    import lpc.pipeline.export.stream as stream

    monkeypatch.setattr(ModelTensors, "load_all", lambda *a, **k: (_ for _ in ()).throw(AssertionError("load_all")))
    reads = []
    real = stream.ArtifactLayers.layer
    monkeypatch.setattr(stream.ArtifactLayers, "layer", lambda self, name: reads.append(name) or real(self, name))
    sets = ["compensate.method=espace", "compensate.mode=compress"] if mode != "eora" else []
    out = run(staged, f"resident-{mode}", *sets).out
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    with safe_open(str(staged["quant"] / "model.safetensors"), framework="pt") as fh:
        before = set(fh.keys())
    layers = sorted(json.loads((staged["quant"] / "config.json").read_text())["quantization_config"]["layers"])
    assert set(reads) == set(layers)
    compressed = [n for n, e in qconfig["lowrank"]["layers"].items() if e["mode"] == "compress"]
    assert (mode == "eora") == (not compressed)
    for n in layers:
        assert any(k.startswith(f"{n}.lora_") for k in keys), n
        packed = {k for k in before if k.startswith(f"{n}.") and not k.endswith(".weight")}
        assert (packed <= keys) == (n not in compressed), n
    assert {k for k in before if not any(k.startswith(f"{n}.") for n in layers)} <= keys
