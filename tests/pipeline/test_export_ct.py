"""`lpc export --format compressed-tensors`: layout, config, refusals, and loading with transformers.

The proof of interop: transformers' compressed-tensors integration loads the export
(`AutoModelForCausalLM.from_pretrained`, decompressing on CPU) and its logits equal those of lpc's own
`load()` of the quantized artifact. Tests that import compressed_tensors skip only when it is missing.
"""
from __future__ import annotations

import json
import logging
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lpc.formats import get_format
from lpc.formats.numerics import e2m1_decode, unpack_nibbles
from lpc.pipeline import stages
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.export.compressed_tensors import check_exportable, nvfp4_tensors, write_compressed_tensors
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
from lpc.recipes import load_recipe

log = logging.getLogger(__name__)

needs_ct = pytest.mark.skipif(find_spec("compressed_tensors") is None,
                              reason="compressed_tensors is not installed (pip install 'lpc[dev]')")
FMT = "compressed-tensors"
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"
MLP = ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


def _quantize(model_dir: Path, out: Path, recipe: str, sets: list[str] | None = None,
              calib: Path | None = None) -> Path:
    stages.quantize(str(model_dir), load_recipe(recipe, sets), out, calib=calib)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _qconfig(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def nvfp4_export(tmp_path_factory, aligned_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ct-nvfp4")
    quant = _quantize(aligned_dir, d / "quant", "nvfp4")
    stages.export(quant, d / "ct", FMT)
    return {"quant": quant, "ct": d / "ct"}


def _loaded_pair(ct_dir: Path, quant_dir: Path):
    """(transformers model of the export, lpc model of the artifact in the same dtype, token ids)."""
    from transformers import AutoModelForCausalLM

    ct_model = AutoModelForCausalLM.from_pretrained(str(ct_dir)).eval()
    lpc_model, tok = load(quant_dir, dtype=ct_model.dtype)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    return ct_model, lpc_model, ids


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ---- layout and config -------------------------------------------------------------------------

def test_nvfp4_tensors_are_lpc_fields_with_reciprocal_global_scale(nvfp4_export):
    qconfig = read_qconfig(nvfp4_export["quant"])
    qtensors, _ = read_qtensors(nvfp4_export["quant"], qconfig)
    out = _tensors(nvfp4_export["ct"])
    assert len(qtensors) == 14
    for name, q in qtensors.items():
        rows, cols = q.shape
        assert f"{name}.weight" not in out and f"{name}.qdata" not in out
        packed, scale, gs = (out[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale"))
        assert packed.dtype == torch.uint8 and packed.shape == (rows, cols // 2)
        assert scale.dtype == torch.float8_e4m3fn and scale.shape == (rows, cols // 16)
        assert gs.dtype == torch.float32 and gs.shape == (1,)
        assert torch.equal(packed, q.data["qdata"])
        assert torch.equal(scale.view(torch.uint8), q.data["scale"].view(torch.uint8))
        # compressed-tensors' global scale is 6*448/amax: the reciprocal of lpc's s2 = amax/(6*448)
        assert gs.item() == pytest.approx(1.0 / q.data["global_scale"].item(), rel=1e-7)
    fused = [out[f"model.layers.1.self_attn.{p}_proj.weight_global_scale"] for p in "qkv"]
    assert torch.equal(fused[0], fused[1]) and torch.equal(fused[0], fused[2])
    assert out["model.embed_tokens.weight"].dtype == torch.float32  # unquantized tensors unchanged


def test_nvfp4_config_is_one_linear_group_ignoring_lm_head(nvfp4_export):
    config = json.loads((nvfp4_export["ct"] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "nvfp4-pack-quantized"
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["dynamic"]) == (4, "float", "tensor_group",
                                                                                           16, False)
    assert group["input_activations"] is None
    assert config["dtype"] == "bfloat16"  # see runtime_dtype: CT decompresses NVFP4 to bf16
    manifest = json.loads((nvfp4_export["ct"] / "manifest.json").read_text())
    assert manifest["summary"]["format"] == FMT and manifest["summary"]["schemes"] == {"nvfp4a16": 14}
    assert (nvfp4_export["ct"] / "tokenizer.json").is_file()


@needs_ct
def test_config_validates_with_compressed_tensors(nvfp4_export):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    cfg = QuantizationConfig.model_validate({k: v for k, v in _qconfig(nvfp4_export["ct"]).items() if k != "dequantize"})
    scheme = cfg.config_groups["group_0"]
    assert scheme.weights.strategy == QuantizationStrategy.TENSOR_GROUP
    assert scheme.weights.scale_dtype == torch.float8_e4m3fn


def test_export_is_byte_identical_across_runs(nvfp4_export, tmp_path):
    stages.export(nvfp4_export["quant"], tmp_path / "again", FMT)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (nvfp4_export["ct"] / name).read_bytes()


# ---- compressed-tensors' own numerics agree with lpc's ------------------------------------------

@needs_ct
def test_golden_block_nibble_order_and_decompression():
    """DESIGN's golden NVFP4 block: lpc's bytes are what compressed-tensors unpacks and dequantizes."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    x = 0.875 * torch.tensor([[0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -6]])
    q = get_format("nvfp4").quantize(x, global_amax=6 * 448 * 2.0 ** -9)
    fields, _ = nvfp4_tensors(q, None)
    assert fields["weight_packed"].flatten().tolist() == [0x00, 0x21, 0x22, 0x43, 0x44, 0x65, 0x66, 0xF7]
    assert fields["weight_global_scale"].item() == 2.0 ** 9
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    w = NVFP4PackedCompressor.decompress(dict(fields), scheme)["weight"]
    assert torch.equal(w.float(), get_format("nvfp4").dequantize(q))


@needs_ct
@pytest.mark.parametrize("shape", [(1, 16), (8, 64), (33, 160), (64, 512)])
def test_compressor_decompresses_lpc_nvfp4_to_lpc_values(shape):
    """Random tensors: compressed-tensors' NVFP4 decompression = lpc's dequantization (CT returns bf16)."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    torch.manual_seed(shape[0])
    x = torch.randn(shape) * torch.rand(shape[0], 1) * 4
    q = get_format("nvfp4").quantize(x, scale_search=2)
    fields, _ = nvfp4_tensors(q, None)
    w = NVFP4PackedCompressor.decompress(dict(fields), preset_name_to_scheme("NVFP4A16", ["Linear"]))["weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, get_format("nvfp4").dequantize(q).to(torch.bfloat16))
    codes = unpack_nibbles(fields["weight_packed"])
    assert torch.equal(e2m1_decode(codes), e2m1_decode(unpack_nibbles(q.data["qdata"])))


@needs_ct
def test_activation_fake_quant_convention_matches_in_float32():
    """input_global_scale = 6*448/amax drives CT's dynamic NVFP4 input scales like lpc's global_amax."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    x = torch.randn(256, 128) * torch.rand(256, 1) * 3
    amax = 0.8 * float(x.abs().max())  # calibrated amax below the run-time one: saturation is exercised
    q = get_format("nvfp4").quantize(torch.zeros(1, 16), global_amax=1.0)
    _, key = nvfp4_tensors(q, {"global_amax": amax})
    gs = nvfp4_tensors(q, {"global_amax": amax})[0]["input_global_scale"]
    assert key == "nvfp4" and gs.item() == pytest.approx(6 * 448 / amax, rel=1e-6)
    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    scale, _ = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=gs)
    ct = fake_quantize(x, scale, None, args, global_scale=gs)
    ref = get_format("nvfp4").fake_quantize(x, global_amax=amax)
    assert (ct - ref).abs().max().item() <= 1e-5 * float(x.abs().max())


@needs_ct
def test_compressed_tensors_cannot_hold_padded_nvfp4():
    """Why padded layers are written dense: CT refuses a width that is not a multiple of 16."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    q = get_format("nvfp4").quantize(torch.randn(8, 40))
    fields, _ = nvfp4_tensors(q, None)
    fields["weight_packed"] = fields["weight_packed"][:, :20].contiguous()  # (out, in/2) as CT expects
    with pytest.raises(ValueError, match="divisible|divisble"):
        NVFP4PackedCompressor.decompress(fields, preset_name_to_scheme("NVFP4A16", ["Linear"]))


# ---- transformers loads the export with lpc's logits -------------------------------------------

@needs_ct
def test_transformers_loads_nvfp4_export_with_lpc_logits(nvfp4_export):
    ct_model, lpc_model, ids = _loaded_pair(nvfp4_export["ct"], nvfp4_export["quant"])
    assert ct_model.dtype == torch.bfloat16
    got, want = _logits(ct_model, ids), _logits(lpc_model, ids)  # the first forward decompresses
    ct_state, lpc_state = ct_model.state_dict(), lpc_model.state_dict()
    for name in lpc_state:
        assert torch.equal(ct_state[name], lpc_state[name]), name
    diff = (got - want).abs().max().item()
    log.info("nvfp4: max |logit difference| transformers-CT vs lpc (bf16) = %g", diff)
    assert diff == 0.0
    fp32 = _logits(load(nvfp4_export["quant"])[0], ids)
    assert (got - fp32).abs().max().item() < 0.02 * fp32.abs().max().item()  # bf16 costs little


@needs_ct
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_export_loads_with_identical_float32_logits(tmp_path, tiny_model_dir, granularity):
    quant = _quantize(tiny_model_dir, tmp_path / "q", "fp8", [f"quantize.weights.spec.granularity={granularity}"])
    stages.export(quant, tmp_path / "ct", FMT)
    out, qc = _tensors(tmp_path / "ct"), _qconfig(tmp_path / "ct")
    name = "model.layers.0.mlp.down_proj"  # 40 inputs: FP8 needs no padding
    assert out[f"{name}.weight"].dtype == torch.float8_e4m3fn and out[f"{name}.weight"].shape == (32, 40)
    assert out[f"{name}.weight_scale"].shape == ((32, 1) if granularity == "channel" else (1,))
    assert qc["format"] == "float-quantized" and qc["config_groups"]["group_0"]["weights"]["strategy"] == granularity
    ct_model, lpc_model, ids = _loaded_pair(tmp_path / "ct", quant)
    assert ct_model.dtype == torch.float32
    diff = (_logits(ct_model, ids) - _logits(lpc_model, ids)).abs().max().item()
    log.info("fp8 %s: max |logit difference| = %g", granularity, diff)
    assert diff == 0.0


@needs_ct
def test_padded_nvfp4_layers_are_written_dense_and_ignored(tmp_path, tiny_model_dir):
    quant = _quantize(tiny_model_dir, tmp_path / "q", "nvfp4")  # intermediate 40: down_proj is padded
    result = stages.export(quant, tmp_path / "ct", FMT)
    dense = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    summary = result.manifest["summary"]
    assert summary["dense_layers"] == dense and summary["dtype"] == "bfloat16"
    # 12 NVFP4 layers at 4.5 bits + a 32-bit global scale each, 2 bf16 layers of 32x40
    nvfp4_params = 2 * (2 * 32 * 32 + 2 * 16 * 32 + 2 * 40 * 32)  # per layer: q, o; k, v; gate, up
    bits = nvfp4_params * 4.5 + 12 * 32 + 2 * 32 * 40 * 16
    assert summary["bits_per_weight"] == pytest.approx(bits / (nvfp4_params + 2 * 32 * 40), rel=1e-9)
    qc, out = _qconfig(tmp_path / "ct"), _tensors(tmp_path / "ct")
    assert qc["ignore"] == [*dense, "lm_head"]
    qtensors, _ = read_qtensors(quant, read_qconfig(quant))
    for name in dense:
        assert f"{name}.weight_packed" not in out and out[f"{name}.weight"].shape == (32, 40)
        want = get_format("nvfp4").dequantize(qtensors[name]).to(torch.bfloat16)  # the dtype config.json declares
        assert torch.equal(out[f"{name}.weight"], want)
    ct_model, lpc_model, ids = _loaded_pair(tmp_path / "ct", quant)
    assert (_logits(ct_model, ids) - _logits(lpc_model, ids)).abs().max().item() == 0.0


@needs_ct
def test_w4a4_export_carries_input_global_scales(tmp_path, aligned_dir, text_files):
    recipe = load_recipe("nvfp4_w4a4", ["calibrate.samples=4", "calibrate.seq_len=24"])
    stages.calibrate(str(aligned_dir), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    quant = _quantize(aligned_dir, tmp_path / "q", "nvfp4_w4a4", calib=tmp_path / "calib")
    stages.export(quant, tmp_path / "ct", FMT)
    acts = read_qconfig(quant)["activations"]["layers"]
    out, qc = _tensors(tmp_path / "ct"), _qconfig(tmp_path / "ct")
    for name, entry in acts.items():
        assert out[f"{name}.input_global_scale"].item() == pytest.approx(6 * 448 / entry["global_amax"], rel=1e-6)
    inputs = qc["config_groups"]["group_0"]["input_activations"]
    assert (inputs["dynamic"], inputs["strategy"], inputs["group_size"]) == ("local", "tensor_group", 16)
    ct_model, lpc_model, ids = _loaded_pair(tmp_path / "ct", quant)
    got, want = _logits(ct_model, ids), _logits(lpc_model, ids)
    for name, t in lpc_model.state_dict().items():
        assert torch.equal(ct_model.state_dict()[name], t), name
    diff = (got - want).abs().max().item()
    log.info("nvfp4 w4a4: max |logit difference| = %g (CT computes dynamic input scales in bf16)", diff)
    assert 0.0 < diff < 0.05 * want.abs().max().item()  # not zero: activations really are quantized on both sides


@needs_ct
def test_mixed_formats_give_one_group_per_scheme(tmp_path, aligned_dir):
    sets = ['quantize.overrides=[{match: "*mlp*", weights: {format: fp8_e4m3}}, {match: o_proj, weights: null}]']
    quant = _quantize(aligned_dir, tmp_path / "q", "nvfp4", sets)
    stages.export(quant, tmp_path / "ct", FMT)
    qc = _qconfig(tmp_path / "ct")
    assert qc["format"] == "mixed-precision"
    groups = {g["format"]: g for g in qc["config_groups"].values()}
    assert set(groups) == {"nvfp4-pack-quantized", "float-quantized"}
    assert set(MLP) <= set(groups["float-quantized"]["targets"])
    assert "model.layers.1.self_attn.q_proj" in groups["nvfp4-pack-quantized"]["targets"]
    assert qc["ignore"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "lm_head"]
    ct_model, lpc_model, ids = _loaded_pair(tmp_path / "ct", quant)
    got, want = _logits(ct_model, ids), _logits(lpc_model, ids)
    ct_state = ct_model.state_dict()
    for name, t in lpc_model.state_dict().items():
        # CT keeps FP8 scales in the model dtype (bf16 here): FP8 weights may differ by one bf16 step
        tol = 2.0 ** -7 if ".mlp." in name else 0.0
        torch.testing.assert_close(ct_state[name].float(), t.float(), rtol=tol, atol=0.0, msg=name)
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,sets,fmt", [("bcq", [], "bcq"),
                                             ("nvfp4", ["quantize.weights.spec.rotate=true"], "rotation")])
def test_formats_without_ct_form_are_refused(tmp_path, aligned_dir, recipe, sets, fmt):
    quant = _quantize(aligned_dir, tmp_path / "q", recipe, sets)
    with pytest.raises(ArtifactError, match=rf"layer model\.layers\.0\.\S+ .*{fmt}.*--format lpc"):
        stages.export(quant, tmp_path / "ct", FMT)
    assert not (tmp_path / "ct").exists()


def test_lowrank_and_unsupported_activations_are_refused():
    layer = {"format": "nvfp4", "shape": [32, 32], "spec": {}}
    with pytest.raises(ArtifactError, match=r"layer m\.a has a low-rank .*--format peft"):
        check_exportable({"layers": {"m.a": layer}, "lowrank": {"layers": {"m.a": {}}}})
    fp8_acts = {"layers": {"m.a": layer}, "activations": {"layers": {"m.a": {"format": "fp8_e4m3"}}}}
    with pytest.raises(ArtifactError, match=r"activation quantization of layer m\.a \(format 'fp8_e4m3'"):
        check_exportable(fp8_acts)
    uncalibrated = {"layers": {"m.a": layer}, "activations": {"layers": {"m.a": {"format": "nvfp4"}}}}
    with pytest.raises(ArtifactError, match="calibrated global amax"):
        check_exportable(uncalibrated)


def test_plain_model_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ArtifactError, match="no lpc quantization_config"):
        write_compressed_tensors(tiny_model_dir, tmp_path)


def test_cli_exports_compressed_tensors(nvfp4_export, tmp_path):
    from typer.testing import CliRunner

    from lpc.cli.main import app

    result = CliRunner().invoke(app, ["export", str(nvfp4_export["quant"]), "--format", FMT,
                                      "-o", str(tmp_path / "ct"), "--json"])
    assert result.exit_code == 0, result.output
    assert _qconfig(tmp_path / "ct")["format"] == "nvfp4-pack-quantized"


def test_padded_layer_with_activation_quant_is_reported_dropped():
    from lpc.pipeline.export.compressed_tensors import convert_layers

    fmt = get_format("nvfp4")
    qtensors = {"a.padded": fmt.quantize(torch.randn(8, 40)), "b.aligned": fmt.quantize(torch.randn(8, 32))}
    acts = {n: {"format": "nvfp4", "global_amax": 3.0} for n in qtensors}
    conv = convert_layers(qtensors, acts)
    assert conv.dense == ["a.padded"] and conv.schemes == {"b.aligned": "nvfp4"}
    assert conv.dropped == ["activation quantization of the layers written dense: a.padded"]
    assert "b.aligned.input_global_scale" in conv.tensors and "a.padded.input_global_scale" not in conv.tensors


@pytest.mark.parametrize("recipe,sets", [("nvfp4", []), ("fp8", []), ("int4", ["quantize.weights.spec.vector=16"]),
                                         ("nvfp4_w4a4", ["calibrate.samples=2", "calibrate.seq_len=8"])])
def test_export_reads_one_layer_at_a_time_and_equals_the_in_memory_conversion(
        recipe, sets, tiny_model_dir, text_files, tmp_path, monkeypatch):
    """The streamed export holds one layer's tensors at a time (spilled as it goes, the rest copied from
    the artifact's file) and writes the very bytes of converting every layer in memory; padded layers
    (tiny model's down_proj) are written dense after the dtype is known."""
    import lpc.pipeline.export.compressed_tensors as ct
    from lpc.pipeline.artifact import store as art
    from lpc.pipeline.artifact.shards import ModelTensors

    r = load_recipe(recipe, sets)
    calib = None
    if r.quantize.activations is not None or recipe == "nvfp4_w4a4":
        calib = tmp_path / "c"
        stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), calib, r)
    q = tmp_path / "q"
    stages.quantize(str(tiny_model_dir), r, q, calib=calib)
    reads = []
    get = ModelTensors.get
    monkeypatch.setattr(ModelTensors, "get", lambda self, name: (reads.append(name), get(self, name))[1])
    monkeypatch.setattr(ModelTensors, "load_all", lambda *a, **k: pytest.fail("the whole artifact was loaded"))
    (tmp_path / "s").mkdir()
    streamed = write_compressed_tensors(q, tmp_path / "s")
    assert reads and len(reads) == len(set(reads))  # each tensor read once, one at a time
    monkeypatch.undo()
    qconfig = read_qconfig(q)
    config = json.loads((q / "config.json").read_text())
    conv, _, plain = ct._convert_whole(q, qconfig, config)
    (tmp_path / "w").mkdir()
    art.save_tensors(conv.tensors, tmp_path / "w" / "model.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "w" / "model.safetensors").read_bytes()
    assert streamed["dense_layers"] == conv.dense and streamed["dropped"] == conv.dropped


def test_modelopt_export_reads_one_layer_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """modelopt's export streams as compressed-tensors' does: each tensor read once, never the whole
    artifact, and every layer reads back (modelopt's formula) to lpc's weights."""
    from lpc.pipeline.artifact.shards import ModelTensors
    from lpc.pipeline.export.modelopt import dequantize_layer
    from safetensors.torch import load_file

    q = _quantize(tiny_model_dir, tmp_path / "q", "nvfp4")
    reads = []
    get = ModelTensors.get
    monkeypatch.setattr(ModelTensors, "get", lambda self, name: (reads.append(name), get(self, name))[1])
    monkeypatch.setattr(ModelTensors, "load_all", lambda *a, **k: pytest.fail("the whole artifact was loaded"))
    stages.export(q, tmp_path / "mo", "modelopt")
    assert reads and len(reads) == len(set(reads))
    monkeypatch.undo()
    qtensors, _ = read_qtensors(q, read_qconfig(q))
    tensors = load_file(str(tmp_path / "mo" / "model.safetensors"))
    checked = 0
    for name, qt in qtensors.items():
        if f"{name}.weight_scale" in tensors:
            fields = {k: tensors[f"{name}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2")}
            assert torch.equal(dequantize_layer(fields), get_format(qt.format).dequantize(qt)), name
            checked += 1
    assert checked > 0
