"""MoE experts in compressed-tensors exports (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3; NVFP4 and FP8): each expert is
written under its family's per-expert checkpoint names (Mixtral `block_sparse_moe.experts.<e>.w1/w3/w2`,
Qwen-MoE and DeepSeek `mlp.experts.<e>.gate_proj/up_proj/down_proj`), gate and up keep lpc's one global scale,
compressed-tensors' own decompression of every expert equals lpc's dequantized matrix, routers are in
`ignore`, and `lpc.load` of the export gives lpc's logits. modelopt exports of MoE are refused in one line."""
from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from families.zoo import MOE
from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
from lpc.pipeline.errors import ArtifactError
from lpc.recipes import load_recipe

pytestmark = pytest.mark.skipif(find_spec("compressed_tensors") is None, reason="compressed_tensors is not installed")
PROMPT = "once upon a time there was a little girl who liked to play in the park with her dog"
NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "deepseek_v3": ("mlp", "gate_proj", "up_proj", "down_proj")}
RECIPES = {"nvfp4": "nvfp4-pack-quantized", "fp8": "float-quantized"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, family_dir):
    """(family, recipe) -> (lpc artifact, compressed-tensors export), made on first use."""
    done: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(family: str, recipe: str) -> tuple[Path, Path]:
        if (family, recipe) not in done:
            root = tmp_path_factory.mktemp(f"moe-ct-{family}-{recipe}")
            stages.quantize(str(family_dir(family)), load_recipe(recipe), root / "q")
            stages.export(root / "q", root / "ct", "compressed-tensors")
            done[(family, recipe)] = (root / "q", root / "ct")
        return done[(family, recipe)]

    return get


def _ct_weights(ct: Path) -> dict[str, torch.Tensor]:
    """{module: weight} of every quantized module of the export, decompressed by compressed-tensors itself."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "dequantize"})
    (scheme,) = config.config_groups.values()
    assert scheme.targets == ["Linear"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(ct / "model.safetensors")).items():
        module, _, leaf = key.rpartition(".")
        by_module.setdefault(module, {})[leaf] = t
    return {m: compressor.decompress(f, scheme)["weight"].float() for m, f in by_module.items() if "weight_scale" in f}


def _logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(tok(PROMPT, return_tensors="pt").input_ids).logits.float()


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", MOE)
def test_every_expert_under_its_checkpoint_names_decompresses_to_lpcs_weight(family, recipe, exported):
    q, ct = exported(family, recipe)
    block, gate, up, down = NAMES[family]
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == RECIPES[recipe]
    assert [g for g in qc["ignore"] if g != "lm_head" and not g.endswith("shared_expert_gate")] == \
        [f"model.layers.{i}.{block}.gate" for i in range(2)]
    qtensors, _ = read_qtensors(q, read_qconfig(q))
    weights = _ct_weights(ct)
    seen = 0
    for i in range(2):
        for e in range(4):
            lpc_name = f"model.layers.{i}.mlp.experts.{e}"
            ckpt = f"model.layers.{i}.{block}.experts.{e}"
            gu = get_format(qtensors[f"{lpc_name}.gate_up_proj"].format).dequantize(qtensors[f"{lpc_name}.gate_up_proj"])
            dn = get_format(qtensors[f"{lpc_name}.down_proj"].format).dequantize(qtensors[f"{lpc_name}.down_proj"])
            half = gu.shape[0] // 2
            for leaf, want in ((gate, gu[:half]), (up, gu[half:]), (down, dn)):
                got = weights.pop(f"{ckpt}.{leaf}")
                if recipe == "fp8":
                    assert torch.equal(got, want.float())
                else:  # compressed-tensors decompresses NVFP4 to bf16 (divides by 1/s2 where lpc multiplies by s2)
                    assert (got - want.float()).abs().max() <= 0.01 * want.abs().max()
                seen += 1
    assert seen == 2 * 4 * 3
    assert all(".experts." not in m for m in weights)  # no expert left under lpc's own names


@pytest.mark.parametrize("family", MOE)
def test_gate_and_up_share_the_global_scale(family, exported):
    from safetensors import safe_open

    _, ct = exported(family, "nvfp4")
    block, gate, up, _ = NAMES[family]
    with safe_open(str(ct / "model.safetensors"), framework="pt") as f:
        for e in range(4):
            base = f"model.layers.0.{block}.experts.{e}"
            assert torch.equal(f.get_tensor(f"{base}.{gate}.weight_global_scale"),
                               f.get_tensor(f"{base}.{up}.weight_global_scale"))


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", MOE)
def test_lpc_load_of_the_export_gives_lpcs_logits(family, recipe, exported):
    """lpc.load = transformers' from_pretrained (its checkpoint conversion merges the per-expert tensors
    into the fused parameters) + ct_runtime.settle, which re-decompresses the experts with
    compressed-tensors (transformers' expert path drops NVFP4's global scale)."""
    q, ct = exported(family, recipe)
    ref, tok = load(q, dtype=torch.float32)
    if recipe == "nvfp4":  # lpc's weights rounded through bf16, as compressed-tensors decompresses NVFP4
        for name in read_qconfig(q)["layers"]:
            block, _, leaf = name.rpartition(".")
            owner, _, index = block.rpartition(".")
            if owner.endswith(".experts"):  # lpc's load gives transformers' fused experts back
                w = getattr(ref.get_submodule(owner), leaf)[int(index)]
            else:
                w = ref.get_submodule(name).weight
            w.data.copy_(w.data.to(torch.bfloat16).float())
    got, _ = load(ct, dtype=torch.float32)
    want = _logits(ref, tok)
    out = _logits(got, tok)
    assert (out - want).abs().max() <= 0.01 * want.abs().max(), (out - want).abs().max()


def test_modelopt_export_of_experts_is_refused_in_one_line(exported, tmp_path):
    q, _ = exported("mixtral", "fp8")
    with pytest.raises(ArtifactError, match="MoE experts, which lpc writes per expert only in compressed-tensors"):
        stages.export(q, tmp_path / "mo", "modelopt")
