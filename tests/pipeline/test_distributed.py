"""Data-parallel calibration: `torchrun --nproc-per-node 2 -m lpc.cli calibrate` (gloo, CPU) writes the
same artifact as one process, byte for byte."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lpc.pipeline import stages
from lpc.recipes import load_recipe

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not dist.is_available() or not TORCHRUN.is_file(), reason="torch.distributed / torchrun absent")
@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4_eora"])
def test_two_processes_equal_one_byte_for_byte(tmp_path, tiny_model_dir, text_files, recipe):
    sets = ["calibrate.samples=5", "calibrate.seq_len=16"]  # 5 samples: the last round leaves rank 1 idle
    one = stages.calibrate(str(tiny_model_dir), str(text_files["txt"]), tmp_path / "a" / "calib", load_recipe(recipe, sets))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
           "-m", "lpc.cli", "calibrate", str(tiny_model_dir), "--data", str(text_files["txt"]), "--recipe", recipe,
           *sum((["--set", s] for s in sets), []), "-o", str(tmp_path / "b" / "calib")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    for name in one.manifest["files"]:
        assert (tmp_path / "b" / "calib" / name).read_bytes() == (tmp_path / "a" / "calib" / name).read_bytes(), name
    assert (tmp_path / "b" / "calib" / "manifest.json").read_text() == (tmp_path / "a" / "calib" / "manifest.json").read_text()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["calib"]  # no staging left behind
    shutil.rmtree(tmp_path / "b" / "calib")
