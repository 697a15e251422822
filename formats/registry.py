"""Format registry: a format is a `Format` subclass registered under its file's name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from lpc.formats.errors import FormatError
from lpc.formats.qtensor import QTensor

_REGISTRY: dict[str, "Format"] = {}


class FormatSpec(BaseModel):
    """Base of every format's spec: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Format(ABC):
    """A number format: pure tensor -> tensor numerics.

    Subclasses set `name`, `Spec` (a `FormatSpec` subclass) and implement `_quantize`,
    `dequantize` and `_bits_per_weight`. Fields in a `QTensor.data` are already packed, so
    `pack`/`unpack` move them to and from a flat dict of named tensors for safetensors.
    """

    name: ClassVar[str]
    Spec: ClassVar[type[FormatSpec]] = FormatSpec
    description: ClassVar[str] = ""

    def spec(self, **spec: Any) -> FormatSpec:
        """Validate a spec dict; raise `FormatError` naming the bad key or value."""
        try:
            return self.Spec(**spec)
        except ValidationError as err:
            raise FormatError(_describe(self.name, err, self.Spec)) from None

    def quantize(self, x: torch.Tensor, **spec: Any) -> QTensor:
        """x: (..., K) float -> QTensor. Context tensors (`importance`, `global_amax`) ride in spec."""
        context = {k: spec.pop(k) for k in list(spec) if k in self.context_keys}
        s = self.spec(**spec)
        _check_tensor(self.name, x)
        return self._quantize(x, s, **context)

    context_keys: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def _quantize(self, x: torch.Tensor, spec: FormatSpec, **context: Any) -> QTensor: ...

    @abstractmethod
    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """QTensor -> tensor of the original shape."""

    def bits_per_weight(self, **spec: Any) -> float:
        """Nominal bits per element for a large tensor, scales included."""
        return self._bits_per_weight(self.spec(**spec))

    @abstractmethod
    def _bits_per_weight(self, spec: FormatSpec) -> float: ...

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
        """Quantize then dequantize, returning x's dtype."""
        return self.dequantize(self.quantize(x, **spec), dtype=x.dtype)


def _check_tensor(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise FormatError(f"{name} quantizes floating-point tensors, got {getattr(x, 'dtype', type(x))}")
    if x.ndim == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise FormatError(f"{name} cannot quantize a tensor of shape {tuple(x.shape)}",
                          "give a tensor with at least one element along the last dimension")
    if not torch.isfinite(x).all():
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
    key = cls.name.lower()
    if key in _REGISTRY:
        raise FormatError(f"format '{key}' is registered twice")
    _REGISTRY[key] = cls()
    return cls


def get_format(name: str) -> Format:
    """Look a format up by name (case-insensitive, '-' same as '_')."""
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise FormatError(f"unknown format '{name}'", f"known formats: {', '.join(list_formats())}")
    return _REGISTRY[key]


def list_formats() -> list[str]:
    return sorted(_REGISTRY)
