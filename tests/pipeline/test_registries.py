"""Every pluggable concept is a registry: names listed, unknown names refused with the valid ones,
duplicates refused, and a new handler is one registration away from the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.formats.errors import LpcError
from lpc.formats.registry import Registry
from lpc.pipeline import stages
from lpc.pipeline.allocation import ALLOCATION_POLICIES
from lpc.pipeline.compensation import COMPENSATION_METHODS
from lpc.pipeline.export import EXPORTERS
from lpc.pipeline.quantization import QUANTIZE_METHODS
from lpc.recipes import load_recipe

REGISTRIES = {
    "quantize method": (QUANTIZE_METHODS, {"rtn", "gptq", "distill"}),
    "allocation policy": (ALLOCATION_POLICIES, {"fgmp", "random", "magnitude", "vapr"}),
    "compensation method": (COMPENSATION_METHODS, {"eora", "svd", "espace"}),
    "export format": (EXPORTERS, {"lpc", "dense", "peft", "compressed-tensors"}),
}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_registry_lists_its_handlers_and_refuses_unknown_names(kind):
    reg, expected = REGISTRIES[kind]
    assert expected <= set(reg.names())
    with pytest.raises(LpcError, match=f"unknown {kind} 'nope'.*known {kind}s: .*" + ".*".join(sorted(expected)[:2])):
        reg.get("nope")


def test_names_normalize_and_duplicates_are_refused():
    reg: Registry[int] = Registry("thing")
    reg.add("Two-Words", 2)
    assert reg.get("two_words") == 2 and "TWO-WORDS" in reg and reg.names() == ["Two-Words"]
    with pytest.raises(LpcError, match="'two_words' is registered twice"):
        reg.add("two_words", 3)


@pytest.mark.parametrize("override, kind", [("allocate.policy=best", "allocation policy"),
                                             ("compensate.method=pca", "compensation method"),
                                             ("export.format=onnx", "export format")])
def test_recipe_names_are_checked_against_the_registries(override, kind):
    recipe = load_recipe("fgmp_nvfp4a16", [override])  # the schema takes any name; the pipeline knows which exist
    with pytest.raises(LpcError, match=f"unknown {kind} '{override.split('=')[1]}'"):
        stages.check_recipe_names(recipe)


def test_unknown_names_in_a_recipe_fail_before_any_work(tmp_path, tiny_model_dir, text_files):
    res = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--data", str(text_files["txt"]), "-o",
                                   str(tmp_path / "run"), "--set", "quantize.method=magic"])
    assert res.exit_code == 1 and "unknown quantize method 'magic'" in res.output and "gptq" in res.output
    assert not (tmp_path / "run" / "calib").exists()


def test_a_registered_exporter_is_reachable_from_the_stage(tmp_path, tiny_model_dir):
    quant = stages.quantize(str(tiny_model_dir), load_recipe("fp8"), tmp_path / "q").out

    def config_only(src: Path, tmp: Path) -> dict:
        (tmp / "config.json").write_bytes((src / "config.json").read_bytes())
        return {"note": "config only"}

    EXPORTERS.add("config-only", config_only)
    try:
        result = stages.export(quant, tmp_path / "e", "config-only")
    finally:
        EXPORTERS.remove("config-only")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert result.summary()["note"] == "config only" and set(manifest["files"]) == {"config.json", "README.md"}
    assert "config-only" not in EXPORTERS
