"""Static K/V scale search: per layer, the multiplier m in [1, 2) of the calibrated absmax whose scale
(amax * m / 448 for FP8, the NVFP4 global scale likewise) gives the smallest attention-output error on
the calibration sample.

Why: a per-tensor FP8 (or NVFP4 global) scale fixes where every element falls on the format's grid.
Multiplying it by a power of two changes nothing (E4M3 rounding is relative), but its mantissa moves
all elements relative to the grid, and on SmolLM2 the cache's perplexity cost moves with it (keys
only, one multiplier for all layers, held-out text: +0.77% to +1.34%). m >= 1 never clips a
calibrated value; an engine loads amax * m / 448 as it loads any k_scale / v_scale.

Error of a candidate, on the first calibration sequence's queries, keys and values after RoPE
(`q_sample`, `k_sample`, `v_sample` from calibrate.py), causal attention as the model computes it:
keys: || softmax(q Q(k)^T / sqrt(d)) v - softmax(q k^T / sqrt(d)) v ||^2; values: || P (Q(v) - v) ||^2.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.kvcache.quantizer import KVSpec

CANDIDATES = tuple(1.0 + j / 16 for j in range(16))
SAMPLES = ("q_sample", "k_sample", "v_sample")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, T, D), k/v (Hkv, T, D) fp32 -> (causal attention output (Hq, T, D), probabilities (Hq, T, T))."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    t = q.shape[1]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    return p @ v, p


def layer_errors(sample: dict[str, torch.Tensor], spec: dict[str, Any], amax: dict[str, torch.Tensor],
                 candidates: tuple[float, ...] = CANDIDATES) -> dict[str, list[float]]:
    """{"k": [error per candidate], "v": [...]} for one layer. spec: KVSpec fields (format, spec)."""
    q, k, v = (sample[n].float() for n in SAMPLES)
    dtype = sample["k_sample"].dtype
    out, p = _attention(q, k, v)
    g = q.shape[0] // k.shape[0]
    errs: dict[str, list[float]] = {"k": [], "v": []}
    for m in candidates:
        fk = KVSpec(spec["format"], spec["spec"], amax["k"] * m).fake(k.to(dtype)[None])[0].float()
        errs["k"].append(float((_attention(q, fk, v)[0] - out).pow(2).sum()))
        fv = KVSpec(spec["format"], spec["spec"], amax["v"] * m).fake(v.to(dtype)[None])[0].float()
        errs["v"].append(float((p @ (fv - v).repeat_interleave(g, 0)).pow(2).sum()))
    return errs


def search_scales(stats: dict[str, torch.Tensor], kv: dict[str, Any], prefix: str = "lpc.kv."
                  ) -> dict[str, torch.Tensor]:
    """The statistics with each layer's `k_amax` / `v_amax` multiplied by its best candidate (recorded as
    `<prefix><i>.k_scale_mult` / `v_scale_mult`). Only per-tensor static scales are searched."""
    if kv.get("scales", "tensor") != "tensor" or kv.get("kivi"):
        raise InputError("kv_cache.scale_search searches one static scale per layer",
                         "use it with scales: tensor and without kivi")
    out = dict(stats)
    layers = sorted({int(k[len(prefix):].split(".")[0]) for k in stats if k.startswith(prefix)})
    for i in layers:
        sample = {n: stats.get(f"{prefix}{i}.{n}") for n in SAMPLES}
        if any(t is None for t in sample.values()):
            raise InputError(f"kv_cache.scale_search needs the calibration's attention samples ({prefix}{i}.q_sample)",
                             "re-run `lpc calibrate` with this recipe (it records them)")
        amax = {p: stats[f"{prefix}{i}.{p}_amax"].float().amax() for p in ("k", "v")}
        errs = layer_errors(sample, {"format": kv["format"], "spec": dict(kv.get("spec") or {})}, amax)
        for p in ("k", "v"):
            best = CANDIDATES[min(range(len(CANDIDATES)), key=lambda j: (errs[p][j], j))]
            out[f"{prefix}{i}.{p}_amax"] = stats[f"{prefix}{i}.{p}_amax"].float() * best
            out[f"{prefix}{i}.{p}_scale_mult"] = torch.tensor(best, dtype=torch.float32)
    return out
