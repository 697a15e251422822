"""The pictures: `lpc inspect --plot` on VaPr, FGMP and allocation artifacts, and the Pareto front,
checked through matplotlib's objects (legend entries, axis labels, annotations)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.pipeline.artifact import plots

SMALL = ["--set", "calibrate.samples=4", "--set", "calibrate.seq_len=24"]
PNG = b"\x89PNG\r\n\x1a\n"


def lpc(*args, code: int = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures plots.py saves, kept for inspection."""
    saved = []
    real = plots._save

    def keep(fig, path):
        saved.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("plots")
    lpc("calibrate", tiny_model_dir, "--data", text_files["jsonl"], "--fisher", *SMALL, "-o", d / "calib")
    lpc("allocate", d / "calib", "--recipe", "fgmp_nvfp4a16", "--set", "quantize.method=rtn", "-o", d / "fgmp-alloc")
    lpc("quantize", tiny_model_dir, "--plan", d / "fgmp-alloc", "-o", d / "fgmp-quant")
    lpc("allocate", d / "calib", "--recipe", "vapr", "--set", "allocate.budget_bits=6.0",
        "--set", "allocate.pareto_budgets=[5.0,6.0,8.0]", "--set", "quantize.method=rtn", "-o", d / "vapr-alloc")
    lpc("quantize", tiny_model_dir, "--plan", d / "vapr-alloc", "-o", d / "vapr-quant")
    return {p.name: p for p in d.iterdir()}


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_inspect_plot_on_an_allocation_artifact(artifacts, tmp_path, figures):
    """Issue 9 defect 4: this failed with 'plot_precision_map got no layers'."""
    for name in ("fgmp-alloc", "vapr-alloc"):
        lpc("inspect", artifacts[name], "--plot", tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG


def test_vapr_plot_colours_layers_by_format_with_budget_line(artifacts, tmp_path, figures):
    lpc("inspect", artifacts["vapr-quant"], "--plot", tmp_path / "vapr.png")
    fig = figures[-1]
    ax = fig.axes[0]
    labels = _legend(fig)
    manifest = json.loads((artifacts["vapr-quant"] / "manifest.json").read_text())
    formats = {r["format"] for r in manifest["layers"].values()}
    assert "budget 6 bits" in labels
    assert {lab.split(" (")[0] for lab in labels if not lab.startswith("budget")} == formats
    assert ax.get_xlabel() == "bits per weight" and len(ax.get_yticklabels()) == len(manifest["layers"])
    budget_lines = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [6.0, 6.0]]
    assert budget_lines and budget_lines[0].get_linestyle() == "--"


def test_fgmp_plot_is_the_block_heat_map(artifacts, tmp_path, figures):
    lpc("inspect", artifacts["fgmp-quant"], "--plot", tmp_path / "fgmp.png")
    ax = figures[-1].axes[0]
    assert ax.get_title() == "fraction of blocks kept high (FP8) per layer"
    assert ax.get_xlabel().startswith("input block position")
    assert ax.images and ax.images[0].get_array().shape[0] == 14  # one row per target layer
    assert figures[-1].axes[1].get_ylabel() == "fraction high"  # the colour bar


def test_allocation_and_quant_masks_agree(artifacts):
    from lpc.pipeline.artifact.store import read_manifest

    a = plots.artifact_masks(artifacts["fgmp-alloc"], read_manifest(artifacts["fgmp-alloc"]))
    q = plots.artifact_masks(artifacts["fgmp-quant"], read_manifest(artifacts["fgmp-quant"]))
    assert a.keys() == q.keys() and all(torch.equal(a[k], q[k]) for k in a)


def test_pareto_plot_shows_measured_increase_budgets_and_chosen_plan(artifacts, tmp_path, figures):
    data = json.loads((artifacts["vapr-alloc"] / "pareto.json").read_text())
    plots.plot_pareto(data["points"], tmp_path / "p.png", chosen_budget=6.0)
    fig = figures[-1]
    ax, ax2 = fig.axes
    assert ax.get_ylabel() == "predicted loss increase" and ax2.get_ylabel() == "measured loss increase"
    measured = sorted((p["bits_per_weight"], p["measured_loss_increase"]) for p in data["points"])
    assert list(ax2.get_lines()[0].get_ydata()) == pytest.approx([m for _, m in measured])
    assert sorted(t.get_text() for t in ax.texts) == ["5", "6", "8"]
    assert "chosen plan (6 bits)" in _legend(fig)
    assert (artifacts["vapr-alloc"] / "pareto.png").read_bytes()[:8] == PNG


def test_plot_formats_refuses_nothing_to_draw(tmp_path):
    from lpc.pipeline.errors import InputError

    with pytest.raises(InputError, match="no layers"):
        plots.plot_formats({}, tmp_path / "x.png")
