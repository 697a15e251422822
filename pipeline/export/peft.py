"""`lpc export --format peft`: the dense quantized base model plus its low-rank paths as a PEFT LoRA adapter.

Layout of the export directory:

    config.json, model.safetensors, tokenizer files    the base: dequantized W_q in the model's dtype,
                                                        factors NOT merged (a plain HF model directory)
    adapter/adapter_config.json                         LoRA, lora_alpha = r (scaling 1), target modules,
                                                        rank_pattern / alpha_pattern when ranks differ
    adapter/adapter_model.safetensors                   base_model.model.<m>.lora_A.weight (r, in),
                                                        base_model.model.<m>.lora_B.weight (out, r)

The adapter sits in a subdirectory because transformers' from_pretrained treats a directory holding
adapter_config.json as an adapter and goes looking for its base model. Use:

    base = AutoModelForCausalLM.from_pretrained(out)
    model = PeftModel.from_pretrained(base, out / "adapter")    # the logits of lpc's load(comp/)

Layers in ESPACE compress mode have an all-zero base weight: the adapter carries the whole layer.
"""
from __future__ import annotations

import enum
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.artifact import store as art
from lpc.pipeline.errors import InputError
from lpc.pipeline.export.registry import EXPORTERS
from lpc.pipeline.artifact.load import load, pop_lowrank
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.io.models import copy_tokenizer_files

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def write_peft(src: Path, tmp: Path) -> dict[str, Any]:
    """Write the base model into `tmp` and the adapter into `tmp/adapter`; returns summary fields."""
    qconfig = read_qconfig(src) or {}
    layers = (qconfig.get("lowrank") or {}).get("layers") or {}
    if not layers:
        raise InputError(f"{src} has no low-rank paths to export as a PEFT adapter",
                         "export the output of lpc compensate, or use --format lpc or dense")
    experts = [n for n in sorted(layers) if any(n.startswith(m + ".") for m in qconfig.get("experts") or [])]
    if experts:
        raise ArtifactError(f"layer {experts[0]} is an MoE expert with a low-rank path: PEFT's LoRA targets "
                            "Linears, and transformers holds the experts as fused 3-D parameters",
                            "export with --format dense (paths merged) or lpc")
    model, _ = load(src, activations=False)  # low-rank hooks are attached but save_pretrained ignores them
    model.save_pretrained(str(tmp), safe_serialization=True)
    copy_tokenizer_files(src, tmp)
    from lpc.pipeline.artifact.shards import ModelTensors

    factors = pop_lowrank(ModelTensors(Path(src)).load_all(), qconfig)
    dtype = _adapter_dtype(layers)
    ranks = {name: int(factors[f"{name}.lora_A"].shape[0]) for name in sorted(layers)}
    adapter = {}
    for name in ranks:
        adapter[f"base_model.model.{name}.lora_A.weight"] = factors[f"{name}.lora_A"].to(dtype)
        adapter[f"base_model.model.{name}.lora_B.weight"] = factors[f"{name}.lora_B"].to(dtype)
    (tmp / ADAPTER_DIR).mkdir()
    art.save_tensors(adapter, tmp / ADAPTER_DIR / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    from lpc.pipeline.io.encoders import is_encoder

    task = None if is_encoder(model) else "CAUSAL_LM"  # PEFT has no masked-LM task: the plain PeftModel
    art.write_json(tmp / ADAPTER_DIR / ADAPTER_CONFIG,
                   {**adapter_config(ranks, task), "base_model_name_or_path": final_path(tmp)})
    dropped = []
    if qconfig.get("activations"):
        dropped.append("activation quantization (PEFT models run dense activations; evaluate the lpc artifact for W+A)")
        log.warning("peft export drops the simulated activation quantization")
    return {"adapter": ADAPTER_DIR, "adapter_modules": len(ranks), "adapter_dtype": str(dtype).removeprefix("torch."),
            "dropped": dropped}


def final_path(tmp: Path) -> str:
    """The absolute path the staging directory `tmp` (`.<name>.tmp-<pid>`, store.staging) is renamed to:
    the base model of the adapter, so AutoPeftModelForCausalLM finds it without the hub."""
    m = re.match(r"^\.(?P<name>.+)\.tmp-\d+$", tmp.name)
    return str((tmp.parent / (m["name"] if m else tmp.name)).resolve())


def _adapter_dtype(layers: dict[str, dict[str, Any]]) -> torch.dtype:
    """bf16 when every factor was stored as bf16 (exact); fp32 for fp32 or dequantized packed factors.

    One dtype for the whole adapter: PEFT casts x to lora_A's dtype and feeds that to lora_B."""
    plain_bf16 = all(e.get("factor_format") == "bf16" and not e.get("factors") for e in layers.values())
    return torch.bfloat16 if plain_bf16 else torch.float32


def adapter_config(ranks: dict[str, int], task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """PEFT LoraConfig as a JSON dict: lora_alpha = r for every module, so B A is added unscaled.

    ranks: full module name -> rank. r is the most common rank (ties: the smallest); the others go
    to rank_pattern with an equal alpha_pattern entry. Full names match only their own module."""
    from peft import LoraConfig

    counts = Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k))
    other = {n: k for n, k in sorted(ranks.items()) if k != r}
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=other, alpha_pattern=dict(other),
                     lora_dropout=0.0, bias="none", task_type=task_type, inference_mode=True)
    # A set would be written in hash order; sorted lists keep the file byte-identical across runs.
    return {k: sorted(v) if isinstance(v, set) else (v.value if isinstance(v, enum.Enum) else v)
            for k, v in cfg.to_dict().items()}


EXPORTERS.add("peft", write_peft)
