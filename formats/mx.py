"""OCP Microscaling (MX) block formats shared by `mxfp4` and `mxfp8`.

Blocks of 32 along the last dimension share an E8M0 scale X = 2^(floor(log2 amax) - emax_elem)
(emax 2 for E2M1, 8 for E4M3), stored as a uint8 biased exponent (bias 127; an all-zero block
stores 127, i.e. X = 1). Elements are x / X rounded to nearest-even in the element format,
saturating at its largest value. Clipping (mse/sensitivity) tries the exponent one above and one
below the OCP choice per block (clip_grid/clip_min do not apply: the scale is a power of two).
"""
from __future__ import annotations

from abc import abstractmethod

from typing import Any, Callable, ClassVar

import torch

from lpc.formats import fast, kernels
from lpc.formats.clipping import search_block_scales
from lpc.formats.numerics import (
    as_rows, blocks_of, e2m1_decode, e2m1_encode, importance_rows, pack_nibbles, pad_last, padded,
    row_chunks, unpack_nibbles,
)
from lpc.formats.qtensor import QTensor
from lpc.formats.registry import BlockSpec, Format

BLOCK = 32
E8M0_BIAS = 127
# A power-of-two scale leaves three useful choices: the OCP exponent, one up (the OCP rule
# saturates blocks whose amax / X lies above the element max) and one down (clipping).
MX_MULTIPLIERS = [1.0, 2.0, 0.5]


class MXSpec(BlockSpec):
    pass


def scale_exponent(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """amax (any shape) float32 -> int32 exponent floor(log2 amax) - emax in [-127, 127] (0 -> 0),
    read exactly from the float's bits (a float log2 could round up just below a power of two)."""
    return kernels.mx_exponent(amax, emax)


def exp2(exp: torch.Tensor) -> torch.Tensor:
    """int32 exponents in [-127, 127] -> float32 powers of two (exact, 2^-127 included)."""
    return kernels.pow2(exp.to(torch.int32))


class MXFormat(Format):
    """Subclasses set `emax` and implement `_encode` / `_decode` of the scaled elements."""

    Spec = MXSpec
    emax: ClassVar[int]
    elem_bits: ClassVar[int]
    kernel: ClassVar[Callable]  # the fused amax-scaled path (lpc.formats.kernels)
    # MX has no per-tensor scale: a global_amax (sent to every block format) is accepted, unused.
    context_keys = ("importance", "global_amax")

    def _quantize(self, x: torch.Tensor, spec: MXSpec, importance: Any = None,
                  global_amax: Any = None) -> QTensor:
        """x: (..., K) -> qdata (R, Kp*bits/8), scale uint8 (R, Kp/32) biased exponents."""
        if spec.clip == "none":
            qdata, scale = fast.run(self.kernel, blocks_of(x, BLOCK))
            return QTensor(self.name, tuple(x.shape), spec.model_dump(),
                           {"qdata": qdata.reshape(qdata.shape[0], -1), "scale": scale})
        rows = as_rows(x)
        n_rows, k = rows.shape
        kp = padded(k, BLOCK)
        weight = None
        if spec.clip == "sensitivity":
            weight = importance_rows(importance, tuple(x.shape))
        qdata, scale = None, torch.empty(n_rows, kp // BLOCK, dtype=torch.uint8, device=x.device)
        for sl in row_chunks(n_rows, kp):
            xb = pad_last(rows[sl], BLOCK).view(-1, kp // BLOCK, BLOCK)
            wb = None if weight is None else pad_last(weight[sl], BLOCK).view_as(xb)
            exp = self.choose_exponents(xb, spec, wb)
            codes = self._encode(xb / exp2(exp).unsqueeze(-1)).view(xb.shape[0], -1)
            if qdata is None:
                qdata = torch.empty(n_rows, codes.shape[-1], dtype=codes.dtype, device=x.device)
            qdata[sl] = codes
            scale[sl] = (exp + E8M0_BIAS).to(torch.uint8)
        return QTensor(self.name, tuple(x.shape), spec.model_dump(), {"qdata": qdata, "scale": scale})

    def choose_exponents(self, xb: torch.Tensor, spec: MXSpec, wb: torch.Tensor | None) -> torch.Tensor:
        """Blocks (R, B, 32) float32 -> int32 scale exponents (R, B)."""
        amax = xb.abs().amax(-1)
        if spec.clip == "none":
            return scale_exponent(amax, self.emax)
        best = search_block_scales(
            xb, amax, lambda a: exp2(scale_exponent(a, self.emax)),
            lambda v, s: self._decode(self._encode(v / s.unsqueeze(-1))).view_as(v) * s.unsqueeze(-1),
            wb, spec.clip_grid, spec.clip_min, mults=MX_MULTIPLIERS)
        return scale_exponent(best, 0)

    def _dequantize(self, q: QTensor) -> torch.Tensor:
        scale = q.data["scale"]
        vals = self._decode(q.data["qdata"]).view(scale.shape[0], scale.shape[1], BLOCK)
        x = vals * exp2(scale.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)
        return x.view(scale.shape[0], -1)[:, : q.shape[-1]].reshape(q.shape)

    def fields(self, meta: dict[str, Any]) -> tuple[str, ...]:
        return ("qdata", "scale")

    def _block_width(self, spec: MXSpec) -> int:
        return BLOCK

    def _bits_per_weight(self, spec: MXSpec) -> float:
        return self.elem_bits + 8.0 / BLOCK

    @abstractmethod
    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        """Scaled float32 elements -> element codes (the E2M1 or E4M3 grid of the subclass)."""

    @abstractmethod
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Element codes -> float32 values."""


class MXFP4Base(MXFormat):
    emax = 2
    elem_bits = 4
    kernel = staticmethod(kernels.mxfp4)

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        """Scaled values (..., 2n) -> packed E2M1 codes (..., n) uint8."""
        return pack_nibbles(e2m1_encode(y))

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return e2m1_decode(unpack_nibbles(codes))


class MXFP8Base(MXFormat):
    emax = 8
    elem_bits = 8
    kernel = staticmethod(kernels.mxfp8)

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        """Scaled values -> float8_e4m3fn, saturating at 448 (the cast alone would give NaN)."""
        return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)
