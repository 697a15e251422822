"""`lpc eval --baseline REPORT.json`: the original evaluated once, its saved report reused for every
compressed model, with the comparison and the gate a baseline model gives (KL needs the model)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lpc.cli.main import app

ARC = [{"id": f"q{i}", "question": f"Which number is {i}?", "answerKey": "ABCD"[i % 4],
        "choices": {"text": [str(i), str(i + 1), "cat", "dog"], "label": ["A", "B", "C", "D"]}} for i in range(6)]


def lpc(*args, code: int = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


@pytest.fixture
def setup(tmp_path, tiny_model_dir, text_files, monkeypatch):
    """(original dir, perturbed copy dir, text file, tasks data dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LPC_TASKS_DATA", "")  # undone after the test (--tasks-data sets it)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "other")
    (tmp_path / "mc").mkdir()
    (tmp_path / "mc" / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    return tiny_model_dir, tmp_path / "other", text_files["txt"], tmp_path / "mc"


def test_saved_report_gives_the_comparison_of_the_model(setup, tmp_path):
    orig, other, txt, mc = setup
    common = ["--ppl", txt, "--seq-len", 32, "--tasks", "arc_easy_local", "--tasks-data", mc]
    saved = tmp_path / "original.json"
    saved.write_text(lpc("eval", orig, *common, "--json").stdout)
    with_model = json.loads(lpc("eval", other, *common, "--baseline", orig, "--json").stdout)
    with_report = json.loads(lpc("eval", other, *common, "--baseline", saved, "--json").stdout)
    assert with_report["compare"] == with_model["compare"]
    assert with_report["recovery"] == with_model["recovery"] != 1.0
    assert with_report["baseline"]["tasks"] == with_model["baseline"]["tasks"]
    assert with_report["baseline"]["report"] == str(saved)
    assert "kl_to_baseline" in with_model and "kl_to_baseline" not in with_report  # KL needs the model
    # an eval artifact directory (-o DIR) is a saved report too, and the gate applies to it
    lpc("eval", orig, *common, "-o", tmp_path / "orig-eval")
    gate = with_model["recovery"] + 0.001
    res = lpc("eval", other, *common, "--baseline", tmp_path / "orig-eval", "--fail-under-recovery", gate,
              "--json", code=3)
    assert json.loads(res.stdout)["recovery"] == with_model["recovery"]


def test_saved_report_must_hold_what_is_asked(setup, tmp_path):
    orig, other, txt, mc = setup
    saved = tmp_path / "original.json"
    saved.write_text(lpc("eval", orig, "--ppl", txt, "--seq-len", 32, "--json").stdout)
    res = lpc("eval", other, "--ppl", txt, "--seq-len", 32, "--tasks", "arc_easy_local", "--tasks-data", mc,
              "--baseline", saved, code=1)
    assert "lacks" in res.output and "arc_easy_local" in res.output
    res = lpc("eval", other, "--ppl", txt, "--seq-len", 16, "--baseline", saved, code=1)  # other protocol
    assert "differs" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert "not an lpc eval report" in lpc("eval", other, "--ppl", txt, "--baseline", bad, code=1).output
