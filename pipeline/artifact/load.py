"""`load(dir)`: a (model, tokenizer) from an lpc artifact or any Hugging Face model directory.

For an lpc artifact the weights are dequantized into a standard transformers model; simulated
activation quantization and low-rank residual paths are attached as hooks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpc.formats import LpcError, get_format
from lpc.pipeline.errors import ArtifactError
from lpc.pipeline.artifact.lpc_model import AUX_PREFIX, WEIGHTS, read_qconfig, read_qtensors
from lpc.pipeline.io.experts import fuse_experts
from lpc.pipeline.io.families import checkpoint_layout
from lpc.pipeline.io.models import load_hf_model, load_tokenizer, model_from_config, resolve_model, to_lpc_layout

log = logging.getLogger(__name__)

# Importing the loader registers the lpc quantizer with transformers (from_pretrained on an lpc artifact).
from lpc.pipeline.artifact import hf_quantizer  # noqa: E402,F401


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
         activations: bool = True, merge_lowrank: bool = False) -> tuple[nn.Module, Any]:
    """Load an lpc artifact (any stage that holds a model) or a plain HF model; eval mode, no grads."""
    src = resolve_model(path)
    qconfig = read_qconfig(src) if Path(src).is_dir() else None
    tokenizer = load_tokenizer(src)
    if qconfig is None:  # a plain or engine-format model; a compressed-tensors one runs in the asked dtype
        from lpc.pipeline.export.ct_runtime import settle
        return settle(load_hf_model(src, dtype=dtype, device=device)), tokenizer
    model = build_from_lpc(Path(src), qconfig, dtype=dtype, activations=activations, merge_lowrank=merge_lowrank)
    return model.to(device), tokenizer


def build_from_lpc(directory: Path, qconfig: dict[str, Any], dtype: torch.dtype | None = None,
                   activations: bool = True, merge_lowrank: bool = False) -> nn.Module:
    """A transformers model from the lpc artifact `directory`: dequantized weights (dtype: the given one,
    else config.json's, else float32), low-rank paths and simulated activations attached as hooks."""
    model = model_from_config(directory, dtype=dtype)
    fill_from_lpc(model, directory, qconfig, activations=activations, merge_lowrank=merge_lowrank)
    return model


def fill_from_lpc(model: nn.Module, directory: Path, qconfig: dict[str, Any], activations: bool = True,
                  merge_lowrank: bool = False) -> nn.Module:
    """Load the lpc artifact's weights into `model` (built from its config.json) and attach its hooks.

    Parameters the checkpoint replaces may have any shape beforehand (transformers leaves the empty
    weight markers in place when the lpc quantizer loads it): each is replaced by a tensor of the
    Linear's own shape in the model's dtype."""
    to_lpc_layout(model)  # a model transformers built (from_pretrained) has fused experts and Conv1D layers
    qtensors, plain = read_qtensors(directory, qconfig)
    state = dict(plain)
    for name, q in qtensors.items():
        state[f"{name}.weight"] = get_format(q.format).dequantize(q)
    lowrank = pop_lowrank(state, qconfig)
    aux = {k: state.pop(k) for k in [k for k in state if k.startswith(AUX_PREFIX)]}
    if merge_lowrank:
        for key in [k for k in lowrank if k.endswith(".lora_A")]:
            name = key.removesuffix(".lora_A")
            w = state[f"{name}.weight"].float()
            state[f"{name}.weight"] = w + lowrank.pop(f"{name}.lora_B").float() @ lowrank.pop(key).float()
    for name in set(qtensors) | set((qconfig.get("lowrank") or {}).get("layers") or {}):
        if f"{name}.weight" in state:  # (out, in) -> the state-dict layout ((in, out) for GPT-2's Conv1D)
            state[f"{name}.weight"] = checkpoint_layout(model, name, state[f"{name}.weight"])
    _reset_linear_weights(model, [k.removesuffix(".weight") for k in state if k.endswith(".weight")])
    _load_state(model, state, qconfig, directory)
    model.eval().requires_grad_(False)
    if lowrank:
        attach_lowrank(model, lowrank)
    if activations and qconfig.get("kv_cache"):  # simulated like activations; dense/peft exports drop it
        from lpc.pipeline.kvcache import attach_kv_quantization, kv_specs
        attach_kv_quantization(model, kv_specs(qconfig["kv_cache"], aux, model.config.num_hidden_layers))
    if activations and qconfig.get("activations"):
        from lpc.pipeline.quantization.actquant import activation_plan, attach_activation_quant
        attach_activation_quant(model, activation_plan(qconfig["activations"], aux))
    fuse_experts(model)  # a plain transformers model again (experts without hooks)
    return model


def _reset_linear_weights(model: nn.Module, names: list[str]) -> None:
    """Give each Linear among `names` an uninitialized (out, in) weight in the model's dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name in names:
        mod = model.get_submodule(name) if name else model
        if isinstance(mod, nn.Linear) and tuple(mod.weight.shape) != (mod.out_features, mod.in_features):
            mod.weight = nn.Parameter(torch.empty(mod.out_features, mod.in_features, dtype=dtype), requires_grad=False)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], qconfig: dict[str, Any], directory: Path) -> None:
    expected = model.state_dict()
    bad = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ArtifactError(f"{directory / WEIGHTS}: shape mismatch for {bad[0]} "
                            f"({tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)})",
                            "the weights do not belong to this config.json")
    for k, v in state.items():
        if k in expected:
            state[k] = v.to(expected[k].dtype)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in qconfig.get("tied", [])]
    if missing:
        raise ArtifactError(f"{directory / WEIGHTS} is missing {len(missing)} tensors, e.g. {missing[0]}",
                            "the artifact is incomplete; re-run the stage that wrote it")
    if result.unexpected_keys:
        raise ArtifactError(f"{directory / WEIGHTS} has unexpected tensors, e.g. {result.unexpected_keys[0]}",
                            "the artifact does not match its config.json")
    if qconfig.get("tied"):
        model.tie_weights()


def pop_lowrank(state: dict[str, torch.Tensor], qconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Remove the low-rank factors from `state`; return them dequantized as fp32 tensors.

    Returns {"<m>.lora_A": (r, in) fp32, "<m>.lora_B": (out, r) fp32}. A factor is stored either
    as a plain `<m>.lora_A` tensor (bf16/fp32) or, when `qconfig["lowrank"]["layers"][m]["factors"]`
    gives its QTensor meta, as packed fields `<m>.lora_A.<field>` of that format. A layer in
    "compress" mode (ESPACE y = (W P)(P^T x)) has no base weight: W_q is zero, so it is given a
    zero `<m>.weight` here and computes y = B (A x) through the same hook or merge.
    """
    layers = (qconfig.get("lowrank") or {}).get("layers", {})
    out = {k: state.pop(k).float() for k in [k for k in state if k.endswith((".lora_A", ".lora_B"))]}
    for name, entry in layers.items():
        for part, meta in (entry.get("factors") or {}).items():
            prefix = f"{name}.{part}."
            fields = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
            try:
                out[f"{name}.{part}"] = get_format(meta["format"]).dequantize(
                    get_format(meta["format"]).unpack(fields, meta))
            except LpcError as err:
                raise ArtifactError(f"low-rank factor {name}.{part}: {err}",
                                    "the artifact is incomplete; re-run lpc compensate") from None
        missing = [p for p in ("lora_A", "lora_B") if f"{name}.{p}" not in out]
        if missing:
            raise ArtifactError(f"layer {name} has no {missing[0]} factor", "re-run lpc compensate")
        if entry.get("mode") == "compress" and f"{name}.weight" not in state:
            b, a = out[f"{name}.lora_B"], out[f"{name}.lora_A"]
            state[f"{name}.weight"] = torch.zeros(b.shape[0], a.shape[1])
    return out


def attach_lowrank(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[Any]:
    """y = W x + B (A x) for each Linear with `<m>.lora_A` (r, in) and `<m>.lora_B` (out, r)."""
    handles = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A")):
        name = key.removesuffix(".lora_A")
        mod = model.get_submodule(name)
        a, b = tensors[key].float(), tensors[f"{name}.lora_B"].float()

        def hook(m, args, out, a=a, b=b):
            x = args[0]
            return out + ((x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)

        handles.append(mod.register_forward_hook(hook))
    return handles
