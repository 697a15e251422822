"""What differs between Hugging Face model families, reduced to one in-memory form: every quantizable
matrix an `nn.Linear` with an (out, in) weight.

- GPT-2 style `Conv1D` (y = x W + b with W (in, out)) becomes a `TransposedLinear`: an nn.Linear whose
  weight is (out, in) in memory and (in, out) in state dicts, so checkpoints keep the family's layout.
- MoE experts stored as fused 3-D parameters become one Linear per expert and matrix (io/experts.py).
- Routers and gates (a Linear directly inside a sparse-MoE block: Mixtral's `block_sparse_moe.gate`,
  Qwen-MoE's `mlp.gate` and `shared_expert_gate`) stay in high precision unless a target names them.
- Linears whose weight is an embedding table (tied heads: BERT's MLM decoder) are skipped likewise.
- Matrices lpc does not reach (unknown layouts) are counted, and a warning names their share.
- Sibling Linears that read the same input tensor (q/k/v, gate/up under any name) are found by one
  short forward pass (`derive_fuse_groups`), to share a global scale as engines fuse them.
- Encoders and encoder-decoders are recognised from the config (`model_kind`).
"""
from __future__ import annotations

import fnmatch
import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

# A share of matrix parameters left unreached above this is reported.
UNREACHED_WARN = 0.01


class TransposedLinear(nn.Linear):
    """An nn.Linear standing in for transformers' Conv1D (GPT-2, GPT, ...): the same y = x W^T + b with
    the weight (out, in) in memory, stored (in, out) in state dicts as the family's checkpoints are."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination and destination[key].dim() == 2:
            destination[key] = destination[key].detach().t().contiguous()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 2:
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def is_transposed(module: nn.Module) -> bool:
    """A layer whose checkpoint weight is (in, out): a Conv1D or its TransposedLinear stand-in."""
    return isinstance(module, TransposedLinear) or type(module).__name__ == "Conv1D"


def linearize(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D of `model` by an equal TransposedLinear (in place, any device,
    meta included); returns the names replaced."""
    done = []
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != "Conv1D" or not hasattr(mod, "nx"):
            continue
        # the weight may be an lpc weight marker (uint8, empty) when transformers loads an lpc artifact
        dtype = next((t.dtype for t in (mod.weight, mod.bias) if t is not None and t.is_floating_point()), None)
        lin = TransposedLinear(mod.nx, mod.nf, bias=mod.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(mod.weight.detach().t().contiguous(), requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
        _replace(model, name, lin)
        done.append(name)
    return done


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def checkpoint_layout(model: nn.Module, name: str, w: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight `w` of layer `name` in the layout its state-dict entry has ((in, out) for Conv1D)."""
    return w.t().contiguous() if is_transposed(model.get_submodule(name)) else w


def moe_block(module: nn.Module) -> bool:
    """A sparse-MoE block: a module holding an `experts` child (a ModuleList or fused experts)."""
    return isinstance(getattr(module, "experts", None), nn.Module)


def routers(model: nn.Module) -> list[str]:
    """Names of the modules that route tokens or gate a shared expert: direct children of a sparse-MoE
    block that hold a weight of their own (Mixtral `block_sparse_moe.gate`, Qwen-MoE `mlp.gate` and
    `mlp.shared_expert_gate`, transformers 5's TopKRouter modules)."""
    out = []
    for name, mod in model.named_modules():
        if moe_block(mod):
            out += [f"{name}.{leaf}" if name else leaf for leaf, child in mod.named_children()
                    if leaf != "experts" and isinstance(getattr(child, "weight", None), torch.Tensor)]
    return out


def tied_to_embeddings(model: nn.Module) -> list[str]:
    """Names of the Linears whose weight is an embedding table (tied output heads)."""
    tables = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.numel()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.numel()
            and m.weight.device.type != "meta" and m.weight.data_ptr() in tables]


def named_explicitly(name: str, targets: Iterable[str]) -> bool:
    """True when a target glob without wildcards names `name` (full name or last component)."""
    leaf = name.rsplit(".", 1)[-1]
    return any(not any(c in t for c in "*?[") and t in (name, leaf) for t in targets)


def unreached_share(model: nn.Module, reached: Iterable[str], ignore: Iterable[str]) -> tuple[float, list[str]]:
    """(share of matrix parameters held outside any Linear, so no recipe can quantize them; their names).

    Matrix parameters: floating tensors of 2 or more dimensions outside embeddings, outside the layers
    the recipe ignores (lm_head...) and outside routers; `reached`: the target Linears."""
    reached = set(reached)
    skip = set(routers(model))
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total, left, names = 0, 0, []
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() < 2 or not p.is_floating_point() or id(p) in emb:
                continue
            if mname in skip or any(fnmatch.fnmatchcase(mname, g) or fnmatch.fnmatchcase(mname.rsplit(".", 1)[-1], g)
                                    for g in ignore):
                continue
            total += p.numel()
            if mname not in reached and not isinstance(mod, nn.Linear):  # a Linear left out is the recipe's choice
                left += p.numel()
                names.append(f"{mname}.{pname}" if mname else pname)
    return (left / total if total else 0.0), names


def warn_unreached(model: nn.Module, reached: Iterable[str], ignore: Iterable[str]) -> float:
    """Log a warning naming the share of matrix parameters that stay unquantized (above 1%)."""
    share, names = unreached_share(model, reached, ignore)
    if share > UNREACHED_WARN:
        log.warning("%.1f%% of the model's matrix parameters are in layouts lpc does not quantize and stay in "
                    "their original precision (e.g. %s)", 100 * share, names[0])
    return share


def model_kind(config: Any) -> str:
    """'encoder-decoder' (T5, BART...), 'encoder' (BERT-style: no causal LM), or 'decoder'.

    config: a transformers config or config.json's dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("is_encoder_decoder", False):
        return "encoder-decoder"
    if get("model_type", "") in ENCODER_TYPES:
        return "encoder"
    return "decoder"


# Encoder-only model types (masked LM / embeddings, no causal head of their own).
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "camembert", "mpnet", "modernbert", "nomic_bert")


def layout_config(model: nn.Module) -> dict[str, list[str]]:
    """What an artifact's quantization_config records about layouts engines may not hold (empty when none):
    `transposed`: Conv1D layers (TransposedLinear), `experts`: MoE experts split into Linears."""
    from lpc.pipeline.io.experts import ExpertLinears

    out = {"transposed": [n for n, m in model.named_modules() if isinstance(m, TransposedLinear)],
           "experts": [n for n, m in model.named_modules() if isinstance(m, ExpertLinears)]}
    return {k: v for k, v in out.items() if v}


def engine_layout_refusal(qconfig: dict[str, Any], engine: str) -> str | None:
    """Why an engine export (compressed-tensors, modelopt) cannot hold the artifact's layouts, or None."""
    if qconfig.get("transposed"):
        return (f"layer {qconfig['transposed'][0]} is a GPT-2 style Conv1D (weight stored (in, out)), which "
                f"{engine}'s Linear layouts cannot hold")
    if qconfig.get("experts") and engine != "compressed-tensors":  # CT: per-expert names (export/ct_experts.py)
        return (f"{qconfig['experts'][0]} holds MoE experts, which lpc writes per expert only in "
                f"compressed-tensors' layout, not in {engine}'s")
    return None


def derive_fuse_groups(model: nn.Module, targets: dict[str, nn.Linear]) -> list[list[str]]:
    """Sibling Linears that read the very same input tensor (q/k/v, gate/up, BERT's query/key/value,
    older MoE experts' w1/w3), found by one forward pass of four tokens: the groups engines fuse into
    one GEMM, whatever the family calls them. Returns groups of last names (`fuse_groups`' form), each
    with two or more members; [] when the model cannot run (weights on meta)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return []
    ids = probe_ids(model.config).to(next(model.parameters()).device)
    with _first_inputs(targets) as seen, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return groups_by_input(seen)


def probe_ids(config: Any) -> torch.Tensor:
    """The four-token input the fuse-group probe runs (ids 1..4 within the vocabulary)."""
    vocab = int(getattr(config, "vocab_size", 4) or 4)
    return torch.arange(1, 5).remainder(vocab).unsqueeze(0)


def derive_layer_groups(layer: nn.Module, targets: dict[str, nn.Module], args: tuple, kwargs: dict
                        ) -> tuple[list[list[str]], tuple]:
    """`derive_fuse_groups` for one materialised decoder layer run on the probe's hidden states (the
    layer-streaming path, where the whole model never runs): (groups, the args of the next layer)."""
    with _first_inputs(targets) as seen, torch.no_grad():
        out = layer(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    return groups_by_input(seen), (hidden,) + tuple(args[1:])


@contextmanager
def _first_inputs(targets: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """name -> the first input tensor each target sees while the block runs (kept alive, so that no
    id is reused)."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_mod, args):
            seen.setdefault(name, args[0])
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(n)) for n, mod in targets.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def groups_by_input(seen: dict[str, torch.Tensor]) -> list[list[str]]:
    """Last names of the targets that read one input tensor, in the order the forward first met them."""
    by_input: dict[tuple[str, int], list[str]] = {}
    for name, x in seen.items():
        by_input.setdefault((name.rpartition(".")[0], id(x)), []).append(name.rpartition(".")[2])
    groups: list[list[str]] = []
    for leaves in by_input.values():
        if len(leaves) > 1 and sorted(leaves) not in groups:
            groups.append(sorted(leaves))
    return groups


def merge_groups(given: list[list[str]], derived: list[list[str]]) -> list[list[str]]:
    """The recipe's fuse groups plus the derived ones that share no name with them; an empty list in the
    recipe (`quantize.fuse_groups: []`) turns sharing off: every layer keeps its own global scale."""
    if not given:
        return []
    named = {leaf for g in given for leaf in g}
    return [list(g) for g in given] + [g for g in derived if not named & set(g)]
