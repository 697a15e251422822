"""`--device`: an unknown device or CUDA on a machine without it is one red line, exit 1, nothing written;
on a GPU, plain rounding packs the same bytes as on the CPU. `--max-shard-size` splits the weights."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.pipeline.errors import InputError
from lpc.pipeline.io.device import check_device

runner = CliRunner()
NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("given, expected", [("cpu", "cpu"), ("CPU", "cpu"), (None, "cpu")])
def test_cpu_is_accepted(given, expected):
    assert check_device(given) == expected


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", "", "cpu:0:1"])
def test_unknown_device_names_the_valid_ones(bad):
    with pytest.raises(InputError, match="unknown device") as err:
        check_device(bad)
    assert "cuda" in err.value.hint


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here: the refusal is for machines without it")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(InputError, match="--device cuda"):
        check_device("cuda")


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cuda_index_out_of_range_is_refused():
    with pytest.raises(InputError, match="visible"):
        check_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("command", ["calibrate", "quantize", "compress"])
@pytest.mark.parametrize("device", ["gpu0", *(["cuda"] if NO_CUDA else [])])
def test_every_stage_refuses_a_bad_device_before_writing(tmp_path, tiny_model_dir, text_files, command, device):
    out = tmp_path / "out"
    args = {"calibrate": ["calibrate", tiny_model_dir, "--data", text_files["jsonl"]],
            "quantize": ["quantize", tiny_model_dir, "--recipe", "fp8"],
            "compress": ["compress", tiny_model_dir, "--recipe", "nvfp4", "--data", text_files["jsonl"]]}[command]
    res = runner.invoke(app, [str(a) for a in args] + ["--device", device, "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "AssertionError" not in res.output
    assert "device" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_eval_refuses_a_bad_device_before_writing(tmp_path, tiny_model_dir, text_files):
    res = runner.invoke(app, ["eval", str(tiny_model_dir), "--ppl", str(text_files["txt"]), "--device", "npu",
                              "-o", str(tmp_path / "e")])
    assert res.exit_code == 1 and "unknown device" in " ".join(res.output.split())
    assert not (tmp_path / "e").exists()


def test_quantize_max_shard_size_writes_shards(tmp_path, tiny_model_dir):
    res = runner.invoke(app, ["quantize", str(tiny_model_dir), "--recipe", "fp8", "--max-shard-size", "20KB",
                              "-o", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    bad = runner.invoke(app, ["quantize", str(tiny_model_dir), "--recipe", "fp8", "--max-shard-size", "lots",
                              "-o", str(tmp_path / "q2")])
    assert bad.exit_code == 1 and "not a size" in bad.output and not (tmp_path / "q2").exists()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cuda_rounding_packs_the_same_bytes_as_cpu(tmp_path, tiny_model_dir):
    from lpc.pipeline import stages
    from lpc.recipes import load_recipe

    for recipe in ("fp8", "nvfp4"):
        r = load_recipe(recipe, ["quantize.weights.spec.scale_search=0"] if recipe == "nvfp4" else [])
        stages.quantize(str(tiny_model_dir), r, tmp_path / f"cpu-{recipe}")
        stages.quantize(str(tiny_model_dir), r, tmp_path / f"gpu-{recipe}", device="cuda")
        assert (tmp_path / f"cpu-{recipe}" / "model.safetensors").read_bytes() == \
            (tmp_path / f"gpu-{recipe}" / "model.safetensors").read_bytes()
