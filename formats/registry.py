"""Format registry: a format is a `Format` subclass registered under its file's name."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lpc.formats import rotation
from lpc.formats.errors import FormatError, LpcError
from lpc.formats.qtensor import QTensor

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> handler, the one mechanism behind every pluggable concept of lpc (formats, quantize
    methods, allocation policies, compensation methods, exporters).

    Names are case-insensitive and '-' equals '_'; a name registered twice is refused; an unknown
    name raises `error` listing the valid ones.
    """

    def __init__(self, kind: str, error: type[LpcError] = FormatError):
        self.kind, self.error = kind, error
        self._items: dict[str, T] = {}
        self._names: dict[str, str] = {}

    @staticmethod
    def key(name: str) -> str:
        return str(name).lower().replace("-", "_")

    def add(self, name: str, handler: T) -> T:
        k = self.key(name)
        if k in self._items:
            raise self.error(f"{self.kind} '{name}' is registered twice")
        self._items[k], self._names[k] = handler, name
        return handler

    def remove(self, name: str) -> T:
        """Unregister `name` (a plugin unloaded, a test's handler); returns its handler."""
        k = self.key(self.get(name) and name)
        self._names.pop(k)
        return self._items.pop(k)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda handler: self.add(name, handler)

    def get(self, name: str) -> T:
        k = self.key(name)
        if k not in self._items:
            raise self.error(f"unknown {self.kind} '{name}'", f"known {self.kind}s: {', '.join(self.names())}")
        return self._items[k]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.key(name) in self._items

    def names(self) -> list[str]:
        return sorted(self._names.values())


_REGISTRY: Registry["Format"] = Registry("format")


class FormatSpec(BaseModel):
    """Base of every format's spec: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ClipMethod = Literal["none", "mse", "octav", "sensitivity"]


class BlockSpec(FormatSpec):
    """Spec fields shared by every format with scales: clipping and an optional rotation."""

    clip: ClipMethod = Field("none", description=(
        "how scales are chosen: none = amax; mse = best of a grid of scale multipliers per "
        "block; octav = OCTAV fixed point (integer grids only); sensitivity = best multiplier "
        "under importance-weighted squared error (needs importance=)"))
    clip_grid: int = Field(16, ge=2, le=64, description="multipliers tried by mse/sensitivity")
    clip_min: float = Field(0.5, gt=0.0, lt=1.0, description="smallest multiplier tried")
    rotate: bool = Field(False, description="random Hadamard rotation of 16-element blocks first")
    rotate_seed: int = Field(0, ge=0, description="seed of the rotation's sign vector")


class Format(ABC):
    """A number format: pure tensor -> tensor numerics.

    Subclasses set `name`, `Spec` (a `FormatSpec` subclass; `BlockSpec` adds clipping and
    rotation) and implement `_quantize`, `_dequantize` and `_bits_per_weight` (block formats also
    `_block_width`, and `pinned_context` when they derive more than the tensor amax from
    several blocks); `quantize` and
    `dequantize` here validate, rotate and unrotate around them. Fields in a `QTensor.data` are already packed, so
    `pack`/`unpack` move them to and from a flat dict of named tensors for safetensors.
    """

    name: ClassVar[str]
    Spec: ClassVar[type[FormatSpec]] = FormatSpec
    description: ClassVar[str] = ""

    # Clip methods this format accepts; OCTAV's noise model holds for uniform integer grids only.
    clip_methods: ClassVar[tuple[str, ...]] = ("none", "mse", "sensitivity")

    def spec(self, **spec: Any) -> FormatSpec:
        """Validate a spec dict; raise `FormatError` naming the bad key or value."""
        try:
            s = self.Spec(**spec)
        except ValidationError as err:
            raise FormatError(_describe(self.name, err, self.Spec)) from None
        clip = getattr(s, "clip", "none")
        if clip not in self.clip_methods:
            why = " (OCTAV assumes a uniform integer grid; this format's grid is not)" if clip == "octav" else ""
            raise FormatError(f"{self.name} does not support clip='{clip}'{why}",
                              f"use clip in {list(self.clip_methods)}")
        return s

    def quantize(self, x: torch.Tensor, **spec: Any) -> QTensor:
        """x: (..., K) float -> QTensor. Context tensors (`importance`, `global_amax`) ride in spec.

        Does not modify x. With `rotate=True` the blocks of 16 are rotated first (importance is
        replaced by its block mean, the diagonal of the rotated weighting) and `global_amax`, if
        given, must be the amax of the rotated tensor.
        """
        s, context = self._checked(x, spec)
        return self._quantize_checked(x, s, context)

    def _checked(self, x: torch.Tensor, spec: dict[str, Any]) -> tuple[FormatSpec, dict[str, Any]]:
        """(validated spec, context tensors) of a quantize call; raises FormatError for a bad spec,
        a non-finite or empty x, or sensitivity clipping without importance."""
        context = {k: v for k, v in spec.items() if k in self.context_keys}
        s = self.spec(**{k: v for k, v in spec.items() if k not in self.context_keys})
        _check_tensor(self.name, x)
        if getattr(s, "clip", "none") == "sensitivity" and context.get("importance") is None:
            raise FormatError(f"{self.name}: clip='sensitivity' needs importance=",
                              "pass importance (per input channel (K,) or x's shape) or use clip='mse'")
        return s, context

    def _quantize_checked(self, x: torch.Tensor, s: FormatSpec, context: dict[str, Any]) -> QTensor:
        if not getattr(s, "rotate", False):
            return self._quantize(x, s, **context)
        if context.get("importance") is not None:
            context = {**context, "importance": rotation.block_mean(context["importance"], x.shape)}
        q = self._quantize(rotation.rotate(x, s.rotate_seed), s, **context)
        return dataclasses.replace(q, shape=tuple(x.shape))

    context_keys: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def _quantize(self, x: torch.Tensor, spec: FormatSpec, **context: Any) -> QTensor: ...

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """QTensor -> tensor of the original shape (rotation, if any, undone)."""
        if not q.spec.get("rotate", False):
            return self._dequantize(q).to(dtype)
        inner = rotation.rotated_shape(q.shape)
        y = self._dequantize(dataclasses.replace(q, shape=inner))
        return rotation.unrotate(y, int(q.spec.get("rotate_seed", 0)), q.shape[-1]).to(dtype)

    @abstractmethod
    def _dequantize(self, q: QTensor) -> torch.Tensor:
        """QTensor (whose `shape` is what `_quantize` saw) -> float32 tensor of that shape."""

    def bits_per_weight(self, **spec: Any) -> float:
        """Nominal bits per element for a large tensor, scales included."""
        return self._bits_per_weight(self.spec(**spec))

    @abstractmethod
    def _bits_per_weight(self, spec: FormatSpec) -> float: ...

    def block_width(self, **spec: Any) -> int | None:
        """Elements per scale block along the last (input) dimension for this spec; None when the
        scales are per channel or per tensor (no blocks along the input)."""
        return self._block_width(self.spec(**spec))

    def _block_width(self, spec: FormatSpec) -> int | None:
        return None

    def pinned_context(self, x: torch.Tensor, spec: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Context that fixes every quantity this format derives from more than one scale block of
        x: x (..., K) float; spec: the format's spec; context: tensors already chosen (kept as given).

        With it, quantizing column slices of x that start on block boundaries gives the codes of
        quantizing x whole (what GPTQ's error feedback relies on). Here: the tensor amax
        (`global_amax`); formats with row scales, fitted codebooks or a chosen mask add theirs.
        """
        ctx = dict(context)
        if "global_amax" in self.context_keys and ctx.get("global_amax") is None:
            ctx["global_amax"] = x.detach().abs().amax()
        return ctx

    def pack(self, q: QTensor) -> dict[str, torch.Tensor]:
        """QTensor -> {field: tensor} ready for safetensors (no copy of the data)."""
        return dict(q.data)

    def unpack(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QTensor:
        """Inverse of `pack`: fields plus `QTensor.meta()` -> QTensor."""
        missing = [f for f in self.fields(meta) if f not in tensors]
        if missing:
            raise FormatError(f"{self.name} tensor is missing fields {missing}",
                              "the artifact is incomplete; re-run the stage that wrote it")
        return QTensor(self.name, tuple(meta["shape"]), dict(meta.get("spec", {})),
                       {k: tensors[k] for k in tensors})

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        """Names of the fields a QTensor of this format must carry."""
        return ("qdata",)

    def fake_quantize(self, x: torch.Tensor, **spec: Any) -> torch.Tensor:
        """Quantize then dequantize, returning x's dtype; through the format's fused `_fake` when it
        has one for this spec (the same values, nothing packed)."""
        s, context = self._checked(x, spec)
        if not getattr(s, "rotate", False):
            out = self._fake(x, s, **context)
            if out is not None:
                return out.to(x.dtype)
        return self.dequantize(self._quantize_checked(x, s, context), dtype=x.dtype)

    def _fake(self, x: torch.Tensor, spec: FormatSpec, **context: Any) -> torch.Tensor | None:
        """dequantize(quantize(x)) as float32 in one pass, bit for bit, or None (the default) where
        this format or spec has no fused path. x is finite and not rotated."""
        return None


def _check_tensor(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise FormatError(f"{name} quantizes floating-point tensors, got {getattr(x, 'dtype', type(x))}")
    if x.ndim == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise FormatError(f"{name} cannot quantize a tensor of shape {tuple(x.shape)}",
                          "give a tensor with at least one element along the last dimension")
    lo, hi = torch.aminmax(x)  # NaN and inf reach the extremes: one pass, no temporaries
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise FormatError(f"{name}: the tensor holds NaN or inf values",
                          "fix the weights before quantizing (they are broken upstream)")


def _describe(name: str, err: ValidationError, spec_cls: type[FormatSpec]) -> str:
    valid = ", ".join(spec_cls.model_fields) or "(none)"
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (valid keys: {valid})")
        else:
            parts.append(f"{loc}={e.get('input')!r}: {e['msg']}")
    return f"bad {name} spec: " + "; ".join(parts)


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: register a format under `cls.name`; duplicates are refused."""
    _REGISTRY.add(cls.name.lower(), cls())
    return cls


def get_format(name: str) -> Format:
    """Look a format up by name (case-insensitive, '-' same as '_')."""
    return _REGISTRY.get(name)


def list_formats() -> list[str]:
    return _REGISTRY.names()
