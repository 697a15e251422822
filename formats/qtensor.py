"""`QTensor`: a quantized tensor as named, packed fields plus the metadata to rebuild it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

from lpc.formats.errors import FormatError


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor.

    format: registry name of the format that made it.
    shape: original (unpadded) shape of the high-precision tensor.
    spec: the JSON-serializable spec it was quantized with (defaults filled in).
    data: packed fields by name (`qdata`, `scale`, `global_scale`, `mask`, `codebook`, ...);
        these are exactly the tensors written to safetensors.
    """

    format: str
    shape: tuple[int, ...]
    spec: dict[str, Any]
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def storage_bits(self) -> int:
        """Bits actually stored across all fields (padding included)."""
        return stored_bits(*self.data.values())

    def bits_per_weight(self) -> float:
        """Stored bits divided by the number of original elements (scales and padding included)."""
        return self.storage_bits() / max(self.numel, 1)

    def meta(self) -> dict[str, Any]:
        """What, besides `data`, is needed to rebuild this QTensor (goes to JSON)."""
        return {"format": self.format, "shape": list(self.shape), "spec": dict(self.spec)}


def stored_bits(*items: Union[torch.Tensor, "QTensor"]) -> int:
    """Bits stored for tensors and QTensors, summed: numel * element bits of a tensor (any dtype),
    every packed field of a QTensor (scales, masks, codebooks and padding included).

    The one place lpc counts stored bits; bits per weight divide this by the original numel.
    """
    total = 0
    for t in items:
        if isinstance(t, QTensor):
            total += t.storage_bits()
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size() * 8
        else:
            raise FormatError(f"stored_bits counts tensors and QTensors, not {type(t).__name__}",
                              "pass torch tensors or QTensors")
    return total
