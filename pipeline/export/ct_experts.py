"""MoE experts in engine checkpoints: each expert under the per-expert names of its family's original
Hugging Face checkpoints, the names vLLM's MoE weight loaders read.

lpc quantizes expert e of an MoE block as two Linears, `<block>.experts.<e>.gate_up_proj` (2I, H) and
`<block>.experts.<e>.down_proj` (H, I) (io/experts.py). Engines and the families' checkpoints hold three
matrices per expert:

- Mixtral: `<layer>.block_sparse_moe.experts.<e>.w1` (gate), `w3` (up), `w2` (down); the whole block,
  router included, is `block_sparse_moe` (transformers 5 calls it `mlp` in memory);
- Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3: `<layer>.mlp.experts.<e>.gate_proj`, `up_proj`, `down_proj`.

gate_up_proj splits by rows: gate = the first I rows, up = the rest. Every row-wise tensor of the layer's
layout (packed codes, block scales, per-channel scales, int steps) splits the same way; a per-tensor
scale (NVFP4's global scale, FP8 per tensor) is written to both halves unchanged, so gate and up keep
the one shared global scale engines' fused w13 GEMM wants. FP8 128x128 blocks split only where I is a
multiple of 128 (else the export is refused naming the layer).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.errors import ArtifactError

_HINT = "export with --format lpc (every format) or --format dense (loadable anywhere)"


@dataclass(frozen=True)
class ExpertNames:
    """A family's checkpoint names: the MoE block's name in checkpoints and the three expert matrices."""

    block: str | None  # the block's checkpoint name where it differs from transformers' in-memory `mlp`
    gate: str
    up: str
    down: str


MIXTRAL = ExpertNames("block_sparse_moe", "w1", "w3", "w2")
QWEN_MOE = ExpertNames(None, "gate_proj", "up_proj", "down_proj")
FAMILIES = {"mixtral": MIXTRAL, "minimax": MIXTRAL, "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE,
            "deepseek_v2": QWEN_MOE, "deepseek_v3": QWEN_MOE, "olmoe": QWEN_MOE}


def expert_names_for(config: dict[str, Any], engine: str) -> ExpertNames:
    """The per-expert checkpoint names of config.json's model_type; ArtifactError for a family lpc does
    not know the engine names of."""
    kind = config.get("model_type", "")
    if kind not in FAMILIES:
        raise ArtifactError(f"MoE family '{kind}' has no per-expert checkpoint names lpc knows, so its experts "
                            f"cannot be written for {engine} (known: {', '.join(sorted(FAMILIES))})", _HINT)
    return FAMILIES[kind]


def _expert_of(name: str, blocks: list[str]) -> tuple[str, str, str] | None:
    """(experts module, expert index, matrix) when layer `name` is one of lpc's per-expert Linears."""
    for mod in blocks:
        m = re.fullmatch(re.escape(mod) + r"\.(\d+)\.(gate_up_proj|down_proj)", name)
        if m:
            return mod, m.group(1), m.group(2)
    return None


def checkpoint_name(name: str, blocks: list[str], names: ExpertNames) -> str:
    """A module name of lpc's in-memory model -> the family's checkpoint name (only the MoE block's own
    name changes: Mixtral's `mlp` -> `block_sparse_moe`)."""
    if names.block is None:
        return name
    for mod in blocks:
        block = mod.rpartition(".")[0]
        if name == block or name.startswith(block + "."):
            return block.rpartition(".")[0] + "." + names.block + name[len(block):]
    return name


# Expert schemes whose per-expert tensors transformers 5.24's compressed-tensors loader merges into its fused
# experts (packed: NVFP4, MXFP4, int; FP8 weight + scale), each checked by tests/families/test_recipe_matrix.py.
LOADABLE = ("nvfp4a16", "mxfp4a16", "fp8_channel", "fp8_tensor",
            *(f"w{b}a16_g{v}" for b in (4, 8) for v in (16, 32, 64)))


def check_expert_schemes(conv: Any, blocks: list[str]) -> None:
    """Raise ArtifactError for the first expert written dense (bf16, padded) or in a scheme transformers'
    loader cannot merge into its fused experts (MXFP8: FP8 weight with E8M0 scales; FP8 128x128 blocks)."""
    for name in sorted(conv.dense):
        if _expert_of(name, blocks):
            raise ArtifactError(f"MoE expert {name} is not in a compressed-tensors scheme (kept bf16 or padded): "
                                "transformers' compressed-tensors loader cannot merge such per-expert weights "
                                "into its fused experts", _HINT)
    for name, scheme in sorted(conv.schemes.items()):
        if _expert_of(name, blocks) and scheme == "nvfp4":
            raise ArtifactError(f"MoE expert {name} has NVFP4 activations (W4A4): transformers loads experts as "
                                "fused 3-D parameters, which compressed-tensors' activation quantization does not "
                                "reach, so the export would not run as lpc's model", _HINT)
        if _expert_of(name, blocks) and scheme not in LOADABLE:
            raise ArtifactError(f"MoE expert {name} is in scheme {scheme}, whose per-expert tensors transformers' "
                                f"compressed-tensors loader cannot merge into its fused experts "
                                f"(it merges {', '.join(LOADABLE[:5])}, int)", _HINT)


def split_rows(fields: dict[str, torch.Tensor], rows: int, layer: str) -> tuple[dict, dict]:
    """The tensors of one (2I, H) layer -> those of its first I rows and of the rest."""
    half = rows // 2
    top, bottom = {}, {}
    for key, t in fields.items():
        if key == "weight_shape":
            top[key] = bottom[key] = torch.tensor([half, int(t[1])], dtype=t.dtype)
        elif t.dim() == 0 or t.numel() == 1:  # per-tensor scales: shared by both halves
            top[key] = bottom[key] = t.clone()
        elif t.shape[0] == rows:
            top[key], bottom[key] = t[:half].contiguous(), t[half:].contiguous()
        elif t.shape[0] * 128 >= rows and half % 128 == 0:  # FP8 128x128 block scales
            top[key], bottom[key] = t[: half // 128].contiguous(), t[half // 128:].contiguous()
        else:
            raise ArtifactError(f"layer {layer}: its {key} {tuple(t.shape)} cannot be split into the gate and up "
                                f"matrices engines load (intermediate width {half})", _HINT)
    return top, bottom


def layer_names(name: str, blocks: list[str], names: ExpertNames) -> list[str]:
    """Checkpoint names of lpc's layer `name`: an expert's gate_up_proj -> [gate, up], down_proj -> [down],
    any other layer its checkpoint name."""
    hit = _expert_of(name, blocks)
    if hit is None:
        return [checkpoint_name(name, blocks, names)]
    mod, e, matrix = hit
    base = checkpoint_name(mod, blocks, names) + f".{e}."
    return [base + names.down] if matrix == "down_proj" else [base + names.gate, base + names.up]


def per_expert(tensors: dict[str, torch.Tensor], schemes: dict[str, str], dense: list[str],
               blocks: list[str], names: ExpertNames) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rewrite the export's tensors, {layer: scheme} and dense layers under the family's checkpoint names,
    each expert's gate_up_proj split into gate and up (an unquantized expert's plain weight too)."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, t in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if _expert_of(owner, blocks):
            by_layer.setdefault(owner, {})[leaf] = t
        else:
            out[checkpoint_name(owner, blocks, names) + "." + leaf] = t
    out_schemes = {new: s for n, s in schemes.items() for new in layer_names(n, blocks, names)}
    out_dense = [new for n in dense for new in layer_names(n, blocks, names)]
    for layer, fields in sorted(by_layer.items()):
        new_names = layer_names(layer, blocks, names)
        if len(new_names) == 2:
            rows = int(fields["weight_shape"][0]) if "weight_shape" in fields else _rows(fields)
            parts = dict(zip(new_names, split_rows(fields, rows, layer)))
        else:
            parts = {new_names[0]: fields}
        for new, part in parts.items():
            out.update({f"{new}.{k}": v for k, v in part.items()})
    return out, out_schemes, out_dense


def _rows(fields: dict[str, torch.Tensor]) -> int:
    main = fields.get("weight_packed", fields.get("weight"))
    return int(main.shape[0])


def reload_experts(model: torch.nn.Module, directory: Path) -> list[str]:
    """Put the experts of a compressed-tensors MoE export into `model` (loaded by from_pretrained) with
    compressed-tensors' own decompression of each per-expert tensor set; returns the experts modules set.

    transformers 5.24's expert path (CompressedTensorsDequantize.convert in
    transformers/integrations/compressed_tensors.py) decompresses packed experts through a stand-in module
    holding only weight_packed, weight_scale and weight_shape: NVFP4's weight_global_scale is dropped, so
    every NVFP4 expert comes out multiplied by 1/global_scale (about 2688/amax), and decompressed experts stay
    bf16 in a float32 model. Its FP8 expert path folds the scales correctly. Each expert is written in the
    model's float dtype (its input embedding's). This is called by ct_runtime.settle, so `lpc.load` of the export is right."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        return []
    config = json.loads(config_file.read_text())
    qc = config.get("quantization_config") or {}
    names = FAMILIES.get(config.get("model_type", ""))
    if qc.get("quant_method") != "compressed-tensors" or names is None:
        return []
    from lpc.pipeline.io.experts import ExpertLinears, fused_experts

    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertLinears) or fused_experts(m)]
    if not mods:
        return []
    from lpc.pipeline.export.ct_runtime import model_float_dtype

    dtype = model_float_dtype(model)  # transformers leaves decompressed experts in bf16 whatever the dtype asked
    reader = _Reader(Path(directory), qc)
    for name, mod in mods:
        ckpt = checkpoint_name(name, [name], names)
        for e in range(mod.num_experts if isinstance(mod, ExpertLinears) else mod.gate_up_proj.shape[0]):
            gate_up = torch.cat([reader.weight(f"{ckpt}.{e}.{names.gate}"), reader.weight(f"{ckpt}.{e}.{names.up}")])
            down = reader.weight(f"{ckpt}.{e}.{names.down}")
            with torch.no_grad():
                if isinstance(mod, ExpertLinears):
                    pair = mod._modules[str(e)]
                    for lin, w in ((pair.gate_up_proj, gate_up), (pair.down_proj, down)):
                        lin.weight.data = w.to(dtype).reshape(lin.weight.shape)
                else:
                    mod.gate_up_proj.data = mod.gate_up_proj.data.to(dtype)
                    mod.down_proj.data = mod.down_proj.data.to(dtype)
                    mod.gate_up_proj.data[e] = gate_up.to(dtype)
                    mod.down_proj.data[e] = down.to(dtype)
    return [n for n, _ in mods]


class _Reader:
    """Per-module tensors of an export's safetensors files, decompressed by compressed-tensors."""

    def __init__(self, directory: Path, qc: dict[str, Any]):
        from compressed_tensors.quantization import QuantizationConfig
        from safetensors import safe_open

        self.files = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                self.files.update({k: path for k in f.keys()})
        self.config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "dequantize"})

    def fields(self, module: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for key, path in self.files.items():
            if key.rpartition(".")[0] == module:
                with safe_open(str(path), framework="pt") as f:
                    out[key.rpartition(".")[2]] = f.get_tensor(key)
        if not out:
            raise ArtifactError(f"the compressed-tensors export holds no tensor of expert {module}",
                                "re-export the artifact with lpc export")
        return out

    def scheme(self, module: str):
        for group in self.config.config_groups.values():
            for t in group.targets:
                if t == module or t == "Linear" or (t.startswith("re:") and re.fullmatch(t[3:], module)):
                    return group
        return None

    def weight(self, module: str) -> torch.Tensor:
        from compressed_tensors.compressors import BaseCompressor

        fields = self.fields(module)
        if "weight_scale" not in fields:
            return fields["weight"]
        scheme = self.scheme(module)
        compressor = BaseCompressor.get_value_from_registry(scheme.format or self.config.format)
        return compressor.decompress(fields, scheme)["weight"]
