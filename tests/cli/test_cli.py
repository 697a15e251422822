"""Every subcommand end to end on the tiny Llama through the CLI, plus the bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpc.cli.main import app

runner = CliRunner()


def lpc(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result


def one_line(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    """calibrate -> quantize -> export (lpc and dense), run once for the module."""
    d = tmp_path_factory.mktemp("stages")
    p = {k: d / k for k in ("calib", "quant", "lpc", "dense")}
    lpc("calibrate", tiny_model_dir, "--data", text_files["jsonl"], "--samples", 4, "--seq-len", 32, "-o", p["calib"])
    lpc("quantize", tiny_model_dir, "--recipe", "nvfp4", "--calib", p["calib"], "-o", p["quant"])
    lpc("export", p["quant"], "--format", "lpc", "-o", p["lpc"])
    lpc("export", p["quant"], "--format", "dense", "-o", p["dense"])
    return p


def test_formats_and_recipes_list_builtins():
    out = json.loads(lpc("formats", "--json").stdout)
    assert {"nvfp4", "fp8_e4m3"} <= set(out) and out["nvfp4"]["bits_per_weight"] == 4.5
    rec = json.loads(lpc("recipes", "--json").stdout)
    assert {"nvfp4", "fp8"} <= set(rec)


def test_stages_write_manifests(staged):
    calib = json.loads((staged["calib"] / "manifest.json").read_text())
    assert calib["stage"] == "calibrate" and calib["summary"]["samples"] == 4
    assert calib["layers"]["model.layers.0.mlp.down_proj"]["in_features"] == 40
    quant = json.loads((staged["quant"] / "manifest.json").read_text())
    down = quant["layers"]["model.layers.0.mlp.down_proj"]
    assert down["format"] == "nvfp4" and down["shape"] == [32, 40]  # 40 inputs: padded to 48, not refused
    assert 4.5 < quant["bits_per_weight"] < 4.8
    assert "lm_head" not in quant["layers"]
    assert set(quant["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_eval_inspect_verify(staged, tiny_model_dir, text_files):
    res = json.loads(lpc("eval", staged["lpc"], "--ppl", text_files["jsonl"], "--seq-len", 32,
                         "--baseline", tiny_model_dir, "--json").stdout)
    ppl, base = res["perplexity"][str(text_files["jsonl"])], res["baseline"]["perplexity"][str(text_files["jsonl"])]
    assert ppl > 1 and base > 1 and res["recovery"] == pytest.approx(min(1.0, base / ppl), rel=0.5)
    assert res["kl_to_baseline"][str(text_files["jsonl"])] > 0  # NVFP4 moves the predictions
    same = json.loads(lpc("eval", tiny_model_dir, "--ppl", text_files["jsonl"], "--seq-len", 32,
                          "--baseline", tiny_model_dir, "--json").stdout)
    assert same["kl_to_baseline"][str(text_files["jsonl"])] == 0.0
    dense = json.loads(lpc("eval", staged["dense"], "--ppl", text_files["jsonl"], "--seq-len", 32, "--json").stdout)
    assert dense["perplexity"][str(text_files["jsonl"])] == pytest.approx(ppl, rel=1e-5)
    info = json.loads(lpc("inspect", staged["lpc"], "--json").stdout)
    assert len(info["layers"]) == 14 and all(r["format"] == "nvfp4" for r in info["layers"])
    assert json.loads(lpc("verify", staged["lpc"], "--json").stdout)["layers"] == 14


def test_gate_failure_exits_3(staged, tiny_model_dir, text_files):
    res = lpc("eval", staged["lpc"], "--ppl", text_files["jsonl"], "--seq-len", 32, "--baseline", tiny_model_dir,
              "--fail-under-recovery", "2.0", code=3)
    assert "recovery" in res.output


def test_compress_runs_every_stage_and_resumes(tmp_path, tiny_model_dir, text_files):
    out = tmp_path / "run"
    args = ["compress", tiny_model_dir, "--recipe", "fp8", "--data", text_files["txt"], "--set", "calibrate.samples=2",
            "--set", "calibrate.seq_len=16", "-o", out, "--ppl", text_files["jsonl"], "--json"]
    first = json.loads(lpc(*args).stdout)
    assert [s["stage"] for s in first["stages"]] == ["calibrate", "quantize", "export"]
    assert not any(s["skipped"] for s in first["stages"]) and first["eval"]["recovery"] > 0.5
    second = json.loads(lpc(*args).stdout)
    assert all(s["skipped"] for s in second["stages"])
    assert (out / "manifest.json").is_file() and (out / "stages" / "eval" / "eval.json").is_file()
    assert (out / "stages" / "eval" / "manifest.json").is_file()
    card = (out / "README.md").read_text()  # the published model's card shows its evaluation...
    assert "## Evaluation" in card and "KL to baseline" in card
    assert "## Evaluation" not in (out / "stages" / "export" / "README.md").read_text()  # ...not its stage's
    lpc("verify", out)


def test_identical_inputs_give_identical_bytes(tmp_path, tiny_model_dir, text_files):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        lpc("compress", tiny_model_dir, "--recipe", "nvfp4", "--data", text_files["jsonl"],
            "--set", "calibrate.samples=3", "-o", out)
        m = json.loads((out / "manifest.json").read_text())
        digests.append((m["files"]["model.safetensors"], m["files"]["config.json"]))
    assert digests[0] == digests[1]


@pytest.mark.parametrize("args, message", [
    (["--set", "quantize.wieghts.format=nvfp4"], "unknown key 'quantize.wieghts'"),
    (["--set", "quantize.weights.format=nvfp5"], "unknown format 'nvfp5'"),
    (["--set", "quantize.weights.spec.scale_serch=1"], "unknown key 'scale_serch'"),
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
])
def test_bad_recipe_is_one_line_exit_1(tmp_path, tiny_model_dir, text_files, args, message):
    res = lpc("quantize", tiny_model_dir, "-o", tmp_path / "q", *args, code=1)
    assert message in one_line(res) and "Traceback" not in res.output
    assert not (tmp_path / "q").exists()


def test_missing_inputs_and_existing_output(tmp_path, tiny_model_dir, text_files, staged):
    res = lpc("calibrate", tmp_path / "nope", "--data", text_files["jsonl"], "-o", tmp_path / "c", code=1)
    assert "does not exist" in one_line(res)
    res = lpc("calibrate", tiny_model_dir, "--data", tmp_path / "missing.jsonl", "-o", tmp_path / "c", code=1)
    assert "does not exist" in one_line(res) and not (tmp_path / "c").exists()
    before = (staged["quant"] / "manifest.json").read_bytes()
    res = lpc("quantize", tiny_model_dir, "--recipe", "fp8", "-o", staged["quant"], code=1)
    assert "already exists" in one_line(res) and "--overwrite" in one_line(res)
    assert (staged["quant"] / "manifest.json").read_bytes() == before
    res = lpc("export", tmp_path, "-o", tmp_path / "e", code=1)
    assert "no manifest.json" in one_line(res)


def test_broken_artifact_is_refused(tmp_path, staged):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(staged["lpc"], broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    res = lpc("verify", broken, code=1)
    assert "does not match its sha256" in one_line(res)
    res = lpc("eval", tmp_path / "nothing-here", "--ppl", "x.jsonl", code=1)
    assert "does not exist" in one_line(res)


def test_nan_weights_are_refused(tmp_path, tiny_model_dir, text_files):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    res = lpc("quantize", bad, "-o", tmp_path / "q", code=1)
    assert "NaN or inf" in one_line(res) and "up_proj" in one_line(res)
    assert not (tmp_path / "q").exists()


def test_eval_runs_local_lm_eval_tasks(staged, tiny_model_dir, assets_dir, monkeypatch):
    monkeypatch.setenv("LPC_ASSETS", str(assets_dir))
    res = json.loads(lpc("eval", staged["lpc"], "--tasks", "arc_easy_local", "--limit", "6",
                         "--baseline", tiny_model_dir, "--json").stdout)
    row = res["tasks"]["arc_easy_local"]
    assert row["samples"] == 6 and 0.0 <= row["acc"] <= 1.0
    assert res["baseline"]["tasks"]["arc_easy_local"]["samples"] == 6 and res["recovery"] is not None
    res = lpc("eval", staged["lpc"], "--tasks", "no_such_task_anywhere", code=1)
    assert "no_such_task_anywhere" in one_line(res)


def test_allocate_then_quantize_with_the_plan_alone(tmp_path, tiny_model_dir, text_files):
    """`lpc allocate` writes alloc/; `lpc quantize --plan alloc/` takes recipe and calibration from it."""
    calib, alloc, quant = tmp_path / "calib", tmp_path / "alloc", tmp_path / "quant"
    lpc("calibrate", tiny_model_dir, "--data", text_files["jsonl"], "--samples", 4, "--seq-len", 32, "--fisher",
        "-o", calib)
    lpc("allocate", calib, "--recipe", "fgmp_nvfp4a16", "--set", "allocate.fraction=0.2", "--set",
        "quantize.method=rtn", "-o", alloc)
    plan = json.loads((alloc / "manifest.json").read_text())
    assert plan["stage"] == "allocate" and plan["recipe"]["allocate"]["fraction"] == 0.2
    res = json.loads(lpc("quantize", tiny_model_dir, "--plan", alloc, "-o", quant, "--json").stdout)
    manifest = json.loads((quant / "manifest.json").read_text())
    assert manifest["config"]["calib"] == str(calib) and manifest["config"]["plan"] == str(alloc)
    assert manifest["recipe"]["name"] == "fgmp_nvfp4a16" and res["quantized_layers"] > 0
    assert {r["format"] for r in manifest["layers"].values()} == {"fgmp"}
    res = lpc("allocate", calib, "--recipe", "vapr", "--set", "allocate.budget_bits=null", "-o", tmp_path / "v", code=1)
    assert "needs a budget" in one_line(res) and not (tmp_path / "v").exists()
