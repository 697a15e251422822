"""MoE experts as one nn.Linear per expert and matrix, so that every stage (calibration hooks, Fisher,
GPTQ, quantization, bits per weight) treats them like any other Linear.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, ... as fused 3-D parameters of one
module: `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I), applied by a loop over the
experts that received tokens. `unfuse_experts` replaces such a module by `ExpertLinears`, which holds
`experts.<e>.gate_up_proj` (2I, H) and `experts.<e>.down_proj` (H, I) as Linears and runs the same loop,
so its output is bit-identical (checked once per class on random data before any replacement; a class
whose output differs is left alone, and its parameters are reported as unreached). Gate and up stay
one matrix per expert: one global scale, as engines fuse them (w13).

`fuse_experts` puts the fused parameters back (a plain transformers model again, e.g. before
save_pretrained, which writes the family's own checkpoint keys).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FUSED = ("gate_up_proj", "down_proj")
_checked: dict[type, bool] = {}


def fused_experts(module: nn.Module) -> bool:
    """A module whose only parameters are the 3-D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(FUSED) or not hasattr(module, "act_fn"):
        return False
    gu, down = params["gate_up_proj"], params["down_proj"]
    return (gu.dim() == 3 and down.dim() == 3 and gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2]
            and gu.shape[2] == down.shape[1])


class ExpertLinears(nn.Module):
    """The experts of one MoE block as Linears: `<e>.gate_up_proj` (2I, H) and `<e>.down_proj` (H, I).

    forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H), the loop of
    transformers' eager experts: for each expert hit, act(gate) * up of its tokens, down-projected,
    scaled by the routing weight and added up."""

    def __init__(self, experts: nn.ModuleList, act_fn: nn.Module, template: nn.Module):
        super().__init__()
        for e, pair in enumerate(experts):  # named `<e>.gate_up_proj`, as the experts of older checkpoints
            self.add_module(str(e), pair)
        self.act_fn = act_fn
        self.num_experts = len(experts)
        self.__dict__["template"] = template  # the fused module without weights (not a submodule)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for idx in hit:
            e = int(idx[0])
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = self._modules[str(e)].gate_up_proj(hidden_states[tok]).chunk(2, dim=-1)
            out = self._modules[str(e)].down_proj(self.act_fn(gate) * up)
            out = out * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, out.to(final.dtype))
        return final


def _split(module: nn.Module) -> ExpertLinears:
    """ExpertLinears sharing `module`'s weights (views, no copy); `module` is kept as an empty template."""
    gu, down = module.gate_up_proj, module.down_proj
    experts = nn.ModuleList()
    for e in range(gu.shape[0]):
        pair = nn.Module()
        pair.gate_up_proj = _linear(gu[e])
        pair.down_proj = _linear(down[e])
        experts.append(pair)
    template = copy.copy(module)
    template._parameters = {}
    return ExpertLinears(experts, module.act_fn, template)


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach(), requires_grad=False)
    return lin


def _same_output(module: nn.Module) -> bool:
    """Does ExpertLinears reproduce `module`'s class exactly? (once per class, on a small random copy)."""
    cls = type(module)
    if cls not in _checked:
        e, two_i, h = module.gate_up_proj.shape
        probe = copy.copy(module)
        probe._parameters = {}
        gen = torch.Generator().manual_seed(0)
        probe.gate_up_proj = nn.Parameter(torch.randn(e, two_i, h, generator=gen), requires_grad=False)
        probe.down_proj = nn.Parameter(torch.randn(e, h, two_i // 2, generator=gen), requires_grad=False)
        x = torch.randn(7, h, generator=gen)
        index = torch.stack([torch.randperm(e, generator=gen)[:min(2, e)] for _ in range(7)])
        weights = torch.rand(7, index.shape[1], generator=gen)
        try:
            with torch.no_grad():
                want = probe(x, index, weights)
                got = _split(probe)(x, index, weights)
            _checked[cls] = bool(torch.equal(want, got))
        except Exception as err:  # an experts class with another calling convention
            log.info("experts class %s not split (%s)", cls.__name__, err)
            _checked[cls] = False
        if not _checked[cls]:
            log.info("experts class %s computes differently from ExpertLinears: left fused", cls.__name__)
    return _checked[cls]


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused-experts module of `model` by ExpertLinears (in place; meta weights allowed).

    Returns the names of the modules replaced."""
    done = []
    for name, mod in list(model.named_modules()):
        if not fused_experts(mod) or not _same_output(mod):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, _split(mod))
        done.append(name)
    return done


def fuse_experts(model: nn.Module) -> list[str]:
    """Put the fused 3-D parameters back for every ExpertLinears whose Linears carry no hooks (in place)."""
    done = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, ExpertLinears) or _hooked(mod):
            continue
        fused = copy.copy(mod.template)
        fused._parameters = {}
        fused.gate_up_proj = nn.Parameter(torch.stack([mod._modules[str(e)].gate_up_proj.weight.detach() for e in range(mod.num_experts)]),
                                          requires_grad=False)
        fused.down_proj = nn.Parameter(torch.stack([mod._modules[str(e)].down_proj.weight.detach() for e in range(mod.num_experts)]),
                                       requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, fused)
        done.append(name)
    return done


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def expert_names(model: nn.Module) -> list[str]:
    """Names of the per-expert Linears of `model` (after unfuse_experts)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertLinears):
            out += [f"{name}.{n}" for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
    return out
