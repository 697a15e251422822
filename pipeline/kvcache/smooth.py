"""Key and value smoothing folded into the attention weights (QServe's SmoothAttention, arXiv 2405.04532).

A per-tensor KV scale serves the cache badly when a few key channels are much larger than the rest:
the small ones sink among FP8's subnormals, and inside an NVFP4 block of 16 the outlier channels set
the block scale. Smoothing divides key channel c of KV head h by s_hc = 2^e_hc and multiplies the
same channel of every query head reading that KV head by s_hc, so q.k (and so the attention) is
unchanged while the cache holds flatter keys under one per-tensor scale:

    k_proj rows (and bias) of (h, c)     / s_hc        q_proj rows (and bias) of (j, c)  * s_{h(j) c}

RoPE rotates channel c with its partner (c + rotary_dim/2 under transformers' `rotate_half`), so both
carry the same factor and RoPE commutes with the smoothing. Factors are powers of two: multiplying a
bf16/fp32 weight or activation by one is exact (no rounding, barring overflow), every product
q_c k_c of the attention is bit-identical, and the unquantized model's logits are identical. Values
likewise (no RoPE constraint): v_proj rows / s, o_proj columns of every query head of the group * s.
The engine needs nothing new: the weights are ordinary tensors and the cache one k_scale / v_scale.

Exponents come from the calibrated per-channel absmax after RoPE (`k_chan_amax` (kv_heads, head_dim)):
e = round(alpha * log2(a / median(a))) over the layer, a taken as the max over each RoPE pair; alpha 1
flattens every channel to the layer's median (within a factor sqrt(2)), 0 leaves the weights alone.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from lpc.pipeline.errors import InputError

MAX_SHIFT = 12  # |exponent| bound: far from bf16/fp32 overflow for any weight


def rope_partner(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """(head_dim,) long: the channel each channel is rotated with under `rotate_half` (x[i] with
    x[i + r/2] for i < r/2, r = rotary_dim); channels beyond the rotary ones partner themselves."""
    r = head_dim if rotary_dim is None else int(rotary_dim)
    if r % 2 or not 0 <= r <= head_dim:
        raise InputError(f"rotary dimension {r} does not fit head_dim {head_dim}", "check the model config")
    idx = torch.arange(head_dim)
    half = r // 2
    idx[:half], idx[half:r] = torch.arange(half, r), torch.arange(half)
    return idx


def exponents(chan_amax: torch.Tensor, alpha: float, partner: torch.Tensor | None = None,
              max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """chan_amax (kv_heads, head_dim) fp32 -> e (kv_heads, head_dim) int32 with s = 2^e: the smoothed
    channel holds chan_amax / s. Partners (RoPE pairs) get the same exponent; zero channels keep 0."""
    a = chan_amax.float()
    if partner is not None:
        a = torch.maximum(a, a[:, partner])
    live = a > 0
    if not bool(live.any()) or alpha == 0:
        return torch.zeros(a.shape, dtype=torch.int32)
    ref = a[live].median()
    e = torch.round(alpha * torch.log2(torch.where(live, a, ref) / ref))
    return e.clamp(-max_shift, max_shift).to(torch.int32)


def smoothed_amax(chan_amax: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(kv_heads,) absmax of each KV head after smoothing: exact, since the division by 2^e is."""
    return torch.ldexp(chan_amax.float(), -e.float()).amax(-1)


def _rows(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """w (heads * head_dim, ...) with row (h, c) multiplied by factor (heads, head_dim), in w's dtype."""
    f = factor.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype)
    return w * f


def _query_factor(s: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(kv_heads, D) -> (n_heads, D): query head j reads KV head j // (n_heads / kv_heads)."""
    return s.repeat_interleave(n_heads // s.shape[0], dim=0)


def transforms(attn: str, k_exp: torch.Tensor | None, v_exp: torch.Tensor | None, n_heads: int
               ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Parameter name -> exact transform of that tensor, for the attention module named `attn`
    (q_proj/k_proj/v_proj/o_proj Linears with (out, in) weights)."""
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if k_exp is not None:
        s = torch.ldexp(torch.ones(k_exp.shape), k_exp.float())
        sq = _query_factor(s, n_heads)
        for leaf in ("weight", "bias"):
            out[f"{attn}.k_proj.{leaf}"] = lambda w, s=s: _rows(w, 1.0 / s)
            out[f"{attn}.q_proj.{leaf}"] = lambda w, sq=sq: _rows(w, sq)
    if v_exp is not None:
        s = torch.ldexp(torch.ones(v_exp.shape), v_exp.float())
        sq = _query_factor(s, n_heads).reshape(1, -1)
        for leaf in ("weight", "bias"):
            out[f"{attn}.v_proj.{leaf}"] = lambda w, s=s: _rows(w, 1.0 / s)
        out[f"{attn}.o_proj.weight"] = lambda w, sq=sq: w * sq.to(w.dtype)  # columns: (out, n_heads * D)
    return out


def attention_names(model: nn.Module) -> dict[int, str]:
    """{decoder layer index: attention module name} for modules holding q_proj/k_proj/v_proj/o_proj."""
    found = {}
    for name, mod in model.named_modules():
        m = re.search(r"\.(\d+)\.[^.]+$", "." + name)
        if m and all(isinstance(getattr(mod, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            if hasattr(mod, "k_norm") or hasattr(mod, "q_norm"):
                raise InputError(f"kv_cache.smooth: {name} normalizes queries/keys per head (q_norm/k_norm), "
                                 "which would undo the smoothing", "drop kv_cache.smooth for this model")
            found[int(m.group(1))] = name
    return found


def model_geometry(config: Any) -> tuple[int, int, int, torch.Tensor]:
    """(n_heads, kv_heads, head_dim, RoPE partner) of a transformers config."""
    cfg = getattr(config, "text_config", None) or config
    n_heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rotary = int(head_dim * float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0))
    return n_heads, kv, head_dim, rope_partner(head_dim, rotary)


def smoothing_plan(stats: dict[str, torch.Tensor], config: Any, keys: float = 0.0, values: float = 0.0,
                   prefix: str = "lpc.kv.") -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """{layer: (key exponents | None, value exponents | None)} (kv_heads, head_dim) int32 from the
    calibrated `<prefix><i>.k_chan_amax` / `v_chan_amax`; `keys` / `values`: alpha (0 = not smoothed)."""
    n_heads, kv, head_dim, partner = model_geometry(config)
    out = {}
    for i in sorted({int(k[len(prefix):].split(".")[0]) for k in stats if k.startswith(prefix)}):
        pair = []
        for part, alpha, pairing in (("k", keys, partner), ("v", values, None)):
            if not alpha:
                pair.append(None)
                continue
            key = f"{prefix}{i}.{part}_chan_amax"
            if key not in stats:
                raise InputError(f"kv_cache.smooth needs per-channel K/V absmax ({key}) in the calibration",
                                 "re-run `lpc calibrate` with this recipe (it records them)")
            a = stats[key].float()
            if a.shape != (kv, head_dim):
                raise InputError(f"{key} has shape {tuple(a.shape)}, the model's KV heads x head_dim is "
                                 f"{(kv, head_dim)}", "calibrate the same model you quantize")
            pair.append(exponents(a, float(alpha), pairing))
        out[i] = (pair[0], pair[1])
    return out


def smoothed_stats(stats: dict[str, torch.Tensor], plan: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]],
                   prefix: str = "lpc.kv.") -> dict[str, torch.Tensor]:
    """The K/V statistics of the smoothed model: per-head and per-channel absmax divided by the factors
    (exact), and the exponents themselves as `<prefix><i>.k_smooth_log2` / `v_smooth_log2` (int32)."""
    out = dict(stats)
    for i, pair in plan.items():
        for part, e in zip(("k", "v"), pair):
            if e is None:
                continue
            chan = torch.ldexp(stats[f"{prefix}{i}.{part}_chan_amax"].float(), -e.float())
            out[f"{prefix}{i}.{part}_chan_amax"] = chan
            out[f"{prefix}{i}.{part}_amax"] = chan.amax(-1)
            out[f"{prefix}{i}.{part}_smooth_log2"] = e.to(torch.int32)
            sample = stats.get(f"{prefix}{i}.{part}_sample")  # (kv_heads, T, D): what the smoothed model writes
            if sample is not None:
                out[f"{prefix}{i}.{part}_sample"] = torch.ldexp(sample, -e[:, None, :].to(sample.dtype))
            q = stats.get(f"{prefix}{i}.q_sample")  # (heads, T, D): queries carry the key factors
            if part == "k" and q is not None:
                eq = _query_factor(e, q.shape[0])[:, None, :]
                out[f"{prefix}{i}.q_sample"] = torch.ldexp(q, eq.to(q.dtype))
    return out


def weight_transforms(model: nn.Module, plan: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]
                      ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Parameter name -> exact transform, for every smoothed layer of `model` (a meta skeleton works)."""
    names = attention_names(model)
    n_heads = model_geometry(model.config)[0]
    out = {}
    for i, (k_exp, v_exp) in plan.items():
        if (k_exp is not None or v_exp is not None) and i not in names:
            raise InputError(f"kv_cache.smooth: decoder layer {i} has no attention with q_proj/k_proj/v_proj/o_proj",
                             "drop kv_cache.smooth for this model")
        out.update(transforms(names[i], k_exp, v_exp, n_heads) if i in names else {})
    return out


@torch.no_grad()
def apply_transforms(model: nn.Module, tf: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> int:
    """Transform `model`'s parameters in place; returns how many changed."""
    done = 0
    for name, p in model.named_parameters():
        if name in tf and p.device.type != "meta":
            p.copy_(tf[name](p.data))
            done += 1
    return done


class SmoothedStore:
    """A checkpoint store (io/streaming.WeightStore) whose tensors come back transformed: the streamed
    quantize reads smoothed q/k/v/o weights exactly as the in-memory path holds them."""

    def __init__(self, store: Any, tf: dict[str, Callable[[torch.Tensor], torch.Tensor]]):
        self.store, self.tf = store, tf
        self.files = store.files

    def get(self, name: str) -> torch.Tensor:
        t = self.store.get(name)
        return self.tf[name](t) if name in self.tf else t

    def __contains__(self, name: str) -> bool:
        return name in self.store
