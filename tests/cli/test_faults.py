"""The fault matrix: crafted manifests never make lpc read or write outside the artifact, damaged
artifacts are refused by eval as by verify, and input errors are one red line with exit 1."""
from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpc.cli.main import app

runner = CliRunner()


def lpc(*args, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return res


def one_line(res) -> str:
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def quant(tmp_path_factory, tiny_model_dir, text_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("faults")
    lpc("calibrate", tiny_model_dir, "--data", text_files["jsonl"], "--samples", 2, "--seq-len", 16, "-o", d / "calib")
    lpc("quantize", tiny_model_dir, "--recipe", "nvfp4", "--calib", d / "calib", "-o", d / "quant")
    return {"calib": d / "calib", "quant": d / "quant"}


def _crafted(tmp_path: Path, src: Path, kind: str, stage: str | None = None) -> tuple[Path, Path]:
    """A copy of `src` whose manifest lists a file outside it (with the right sha256, so a naive
    check passes); returns (artifact, the outside file)."""
    art = tmp_path / "work" / "art"
    shutil.copytree(src, art)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the artifact\n")
    name = {"dotdot": "../../secret.txt", "absolute": str(secret), "symlink": "link.txt"}[kind]
    if kind == "symlink":
        (art / "link.txt").symlink_to(secret)
    m = json.loads((art / "manifest.json").read_text())
    m["files"][name] = hashlib.sha256(secret.read_bytes()).hexdigest()
    if stage:
        m["stage"] = stage
    (art / "manifest.json").write_text(json.dumps(m))
    return art, secret


@pytest.fixture
def opened(monkeypatch):
    """Paths of every file Python opens during the test."""
    seen: list[str] = []
    real = builtins.open

    def spy(file, *args, **kwargs):
        seen.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_crafted_manifest_is_refused_by_every_reader(tmp_path, quant, tiny_model_dir, text_files, kind, opened):
    art, secret = _crafted(tmp_path, quant["quant"], kind)
    victim = tmp_path / "work" / "secret.txt"  # where `../secret.txt` of an export's staging dir points
    victim.write_text("keep me\n")
    runs = [("verify", art), ("inspect", art), ("export", art, "-o", tmp_path / "work" / "out"),
            ("eval", art, "--ppl", text_files["jsonl"], "--seq-len", 16),
            ("compensate", art, "--calib", quant["calib"], "-o", tmp_path / "comp")]
    for args in runs:
        res = lpc(*args, code=1)
        assert "outside the artifact" in one_line(res), (args, res.output)
    plan, _ = _crafted(tmp_path / "p", quant["quant"], kind, stage="allocate")
    res = lpc("quantize", tiny_model_dir, "--plan", plan, "-o", tmp_path / "q2", code=1)
    assert "outside the artifact" in one_line(res)
    assert not any(Path(p).name in ("secret.txt", "link.txt") for p in opened)  # never read
    assert victim.read_text() == "keep me\n" and secret.read_text() == "outside the artifact\n"
    assert not (tmp_path / "work" / "out").exists() and not (tmp_path / "comp").exists()


def test_artifact_file_resolver():
    from lpc.pipeline.artifact.store import artifact_file
    from lpc.pipeline.errors import ArtifactError

    assert artifact_file("/a/b", "adapter/x.json") == Path("/a/b/adapter/x.json").resolve()
    for bad in ["../x", "/etc/passwd", "a/../../x", "", ".", "a\\..\\x", 5]:
        with pytest.raises(ArtifactError, match="outside the artifact"):
            artifact_file("/a/b", bad)


def test_eval_refuses_a_changed_or_unmanifested_artifact(tmp_path, quant, text_files):
    flipped = tmp_path / "flipped"
    shutil.copytree(quant["quant"], flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    res = lpc("eval", flipped, "--ppl", text_files["jsonl"], "--seq-len", 16, code=1)
    assert "does not match its sha256" in one_line(res)
    bare = tmp_path / "bare"
    shutil.copytree(quant["quant"], bare)
    (bare / "manifest.json").unlink()
    res = lpc("eval", bare, "--ppl", text_files["jsonl"], "--seq-len", 16, code=1)
    assert "without manifest.json" in one_line(res)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from lpc.pipeline.artifact import store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from lpc.pipeline.artifact import shards

    monkeypatch.setattr(store, "save_file", full)
    monkeypatch.setattr(shards, "save_file", full)  # layer spills
    monkeypatch.setattr(shards, "_copy", full)  # files written tensor by tensor
    res = lpc("quantize", tiny_model_dir, "--recipe", "fp8", "-o", tmp_path / "q", code=1)
    assert "the disk is full" in one_line(res) and "MB" in one_line(res) and "free" in one_line(res)
    assert os.listdir(tmp_path) == []  # neither the output nor its hidden staging folder


def test_stale_staging_of_dead_processes_is_removed(tmp_path, tiny_model_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".q.tmp-{dead.pid}"
    (stale / "x").mkdir(parents=True)
    alive = tmp_path / f".other.tmp-{os.getppid()}"
    alive.mkdir()
    lpc("quantize", tiny_model_dir, "--recipe", "fp8", "-o", tmp_path / "q")
    assert not stale.exists() and alive.exists()


def test_weight_files_are_readable_like_other_files(tmp_path, quant):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (quant["quant"] / name).stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("content, message", [
    (b'{"text": "caf\xe9"}\n', "is not UTF-8 text"),
    (bytes(range(256)) * 4, "is not UTF-8 text"),
])
def test_bad_data_bytes_are_input_errors(tmp_path, tiny_model_dir, content, message):
    data = tmp_path / ("d.jsonl" if content.startswith(b"{") else "d.bin")
    data.write_bytes(content)
    res = lpc("calibrate", tiny_model_dir, "--data", data, "-o", tmp_path / "c", code=1)
    assert message in one_line(res) and not (tmp_path / "c").exists()


def test_usage_and_input_errors(tmp_path, tiny_model_dir, text_files):
    res = lpc("calibrate", tiny_model_dir, "--data", text_files["jsonl"], "--samples", 0, "-o", tmp_path / "c",
              code=2)
    assert "--samples" in res.output
    res = lpc("quantize", tiny_model_dir, "--set", "x=[1,", "-o", tmp_path / "q", code=1)
    assert "not valid YAML" in one_line(res) and "line 1, column" in one_line(res)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nquantize:\n  weights: [1,\n")
    res = lpc("quantize", tiny_model_dir, "--recipe", recipe, "-o", tmp_path / "q", code=1)
    assert "line 4, column 1" in one_line(res)
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = lpc("quantize", tiny_model_dir, "--recipe", "fp8", "-o", afile / "q", code=1)
    assert "unexpected" not in one_line(res) and "afile" in one_line(res)


def test_broken_config_json_is_reported_as_such(tmp_path, tiny_model_dir, text_files):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "config.json").write_text('{"model_type": "llama",')
    res = lpc("eval", bad, "--ppl", text_files["jsonl"], code=1)
    assert "config.json" in one_line(res) and "not valid JSON" in one_line(res)
    assert "tokenizer" not in one_line(res)


def test_truncated_input_weights_are_an_input_error(tmp_path, tiny_model_dir, text_files):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    res = lpc("quantize", bad, "--recipe", "fp8", "-o", tmp_path / "q", code=1)
    assert "unexpected" not in one_line(res) and "damaged or truncated" in one_line(res)


def test_hub_id_offline_says_the_hub_is_unreachable(tmp_path, text_files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = lpc("eval", "no-such-org/no-such-model", "--ppl", text_files["jsonl"], code=1)
    assert "hub" in one_line(res) and "local" in one_line(res)


def test_ctrl_c_during_startup_exits_130_without_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "lpc", "formats"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # still importing torch and the registries
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130: interrupted (0: it had already finished; -2: the signal came before Python's own handler)
    assert proc.returncode in (130, 0, -signal.SIGINT) and "Traceback" not in err, (proc.returncode, err[-2000:])
