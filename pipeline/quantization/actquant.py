"""Simulated activation quantization for evaluation (W4A4, W8A8, FGMP activation blocks).

A forward pre-hook on each planned Linear fake-quantizes the Linear's input with the same
format code as the weights: per-block scales are dynamic (computed from each input), the
per-tensor scale comes from calibration when `global_amax` is given.

    plan = {"model.layers.0.mlp.down_proj": {"format": "nvfp4", "global_amax": 12.5},
            "model.layers.0.mlp.up_proj": {"format": "fgmp", "channel_importance": f,
                                           "threshold": 1e-4, "global_amax": 3.0}}
    handles = attach_activation_quant(model, plan)
    ...                                  # evaluate
    for h in handles: h.remove()
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch.utils.hooks import RemovableHandle

from lpc.formats import get_format
from lpc.formats.fgmp import block_scores, fake_by_threshold
from lpc.pipeline.errors import ArtifactError, InputError

log = logging.getLogger(__name__)


class ActQuantEntry(BaseModel):
    """How to quantize one Linear's input."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    format: str = Field(description="a registered format name")
    spec: dict[str, Any] = Field(default_factory=dict, description="format options")
    global_amax: float | None = Field(None, gt=0, description="calibrated amax of the input")
    channel_importance: torch.Tensor | None = Field(None, description="fgmp: (in,) activation Fisher")
    threshold: float | None = Field(None, description="fgmp: blocks scoring above it go FP8")

    @model_validator(mode="after")
    def _fgmp_fields(self) -> "ActQuantEntry":
        is_fgmp = self.format.lower() == "fgmp"
        given = self.channel_importance is not None and self.threshold is not None
        if is_fgmp and not given:
            raise ValueError("format 'fgmp' needs channel_importance (in,) and threshold")
        if not is_fgmp and (self.channel_importance is not None or self.threshold is not None):
            raise ValueError("channel_importance/threshold only apply to format 'fgmp'")
        return self


def attach_activation_quant(model: torch.nn.Module, plan: dict[str, dict], straight_through: bool = False,
                            when: Callable[[], bool] | None = None) -> list[RemovableHandle]:
    """Register one input fake-quantizing pre-hook per planned Linear; returns the handles.

    straight_through: the quantized input keeps the gradient of the original (x + sg(Q(x) - x)),
    for tuning through simulated activation quantization. when: the hooks act only while it
    returns True (default always).
    plan: Linear module name -> {"format", "spec", "global_amax"} or, for FGMP activations,
    {"format": "fgmp", "channel_importance": (in,), "threshold": float, "global_amax": ...}.
    Raises InputError for an unknown module, a module that is not a Linear, or a bad entry;
    the model is left without hooks then.
    """
    modules = dict(model.named_modules())
    hooks = [(name, _build_hook(name, modules, entry)) for name, entry in plan.items()]
    return [modules[name].register_forward_pre_hook(_wrap(hook, straight_through, when)) for name, hook in hooks]


def _wrap(hook: Callable, straight_through: bool, when: Callable[[], bool] | None) -> Callable:
    if not straight_through and when is None:
        return hook

    def wrapped(module: torch.nn.Module, args: tuple) -> tuple | None:
        if when is not None and not when():
            return None
        out = hook(module, args)
        if straight_through:
            x = args[0]
            out = (x + (out[0] - x).detach(), *out[1:])
        return out

    return wrapped


def _build_hook(name: str, modules: dict[str, torch.nn.Module], raw: dict) -> Callable:
    module = modules.get(name)
    if not isinstance(module, torch.nn.Linear):
        found = "no such module" if module is None else type(module).__name__
        raise InputError(f"activation plan names '{name}' ({found})",
                         "plan keys must be names of torch.nn.Linear modules (model.named_modules())")
    try:
        entry = ActQuantEntry(**raw)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in err.errors())
        raise InputError(f"bad activation plan for '{name}': {msgs}",
                         "give {'format': name, 'spec': {...}, 'global_amax': float or null}") from None
    fmt = get_format(entry.format)
    fmt.spec(**entry.spec)  # fail now, not in the middle of an evaluation
    if entry.global_amax is not None and "global_amax" not in fmt.context_keys:
        raise InputError(f"format '{entry.format}' of '{name}' has no per-tensor scale for global_amax",
                         "drop global_amax for this format (its block scales are all dynamic)")
    if entry.channel_importance is not None and entry.channel_importance.shape != (module.in_features,):
        raise InputError(f"channel_importance of '{name}' has shape "
                         f"{tuple(entry.channel_importance.shape)}", f"give ({module.in_features},)")
    return _fgmp_hook(entry) if entry.channel_importance is not None else _plain_hook(entry)


def _context(entry: ActQuantEntry) -> dict[str, Any]:
    return {} if entry.global_amax is None else {"global_amax": entry.global_amax}


def _plain_hook(entry: ActQuantEntry) -> Callable:
    fmt, spec = get_format(entry.format), {**entry.spec, **_context(entry)}

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        with torch.no_grad():
            return (fmt.fake_quantize(args[0], **spec), *args[1:])

    return hook


def _fgmp_hook(entry: ActQuantEntry) -> Callable:
    """Each input block of 16 goes FP8 when its block score exceeds the threshold, else NVFP4."""
    fmt, ctx = get_format("fgmp"), _context(entry)
    importance = entry.channel_importance.detach().to(torch.float32)
    threshold = float(entry.threshold)

    spec = fmt.spec(**entry.spec)
    if spec.clip == "none" and not spec.scale_search:  # amax block scales: one pass, nothing packed
        def fused(module: torch.nn.Module, args: tuple) -> tuple:
            with torch.no_grad():
                return (fake_by_threshold(args[0], importance.to(args[0].device), entry.global_amax, threshold),
                        *args[1:])

        return fused

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        with torch.no_grad():
            mask = block_scores(x, importance.to(x.device), entry.global_amax) > threshold
            q = fmt.quantize(x, **entry.spec, mask=mask, importance=importance.to(x.device), **ctx)
            return (fmt.dequantize(q, dtype=x.dtype), *args[1:])

    return hook


def activation_config(recipe: Any, qtensors: dict[str, Any], stats, plan: dict[str, Any] | None = None
                      ) -> tuple[dict | None, dict]:
    """Activation quantization plan per quantized layer, and the tensors it refers to.

    An allocation plan's per-layer "activation" entries (FGMP mixing) win; otherwise the recipe's
    `quantize.activations` format applies to every quantized layer, its global amax calibrated.
    """
    plan = plan or {}
    from_plan = {n: e["activation"] for n, e in plan.items() if isinstance(e, dict) and e.get("activation")}
    if from_plan:
        return {"layers": {n: from_plan[n] for n in sorted(from_plan)}}, dict(plan.get("__aux__", {}))
    act = recipe.quantize.activations
    if act is None:
        return None, {}
    layers = {}
    for name in sorted(qtensors):
        amax = None
        if stats and name in stats and "act_absmax" in stats[name]:
            amax = float(stats[name]["act_absmax"].max())
        layers[name] = {"format": act.format, "spec": dict(act.spec), "global_amax": amax}
    return {"layers": layers}, {}


def activation_plan(acts: dict[str, Any], aux: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The stored activation plan with its tensor references (`"tensor:<key>"`) resolved."""
    plan = {}
    for name, entry in acts.get("layers", {}).items():
        entry = dict(entry)
        for key, val in list(entry.items()):
            if isinstance(val, str) and val.startswith("tensor:"):
                ref = val.removeprefix("tensor:")
                if ref not in aux:
                    raise ArtifactError(f"activation plan of {name} refers to missing tensor {ref}",
                                        "the artifact is incomplete; re-run quantize")
                entry[key] = aux[ref]
        plan[name] = entry
    return plan
