"""Model cards in every artifact, and the recovery gate recorded in eval.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.pipeline.artifact.card import model_card


def lpc(*args, code: int = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cards")
    lpc("calibrate", tiny_model_dir, "--data", text_files["jsonl"], "--samples", 2, "--seq-len", 16, "-o", d / "calib")
    lpc("quantize", tiny_model_dir, "--recipe", "nvfp4", "--calib", d / "calib", "-o", d / "quant")
    lpc("export", d / "quant", "--format", "lpc", "-o", d / "lpc")
    lpc("export", d / "quant", "--format", "dense", "-o", d / "dense")
    return {p.name: p for p in d.iterdir()}


def test_every_artifact_has_a_card_listed_in_its_manifest(run, tiny_model_dir):
    for name, d in run.items():
        card = (d / "README.md").read_text()
        manifest = json.loads((d / "manifest.json").read_text())
        assert "README.md" in manifest["files"], name
        assert card.startswith("---\nlibrary_name: transformers") and f"# {name}" in card
    quant = (run["quant"] / "README.md").read_text()
    assert f"| source model | {tiny_model_dir} |" in quant and "`nvfp4` (weights nvfp4" in quant
    assert "| bits per weight | 4." in quant and "nvfp4 x14" in quant and 'lpc.load("quant")' in quant
    assert "AutoModelForCausalLM.from_pretrained(\"dense\")" in (run["dense"] / "README.md").read_text()
    assert "## How to load" not in (run["calib"] / "README.md").read_text()


def test_export_rewrites_the_card_without_touching_the_source(run):
    """The lpc exporter may hard-link the source's files: the card must replace, not write through."""
    assert "# quant" in (run["quant"] / "README.md").read_text()
    assert "# lpc" in (run["lpc"] / "README.md").read_text()
    lpc("verify", run["quant"])


def test_card_is_deterministic_and_shows_evaluation():
    manifest = {"stage": "export", "lpc_version": "1", "config": {"format": "lpc"}, "bits_per_weight": 4.5,
                "recipe": {"name": "nvfp4", "quantize": {"weights": {"format": "nvfp4"}, "method": "rtn"}}}
    report = {"perplexity": {"/x/held.jsonl": 6.5}, "recovery": 0.97,
              "gate": {"fail_under_recovery": 0.99, "passed": False}, "tasks": {"arc_easy_local": {"acc": 0.5}}}
    card = model_card("out", manifest, report)
    assert card == model_card("out", manifest, report)
    for row in ("| perplexity held.jsonl | 6.5000 |", "| recovery (vs baseline) | 0.9700 |",
                "| gate | recovery >= 0.99: FAILED |", "| arc_easy_local acc | 0.5000 |"):
        assert row in card


@pytest.mark.parametrize("gate, code, passed", [(0.5, 0, True), (2.0, 3, False)])
def test_eval_json_records_the_gate(run, tiny_model_dir, text_files, tmp_path, gate, code, passed):
    out = tmp_path / "eval"
    lpc("eval", run["lpc"], "--ppl", text_files["jsonl"], "--seq-len", 16, "--baseline", tiny_model_dir,
        "--fail-under-recovery", gate, "-o", out, code=code)
    report = json.loads((out / "eval.json").read_text())
    assert report["gate"] == {"fail_under_recovery": gate, "passed": passed}
    assert f"recovery >= {gate}: {'passed' if passed else 'FAILED'}" in (out / "README.md").read_text()


def test_eval_without_a_gate_records_none(run, text_files):
    res = json.loads(lpc("eval", run["lpc"], "--ppl", text_files["jsonl"], "--seq-len", 16, "--json").stdout)
    assert "gate" not in res or res["gate"] is None
