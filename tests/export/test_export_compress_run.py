"""`lpc compress -o out/` writes the finished model into out/ (stages under out/stages/, weights once);
every command works on out/ directly; a failed run never blocks its corrected re-run; --overwrite and
re-runs keep nothing stale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.errors import ArtifactError
from lpc.recipes import load_recipe

SMALL = ["calibrate.samples=3", "calibrate.seq_len=16"]


def _compress(model: Path, out: Path, recipe: str, data: Path, sets: list[str] | None = None, **kw):
    return stages.compress(str(model), load_recipe(recipe, SMALL + (sets or [])), str(data), out, **kw)


def _cli(*args: object) -> dict:
    from lpc.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("compress-runs")
    _compress(tiny_model_dir, d / "ct", "nvfp4", text_files["jsonl"])
    _compress(tiny_model_dir, d / "lpc", "bcq", text_files["jsonl"])  # no engine format holds BCQ: auto keeps lpc
    return {"ct": d / "ct", "lpc": d / "lpc"}


def test_out_is_the_finished_model_with_stages_inside(runs):
    out = runs["ct"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "compress.json", "summary.json", "stages"} <= names
    assert {p.name for p in (out / "stages").iterdir()} == {"calib", "quant", "export"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "compressed-tensors" and summary["artifact"] == str(out)
    assert "every quantized layer" in summary["format_reason"]


@pytest.mark.parametrize("kind", ["ct", "lpc"])
def test_weights_are_stored_once(runs, kind):
    out = runs[kind]
    top = (out / "model.safetensors").stat()
    assert top.st_ino == (out / "stages" / "export" / "model.safetensors").stat().st_ino
    if kind == "lpc":  # an lpc export is the quant artifact's bytes: one inode for all three names
        assert top.st_ino == (out / "stages" / "quant" / "model.safetensors").stat().st_ino


@pytest.mark.parametrize("kind", ["ct", "lpc"])
def test_every_command_and_from_pretrained_work_on_out(runs, kind, text_files, tmp_path):
    from transformers import AutoModelForCausalLM

    out = runs[kind]
    assert _cli("verify", out)["ok"]
    assert _cli("inspect", out)["layers"]
    ev = _cli("eval", out, "--ppl", text_files["jsonl"], "--seq-len", 32)
    assert _cli("export", out, "--format", "dense", "-o", tmp_path / "dense")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref, tok = load(out, dtype=torch.float32)
    ids = tok("once upon a time there was a little girl", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - ref(ids).logits).abs().max().item()
    assert diff == 0.0
    assert ev["perplexity"][str(text_files["jsonl"])] > 1


def test_failed_run_does_not_block_its_corrected_rerun(tmp_path, tiny_model_dir, text_files):
    out = tmp_path / "run"
    with pytest.raises(Exception):  # nvfp4 calibrates (fp8 needs no data and would not read the file)
        _compress(tiny_model_dir, out, "nvfp4", tmp_path / "calib.jsnol")
    assert not (out / "compress.json").exists()
    summary = _compress(tiny_model_dir, out, "fp8", text_files["jsonl"])
    assert summary["format"] == "compressed-tensors" and (out / "compress.json").is_file()


def test_finished_run_of_other_inputs_is_refused_and_overwrite_keeps_nothing_stale(tmp_path, tiny_model_dir,
                                                                                  text_files):
    out = tmp_path / "run"
    _compress(tiny_model_dir, out, "nvfp4_eora", text_files["jsonl"], ppl=[str(text_files["jsonl"])])
    assert (out / "stages" / "comp").is_dir() and (out / "stages" / "eval").is_dir()
    with pytest.raises(ArtifactError, match="holds another run"):
        _compress(tiny_model_dir, out, "fp8", text_files["jsonl"])
    summary = _compress(tiny_model_dir, out, "fp8", text_files["jsonl"], overwrite=True)
    assert {p.name for p in (out / "stages").iterdir()} == {"calib", "quant", "export"}  # no comp, no eval
    assert "eval" not in summary and "eval" not in json.loads((out / "summary.json").read_text())
    assert json.loads((out / "compress.json").read_text())["recipe"]["name"] == "fp8"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_foreign_directory_is_refused(tmp_path, tiny_model_dir, text_files):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="files lpc did not write"):
        _compress(tiny_model_dir, out, "fp8", text_files["jsonl"])
    assert (out / "notes.txt").read_text() == "keep me"
