"""Progress and logging as CI sees them: plain lines when stderr is not a terminal, bars otherwise."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from typer.testing import CliRunner

from lpc.cli import render
from lpc.cli.main import app


def test_line_progress_reports_start_rate_limited_steps_and_end():
    lines, now = [], [0.0]
    p = render.LineProgress(write=lines.append, interval=5.0, clock=lambda: now[0])
    p("quantize", 0, 10)
    for i in range(1, 11):
        now[0] = i * 1.0  # one step a second: a line every 5 s at most, plus the last
        p("quantize", i, 10)
    assert lines == ["lpc: quantize started (10 steps)",
                     "lpc: quantize 5/10 (50%) elapsed 0:00:05 eta 0:00:05",
                     "lpc: quantize 10/10 (100%) elapsed 0:00:10 done"]


def test_line_progress_without_a_total_counts_steps():
    lines = []
    p = render.LineProgress(write=lines.append, interval=0.0, clock=lambda: 0.0)
    p("fisher", 0, None)
    p("fisher", 3, None)
    assert lines == ["lpc: fisher started", "lpc: fisher step 3 elapsed 0:00:00"]


def test_progress_factory_gives_lines_off_a_terminal():
    assert isinstance(render.progress(True), render.LineProgress)  # pytest's stderr is not a TTY


def test_cli_writes_progress_lines_without_a_tty(tmp_path, tiny_model_dir, text_files, monkeypatch):
    monkeypatch.setenv("LPC_PROGRESS_INTERVAL", "0")
    res = CliRunner().invoke(app, ["calibrate", str(tiny_model_dir), "--data", str(text_files["jsonl"]),
                                   "--samples", "3", "--seq-len", "16", "-o", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "lpc: calibrate (layer by layer) started (2 steps)" in res.stderr
    assert "lpc: calibrate (layer by layer) 2/2 (100%)" in res.stderr and " done" in res.stderr


def test_subprocess_piped_like_ci_gets_lines_and_warnings(tmp_path, tiny_model_dir, text_files):
    """`lpc ... 2>&1 | tee log`: the log holds the progress lines and the warning about short data."""
    short = tmp_path / "short.txt"
    short.write_text("once upon a time")
    env = {**os.environ, "LPC_PROGRESS_INTERVAL": "0", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "lpc", "calibrate", str(tiny_model_dir), "--data", str(short),
                          "--samples", "2", "--seq-len", "32", "-o", str(tmp_path / "c")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "lpc: calibrate (layer by layer) started" in res.stderr
    assert "WARNING: lpc.pipeline.io.data: calibration data" in res.stderr and "tokens in all" in res.stderr


def test_logging_goes_through_one_handler_on_the_lpc_logger():
    render.setup_logging(debug=False)
    render.setup_logging(debug=True)
    ours = [h for h in logging.getLogger("lpc").handlers if getattr(h, "lpc_cli", False)]
    assert len(ours) == 1 and logging.getLogger("lpc").level == logging.DEBUG
    render.setup_logging(debug=False)


def test_rich_logging_prints_above_the_bars(monkeypatch):
    """On a terminal the log handler writes through the progress console (rich keeps bars below)."""
    from rich.console import Console
    from rich.logging import RichHandler

    monkeypatch.setattr(render, "console", Console(force_terminal=True, file=open(os.devnull, "w")))
    render.setup_logging(debug=False)
    try:
        ours = [h for h in logging.getLogger("lpc").handlers if getattr(h, "lpc_cli", False)]
        assert isinstance(ours[0], RichHandler) and ours[0].console is render.console
        assert isinstance(render.progress(True), render.RichProgress)
    finally:
        monkeypatch.undo()
        render.setup_logging(debug=False)


def test_inspect_piped_keeps_full_layer_names(tmp_path, tiny_model_dir):
    quant = tmp_path / "q"
    assert CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--recipe", "fp8", "-o", str(quant)]).exit_code == 0
    res = CliRunner().invoke(app, ["inspect", str(quant)], terminal_width=60)
    assert res.exit_code == 0
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.self_attn.{leaf}" in res.stdout or f"model.layers.0.mlp.{leaf}" in res.stdout
