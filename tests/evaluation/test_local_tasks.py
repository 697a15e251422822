"""Built-in local tasks: data from --tasks-data / LPC_TASKS_DATA, and hub tasks offline point at them."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.pipeline.evaluation.tasks import builtin_task_names

ARC = [{"id": f"q{i}", "question": f"Which number is {i}?", "answerKey": "ABCD"[i % 4],
        "choices": {"text": [str(i), str(i + 1), "cat", "dog"], "label": ["A", "B", "C", "D"]}} for i in range(5)]


def lpc(*args, code: int = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def test_builtin_tasks_are_listed():
    assert builtin_task_names() == ["arc_challenge_local", "arc_easy_local", "openbookqa_local", "piqa_local",
                                    "winogrande_local"]


def test_tasks_data_option_points_the_builtin_tasks_at_a_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LPC_TASKS_DATA", "")  # recorded, so the value --tasks-data sets is undone after the test
    monkeypatch.setenv("LPC_ASSETS", str(tmp_path / "nowhere"))
    (tmp_path / "mc").mkdir()
    (tmp_path / "mc" / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    res = json.loads(lpc("eval", tiny_model_dir, "--tasks", "arc_easy_local", "--tasks-data", tmp_path / "mc",
                         "--json").stdout)
    assert res["tasks"]["arc_easy_local"]["samples"] == 5


def test_missing_task_data_names_the_option_and_variable(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LPC_TASKS_DATA", str(tmp_path / "none"))
    res = lpc("eval", tiny_model_dir, "--tasks", "arc_easy_local", "--limit", 2, code=1)
    text = " ".join(res.output.split())
    assert "--tasks-data" in text and "LPC_TASKS_DATA" in text


def test_hub_task_offline_names_the_local_tasks(tiny_model_dir, monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = lpc("eval", tiny_model_dir, "--tasks", "arc_easy", "--limit", 2, code=1)
    text = " ".join(res.output.split())
    assert "offline" in text and "arc_easy_local" in text and "piqa_local" in text
