"""Loading Hugging Face models and tokenizers, and finding the Linears a recipe targets."""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lpc.pipeline.errors import InputError
from lpc.pipeline.io.encoders import auto_class, encoder_class
from lpc.pipeline.io.experts import unfuse_experts
from lpc.pipeline.io.families import (linearize, model_kind, named_explicitly, routers, tied_to_embeddings,
                                       warn_unreached)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_model(model: str | Path) -> str:
    """A local model directory (checked) or a hub id (passed on as is)."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise InputError(f"{model} is not a Hugging Face model directory (no config.json)",
                             "give a directory written by save_pretrained, or a hub id")
        _check_config(p / "config.json")
        return str(p)
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return str(model)  # a hub id
    raise InputError(f"model {model} does not exist", "give a local model directory or a hub id like org/name")


def _check_config(path: Path) -> None:
    """A config.json that is not a JSON object is reported as such (not as a tokenizer problem later)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise InputError(f"{path} is not valid JSON{where}", "restore the model's config.json") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object", "restore the model's config.json")
    if model_kind(config) == "encoder-decoder":
        raise InputError(f"{path.parent} is an encoder-decoder model ({config.get('model_type')}): lpc compresses "
                         "decoder-only causal language models and encoders", "give a causal LM (Llama, Qwen, Mistral, "
                         "Gemma, Phi-3, GPT-2, OPT, GPT-NeoX, Mixtral, Qwen-MoE ...) or an encoder (BERT-style)")


def _hub_hint(model: str | Path, err: Exception) -> tuple[str, str] | None:
    """(message, hint) when `model` is a hub id that could not be fetched (offline or no network)."""
    if Path(model).expanduser().exists():
        return None
    why = "the Hugging Face hub is switched off (HF_HUB_OFFLINE)" if offline() else "the Hugging Face hub is unreachable"
    return (f"cannot load {model}: it is not a local directory and {why}",
            "give a local model directory (as written by save_pretrained / huggingface-cli download), "
            "or run with network and HF_HUB_OFFLINE unset")


def model_files(model: str | Path) -> list[Path]:
    """Files of a local model directory whose content defines the model (for input hashes)."""
    p = Path(model)
    if not p.is_dir():
        return []
    return sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"
                                                            or f.name.endswith(".index.json")))


def load_hf_model(model: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a causal LM in eval mode with gradients off; hub errors become InputError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model(model)
    try:
        auto = AutoModelForCausalLM
        config = AutoConfig.from_pretrained(src)
        if model_kind(config) == "encoder":  # its own class, never a causal-LM head made up at random
            auto = encoder_class(src, config)
        m = auto.from_pretrained(src, dtype=dtype or "auto")
        m.config.architectures = [type(m).__name__]
    except OSError as err:
        hub = _hub_hint(model, err)
        if hub:
            raise InputError(*hub) from None
        raise InputError(f"cannot load model {model}: {str(err).splitlines()[0]}",
                         "check the path; a hub id needs network access (HF_HUB_OFFLINE unset)") from None
    except Exception as err:  # safetensors raises its own type for a truncated or corrupt file
        if type(err).__name__ != "SafetensorError":
            raise
        raise InputError(f"cannot load model {model}: a weight file is damaged or truncated ({err})",
                         "re-download or re-save the model") from None
    m.eval().requires_grad_(False)
    _check_finite(m, model)
    to_lpc_layout(m)
    return m.to(device)


def to_lpc_layout(model: nn.Module) -> nn.Module:
    """Every quantizable matrix of `model` as an nn.Linear (out, in), in place: GPT-2 Conv1D layers become
    TransposedLinear, fused 3-D MoE experts one Linear per expert and matrix (io/families.py, io/experts.py).
    Forward results are unchanged; state dicts keep the checkpoint's layout for Conv1D."""
    linearize(model)
    unfuse_experts(model)
    return model


def model_from_config(model_dir: str | Path, dtype: torch.dtype | str | None = None, empty: bool = False) -> nn.Module:
    """The causal LM built from `model_dir/config.json` WITHOUT its quantization_config (eval mode, no grads),
    in lpc's layout (`to_lpc_layout`).

    lpc rebuilds quantized weights itself, so transformers must not see the artifact's (lpc or engine)
    quantization_config. dtype: the one given, else config.json's, else float32. empty=True puts the
    parameters on the meta device (no memory; buffers such as rotary tables are built normally)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    auto = AutoModelForCausalLM
    if model_kind(config) == "encoder":
        auto = auto_class((getattr(config, "architectures", None) or [None])[0])
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_config(config, dtype=dtype)
    return to_lpc_layout(model.eval().requires_grad_(False))


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model))
    except (OSError, ValueError) as err:
        hub = _hub_hint(model, err)
        if hub:
            raise InputError(*hub) from None
        raise InputError(f"cannot load a tokenizer from {model}: {str(err).splitlines()[0]}",
                         "the model directory needs its tokenizer files") from None


def _check_finite(model: nn.Module, source: str | Path) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p.float()).all():  # float8 has no isfinite
            raise InputError(f"model {source} has NaN or inf values in {name}",
                             "the checkpoint is broken; re-download or re-export it")


def copy_tokenizer_files(src: str | Path, dst: Path) -> list[str]:
    """Copy tokenizer (and generation config) files of a local model dir; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, dst / name)
            copied.append(name)
    return copied


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def find_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """Linear modules whose names match a `targets` glob and no `ignore` glob, in model order.

    A glob matches the full dotted name or its last component (`down_proj`, `*.mlp.*`, `lm_head`).
    Conv1D layers and fused MoE experts are Linears once the model is in lpc's layout (`to_lpc_layout`,
    done here when the loader did not). Routers, shared-expert gates and Linears whose weight is an
    embedding table (tied heads, e.g. BERT's MLM decoder) stay unquantized unless a target names them
    without wildcards. A warning names the share of matrix parameters left unreached.
    """
    to_lpc_layout(model)
    skip = [n for n in routers(model) + tied_to_embeddings(model) if not named_explicitly(n, targets)]
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets) and not _matches(n, ignore) and n not in skip}
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if any(p.dim() >= 2 for p in m.parameters(False))})
        raise InputError(f"no Linear layer matches targets {targets} (ignoring {ignore}); the model's layers with "
                         f"weight matrices are {', '.join(kinds)}",
                         "check the recipe's targets/ignore globs against the model's module names")
    warn_unreached(model, found, list(ignore) + skip)
    return found


def fuse_groups(names: Iterable[str], groups: list[list[str]]) -> list[list[str]]:
    """Partition target names into groups of siblings that share a global scale.

    Two Linears are fused when they have the same parent module and both last names appear in one
    entry of `groups` (e.g. q_proj/k_proj/v_proj). Every other Linear is a group of its own.
    """
    out: dict[tuple[str, int], list[str]] = {}
    singles = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        gi = next((i for i, g in enumerate(groups) if leaf in g), None)
        if gi is None:
            singles.append([name])
        else:
            out.setdefault((parent, gi), []).append(name)
    return [g for g in out.values()] + singles


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The (name, ModuleList) of a model's stack of decoder layers, if it has one we know how to walk."""
    candidates = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")
    for path in candidates:
        mod: nn.Module | None = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
