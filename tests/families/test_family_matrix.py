"""Every dense Hugging Face family (tests/families/zoo.py) through nvfp4 and FGMP (and fp8 with padded
layers): every Linear but the head is quantized (GPT-2's Conv1D included), the lpc artifact gives sane
logits, the dense export loads in transformers with lpc's logits exactly, and the compressed-tensors
export loads with lpc's logits (or is refused with a one-line reason: GPT-2's Conv1D, FGMP's block mix,
layers padded to a block)."""
from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from families.zoo import DENSE
from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.io.models import load_hf_model
from lpc.recipes import load_recipe

needs_ct = pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"
SMALL = ["calibrate.samples=2", "calibrate.seq_len=8"]
FGMP = SMALL + ["quantize.method=rtn"]  # the FGMP allocation; distillation is tested elsewhere
# Padding on one family per layout: separate q/k/v and gate/up, fused qkv/gate_up, fused query_key_value,
# biased q/k/v with fc1/fc2 (the code paths are the same for the others; this keeps the matrix fast).
PADDED = ("llama", "phi3", "gpt_neox", "opt")


def _logits(model, tok) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def _hf(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def _original(model_dir: Path, tok) -> tuple[set[str], torch.Tensor]:
    """(every Linear of the model in lpc's layout (Conv1D included) but the output head, its logits)."""
    model = load_hf_model(model_dir)
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}, _logits(model, tok)


def _sane(lpc_logits: torch.Tensor, original: torch.Tensor) -> None:
    assert torch.isfinite(lpc_logits).all()
    cos = torch.nn.functional.cosine_similarity(lpc_logits.flatten(), original.flatten(), dim=0)
    assert cos > 0.9, cos


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one bf16 step of a few weights: compressed-tensors divides by its global scale 1/s2 where
    lpc multiplies by s2, which now and then rounds a weight to the neighbouring bf16 value."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 0.01 * want.abs().max(), (got - want).abs().max()


def _at_ct_precision(quant: Path):
    """lpc's float32 model with its quantized weights rounded through bf16, as compressed-tensors
    decompresses NVFP4 (so the comparison with a float32 load is exact)."""
    model, tok = load(quant, dtype=torch.float32)
    for name in read_qconfig(quant)["layers"]:
        w = model.get_submodule(name).weight
        w.data = w.data.to(torch.bfloat16).float()
    return model, tok


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, family_dir, text_files):
    """family -> calibration (with Fisher) of its tiny model, made on first use."""
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            out = tmp_path_factory.mktemp(f"calib-{family}") / "calib"
            stages.calibrate(str(family_dir(family)), str(text_files["jsonl"]), out,
                             load_recipe("fgmp_nvfp4a16", FGMP))
            done[family] = out
        return done[family]

    return get


@pytest.mark.parametrize("family", DENSE)
def test_nvfp4_every_linear_but_the_head_and_exports_load(family, family_dir, tmp_path):
    src = family_dir(family)
    result = stages.quantize(str(src), load_recipe("nvfp4"), tmp_path / "q")
    summary = result.manifest["summary"]
    lpc_model, tok = load(tmp_path / "q")
    linears, original = _original(src, tok)
    assert set(read_qconfig(tmp_path / "q")["layers"]) == linears
    assert summary["quantized_layers"] == summary["target_layers"] and 4.5 <= summary["bits_per_weight"] < 4.6
    want = _logits(lpc_model, tok)
    _sane(want, original)
    stages.export(tmp_path / "q", tmp_path / "dense", "dense")
    assert torch.equal(_logits(_hf(tmp_path / "dense"), tok), want)
    if family == "gpt2":
        with pytest.raises(ArtifactError, match="Conv1D"):
            stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
        return
    stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    ref, _ = _at_ct_precision(tmp_path / "q")
    _close(_logits(_hf(tmp_path / "ct", dtype=torch.float32), tok), _logits(ref, tok))


@pytest.mark.parametrize("family", DENSE)
def test_fgmp_block_mix_on_every_family(family, family_dir, calibrated, tmp_path):
    src = family_dir(family)
    recipe = load_recipe("fgmp_nvfp4a16", FGMP)
    stages.allocate(calibrated(family), recipe, tmp_path / "alloc")
    stages.quantize(str(src), None, tmp_path / "q", plan=tmp_path / "alloc")
    layers = read_qconfig(tmp_path / "q")["layers"]
    lpc_model, tok = load(tmp_path / "q")
    linears, original = _original(src, tok)
    assert set(layers) == linears and {m["format"] for m in layers.values()} == {"fgmp"}
    _sane(_logits(lpc_model, tok), original)
    with pytest.raises(ArtifactError, match="FGMP|Conv1D"):
        stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")


@needs_ct
@pytest.mark.parametrize("family", PADDED)
def test_padded_layers_quantize_and_fp8_exports(family, family_dir, tmp_path):
    """hidden 72, MLP 200: every NVFP4 layer is zero-padded (lpc quantizes it; compressed-tensors cannot
    hold one, so its export is refused), while per-channel FP8 exports and loads with lpc's logits."""
    src = family_dir(family, padded=True)
    stages.quantize(str(src), load_recipe("nvfp4"), tmp_path / "q4")
    layers = read_qconfig(tmp_path / "q4")["layers"]
    lpc_model, tok = load(tmp_path / "q4")
    linears, original = _original(src, tok)
    assert set(layers) == linears and all(m["shape"][-1] in (72, 200) for m in layers.values())
    _sane(_logits(lpc_model, tok), original)
    with pytest.raises(ArtifactError, match="no layer of the artifact can be written"):
        stages.export(tmp_path / "q4", tmp_path / "ct4", "compressed-tensors")
    stages.quantize(str(src), load_recipe("fp8"), tmp_path / "q8")
    stages.export(tmp_path / "q8", tmp_path / "ct8", "compressed-tensors")
    ref, _ = load(tmp_path / "q8", dtype=torch.float32)
    assert torch.equal(_logits(_hf(tmp_path / "ct8", dtype=torch.float32), tok), _logits(ref, tok))


@needs_ct
@pytest.mark.parametrize("family", DENSE)
def test_fp8_every_family_exports_to_compressed_tensors(family, family_dir, tmp_path):
    src = family_dir(family)
    stages.quantize(str(src), load_recipe("fp8"), tmp_path / "q")
    lpc_model, tok = load(tmp_path / "q", dtype=torch.float32)
    linears, original = _original(src, tok)
    assert set(read_qconfig(tmp_path / "q")["layers"]) == linears
    want = _logits(lpc_model, tok)
    _sane(want, original)
    if family == "gpt2":
        with pytest.raises(ArtifactError, match="Conv1D"):
            stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
        return
    stages.export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    assert torch.equal(_logits(_hf(tmp_path / "ct", dtype=torch.float32), tok), want)
