"""compressed-tensors' tensor layouts of lpc's formats: one function per format, QTensor in, tensors out.

Each returns the tensors of one Linear `<m>` (names without the `<m>.` prefix) and the key of its scheme
in SCHEMES (the config group args the compressed-tensors compressor of that layout reads):

    nvfp4      weight_packed u8 (out, in/2) = lpc's qdata (two E2M1 codes a byte, element 2j low nibble),
               weight_scale f8e4m3 (out, in/16), weight_global_scale f32 (1,) = 1 / lpc's global_scale
               [input_global_scale f32 (1,), W4A4]                               "nvfp4-pack-quantized"
    mxfp4      weight_packed u8 (out, in/2), weight_scale u8 (out, in/32) biased E8M0  "mxfp4-pack-quantized"
    mxfp8      weight f8e4m3 (out, in), weight_scale u8 (out, in/32)                   "mxfp8-quantized"
    fp8_e4m3   weight f8e4m3 (out, in), weight_scale f32 (out, 1) or (1,)              "float-quantized"
    int        weight_packed i32 (out, in*bits/32): codes + 2^(bits-1) as unsigned bit fields, element j
               of each 32 at bits [j*bits, (j+1)*bits) of its word (compressed-tensors' dense packing;
               for 4 bits: 8 codes a word, element 0 lowest), weight_scale f32 (out, in/V) = lpc's
               effective per-vector step (e4m3 x global, bf16, or two-level integer x row scale, all
               exact in f32), weight_shape i64 (2,); group strategy, group_size V   "pack-quantized"

INT8 weights are also "pack-quantized" (four codes a word): compressed-tensors' "int-quantized" is its
W8A8 layout (its compressor and vLLM's scheme need quantized activations).
"""
from __future__ import annotations

from typing import Any

import torch

from lpc.formats import QTensor, get_format
from lpc.formats.numerics import unpack_bits, unpack_nibbles
from lpc.formats.nvfp4 import global_scale_for

NVFP4_FORMAT = "nvfp4-pack-quantized"
FP8_FORMAT = "float-quantized"
MXFP4_FORMAT = "mxfp4-pack-quantized"
MXFP8_FORMAT = "mxfp8-quantized"
INT_FORMAT = "pack-quantized"
GROUP = get_format("nvfp4").block_width()  # NVFP4 block width (16)
MX_GROUP = get_format("mxfp4").block_width()  # MXFP4 / MXFP8 block width (32)
FP8_BLOCK = 128  # rows x inputs per scale of lpc's fp8 granularity 'block' (formats/scaled_float.py)

_NVFP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP,
               "strategy": "tensor_group", "scale_dtype": "torch.float8_e4m3fn"}
_MX_ARGS = {"type": "float", "symmetric": True, "strategy": "group", "group_size": MX_GROUP, "dynamic": False,
            "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}


def _int_args(bits: int, vector: int) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": vector,
            "dynamic": False}


# Each scheme: (format, weights args, input activation args or None).
SCHEMES: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "nvfp4a16": (NVFP4_FORMAT, {**_NVFP4_ARGS, "dynamic": False}, None),
    "nvfp4": (NVFP4_FORMAT, {**_NVFP4_ARGS, "dynamic": False},
              {**_NVFP4_ARGS, "dynamic": "local", "observer": "static_minmax"}),
    "fp8_channel": (FP8_FORMAT, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                                 "dynamic": False}, None),
    "fp8_tensor": (FP8_FORMAT, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                "dynamic": False}, None),
    "fp8_block": (FP8_FORMAT, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                               "block_structure": [FP8_BLOCK, FP8_BLOCK], "dynamic": False}, None),
    "mxfp4a16": (MXFP4_FORMAT, {"num_bits": 4, **_MX_ARGS}, None),
    "mxfp8a16": (MXFP8_FORMAT, {"num_bits": 8, **_MX_ARGS}, None),
    **{f"w{b}a16_g{v}": (INT_FORMAT, _int_args(b, v), None) for b in (4, 8) for v in (16, 32, 64)},
}
# Formats compressed-tensors decompresses to bfloat16 whatever the model's dtype.
BF16_DECOMPRESSED = ("nvfp4a16", "nvfp4", "mxfp4a16", "mxfp8a16")


def reciprocal_scale(s: torch.Tensor) -> torch.Tensor:
    """lpc's per-tensor scale s (amax/(6*448), f32 (1,)) -> CT's global scale 1/s as f32 (1,).

    The division is done in float64 so the result is the correctly rounded f32 reciprocal."""
    return (1.0 / s.to(torch.float64)).to(torch.float32).reshape(1)


def nvfp4_tensors(q: QTensor, act: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], str]:
    """NVFP4 QTensor (in a multiple of 16) -> weight_packed u8 (out, in/2), weight_scale f8e4m3
    (out, in/16), weight_global_scale f32 (1,) [, input_global_scale f32 (1,)] and its scheme key."""
    out = {"weight_packed": q.data["qdata"].contiguous(),
           "weight_scale": q.data["scale"].to(torch.float8_e4m3fn).contiguous(),
           "weight_global_scale": reciprocal_scale(q.data["global_scale"])}
    if act is None:
        return out, "nvfp4a16"
    # lpc's activation quantizer uses s2 = global_scale_for(amax); CT divides by its reciprocal
    out["input_global_scale"] = reciprocal_scale(global_scale_for(torch.tensor(float(act["global_amax"]))))
    return out, "nvfp4"


def mx_tensors(q: QTensor) -> tuple[dict[str, torch.Tensor], str]:
    """MXFP4 / MXFP8 QTensor (in a multiple of 32) -> compressed-tensors' MX layout and scheme key:
    mxfp4: weight_packed u8 (out, in/2) = lpc's qdata (same nibble order), weight_scale u8 (out, in/32)
    = lpc's biased E8M0 exponents; mxfp8: weight f8e4m3 (out, in) = lpc's qdata, weight_scale as above."""
    scale = q.data["scale"].to(torch.uint8).contiguous()
    if q.format == "mxfp4":
        return {"weight_packed": q.data["qdata"].contiguous(), "weight_scale": scale}, "mxfp4a16"
    return {"weight": q.data["qdata"].view(torch.float8_e4m3fn).reshape(q.shape).contiguous(),
            "weight_scale": scale}, "mxfp8a16"


def fp8_tensors(q: QTensor) -> tuple[dict[str, torch.Tensor], str]:
    """fp8_e4m3 QTensor -> weight f8e4m3 (out, in), weight_scale f32 (out, 1), (1,) or per 128x128 block
    (ceil(out/128), ceil(in/128)), scheme key."""
    scale = q.data["scale"].to(torch.float32)
    if q.spec.get("granularity") == "block":
        return {"weight": q.data["qdata"].reshape(q.shape).contiguous(), "weight_scale": scale.contiguous()}, "fp8_block"
    per_tensor = scale.numel() == 1
    out = {"weight": q.data["qdata"].reshape(q.shape).contiguous(),
           "weight_scale": scale.reshape(1) if per_tensor else scale.reshape(-1, 1).contiguous()}
    return out, "fp8_tensor" if per_tensor else "fp8_channel"


def int_codes(q: QTensor) -> torch.Tensor:
    """lpc int QTensor -> its signed codes int8 (out, in)."""
    qdata = q.data["qdata"]
    if q.spec.get("bits", 4) == 8:
        return qdata.view(torch.int8)[:, : q.shape[-1]]
    codes = unpack_nibbles(qdata).to(torch.int8)
    return torch.where(codes >= 8, codes - 16, codes)[:, : q.shape[-1]]


def int_steps(q: QTensor) -> torch.Tensor:
    """lpc int QTensor -> its per-vector steps f32 (out, in/V): the factor each code is multiplied by."""
    spec = get_format("int").spec(**q.spec)
    scale, rows, nv = q.data["scale"], q.data["qdata"].shape[0], -(-q.shape[-1] // spec.vector)
    if spec.scale_format == "e4m3":
        return scale.to(torch.float32) * q.data["global_scale"].to(torch.float32)
    if spec.scale_format == "bf16":
        return scale.to(torch.float32)
    return unpack_bits(scale, spec.scale_bits, nv).to(torch.float32) * q.data["row_scale"].to(torch.float32).view(rows, 1)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes int8 (R, K), K a multiple of 32/bits -> int32 (R, K*bits/32): code + 2^(bits-1) as an
    unsigned `bits`-wide field, element j of each word at bits [j*bits, (j+1)*bits)."""
    per = 32 // bits
    u = (codes.to(torch.int64) + (1 << (bits - 1))).view(codes.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)  # fields do not overlap: the sum is their bitwise or
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def int_tensors(q: QTensor) -> tuple[dict[str, torch.Tensor], str]:
    """int QTensor (in a multiple of its vector) -> weight_packed i32, weight_scale f32, weight_shape i64."""
    spec = get_format("int").spec(**q.spec)
    out = {"weight_packed": pack_int32(int_codes(q), spec.bits),
           "weight_scale": int_steps(q).contiguous(),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    return out, f"w{spec.bits}a16_g{spec.vector}"


def layer_tensors(q: QTensor, act: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], str]:
    """Any format compressed-tensors holds -> (tensors, scheme key)."""
    if q.format == "nvfp4":
        return nvfp4_tensors(q, act)
    if q.format in ("mxfp4", "mxfp8"):
        return mx_tensors(q)
    if q.format == "int":
        return int_tensors(q)
    return fp8_tensors(q)
