"""Where the KV cache quantization error of SmolLM2-135M comes from: JSON per variant.

Measured on held-out calibration text only (never eval_head.txt): the windows of calib_tail.txt after
the 128 x 512 calibration tokens, in 2048-token windows. Variants: keys only / values only, the first
(attention-sink) token kept in bf16, per-token scales, per-head scales, fp32 compute, and per layer
the norm of the first token's key against the others (the attention sink), and key / value smoothing
folded into the weights (`smooth k=alpha`, lpc.pipeline.kvcache.smooth) at several alphas, and the
per-layer static scale search (`scale search`, lpc.pipeline.kvcache.search): the settings `kv_cache.smooth`
and `kv_cache.scale_search` are chosen from, and per-RoPE-pair key multipliers (`pair multipliers`: channel
pair (c, c + 32) of every KV head scaled by its own m in [0.5, 1), as folding m into k_proj rows and 1/m into
q_proj rows would, chosen per pair to minimise the query-weighted rounding error on the calibration sample,
the layer scale unchanged). Each row gives perplexity and its increase over the bf16 cache in the same compute
dtype. `key_energy` rows (per layer, on the first calibration sequence's keys): the share of key energy held by
each token's largest elements (|k| >= half the token's absmax) and the FP8 relative squared error of those
elements and of the rest under the per-layer scale, the per-token scale and a per-token power-of-two scale.

    python bench/kvcache_diagnose.py [--windows 3] [--calib-windows 128] [--only fp8,nvfp4] [--variants a,b]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import CALIB, CALIB_SAMPLES, CALIB_SEQ_LEN, model_dir, score  # noqa: E402

STATS = "/tmp/lpc-kvcache-smollm2-stats-v2-{}.safetensors"  # per calibration size (channels, samples)
ALPHAS = (0.25, 0.5, 0.75, 1.0)


def heldout_windows(tok, n: int, seq_len: int = 2048) -> list[list[int]]:
    ids = list(tok(CALIB.read_text(encoding="utf-8"))["input_ids"])[CALIB_SAMPLES * CALIB_SEQ_LEN:]
    return [ids[i:i + seq_len] for i in range(0, n * seq_len, seq_len)]


def variants(fmt: str, spec: dict) -> dict[str, dict]:
    return {f"{fmt}": {}, f"{fmt} keys only": {"values": False}, f"{fmt} values only": {"keys": False},
            f"{fmt} sink kept": {"sinks": 1}, f"{fmt} per-token scales": {"per_token": True},
            f"{fmt} per-token scales + sink kept": {"per_token": True, "sinks": 1},
            f"{fmt} rotated": {"rotate": True}, f"{fmt} rotated + headroom 2 + sink": {"rotate": True, "headroom": 2.0,
                                                                                     "sinks": 1},
            f"{fmt} KIVI keys (16 tokens)": {"kivi": True},
            f"{fmt} headroom 2": {"headroom": 2.0}, f"{fmt} headroom 2 + sink kept": {"headroom": 2.0, "sinks": 1},
            **{f"{fmt} smooth k={a}": {"smooth_k": a} for a in ALPHAS},
            **{f"{fmt} smooth k={a} v={a}": {"smooth_k": a, "smooth_v": a} for a in ALPHAS},
            **{f"{fmt} smooth v={a}": {"smooth_v": a} for a in (0.5, 1.0)},
            f"{fmt} scale search": {"search": True}, f"{fmt} pair multipliers": {"pairs": True}, f"{fmt} smooth k=1.0 + scale search": {"smooth_k": 1.0, "search": True},
            f"{fmt} smooth k=1.0 v=1.0 + scale search": {"smooth_k": 1.0, "smooth_v": 1.0, "search": True}}


class smoothed:
    """Context: `model`'s attention weights smoothed in place (keys alpha `k`, values `v`), the K/V
    statistics of the smoothed model as the value; the weights are restored on exit."""

    def __init__(self, model, stats, k: float = 0.0, v: float = 0.0):
        self.model, self.stats, self.k, self.v = model, stats, k, v

    def __enter__(self):
        from lpc.pipeline.kvcache.smooth import apply_transforms, smoothed_stats, smoothing_plan, weight_transforms

        if not (self.k or self.v):
            return self.stats
        plan = smoothing_plan(self.stats, self.model.config, self.k, self.v, prefix="")
        tf = weight_transforms(self.model, plan)
        self.saved = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in tf}
        apply_transforms(self.model, tf)
        return smoothed_stats(self.stats, plan, prefix="")

    def __exit__(self, *exc):
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in getattr(self, "saved", {}):
                    p.copy_(self.saved[n])
        self.saved = {}


def pair_spec_class():
    """KVSpec whose keys are multiplied per (KV head, channel) by `mult` before quantization and divided after:
    what the cache holds when m is folded into k_proj rows and 1/m into q_proj rows (RoPE commutes with a
    factor shared by a rotated pair)."""
    import dataclasses

    import torch

    from lpc.pipeline.kvcache import KVSpec

    @dataclasses.dataclass(frozen=True)
    class PairSpec(KVSpec):
        mult: torch.Tensor | None = None  # (kv_heads, head_dim)

        def fake(self, x):
            m = self.mult[None, :, None, :].float()
            y = KVSpec.fake(dataclasses.replace(self, mult=None), (x.float() * m).to(x.dtype))
            return (y.float() / m).to(x.dtype)

    return PairSpec


def pair_multipliers(fmt, spec, stats, layer, steps: int = 32):
    """(kv_heads, head_dim) multipliers in [0.5, 1), per RoPE pair, each minimising the pair's rounding error
    of the first calibration sequence's keys weighted by the query energy of its channels."""
    import torch

    from lpc.pipeline.kvcache.smooth import rope_partner

    k = stats[f"{layer}.k_sample"].to(torch.bfloat16)
    q = stats[f"{layer}.q_sample"].float()
    h, d = k.shape[0], k.shape[-1]
    q_energy = q.pow(2).reshape(h, q.shape[0] // h, -1, d).sum((1, 2))
    partner, cls, amax = rope_partner(d), pair_spec_class(), stats[f"{layer}.k_amax"].amax()
    cands = [0.5 + j / (2 * steps) for j in range(steps)]
    errs = []
    for m in cands:
        f = cls(fmt, spec, amax, mult=torch.full((h, d), m)).fake(k[None])[0].float()
        e = (f - k.float()).pow(2).sum(1) * q_energy
        errs.append(e + e[:, partner])
    return torch.tensor(cands)[torch.stack(errs).argmin(0)]


def key_energy(stats, layer) -> dict:
    """Where the FP8 key error sits: energy share and relative error of each token's largest elements."""
    import torch

    from lpc.formats import get_format

    fmt = get_format("fp8_e4m3")
    k = stats[f"{layer}.k_sample"].to(torch.bfloat16).float()
    tok = k.abs().amax(-1, keepdim=True)
    top = k.abs() >= tok / 2

    def fake(a):
        return fmt.fake_quantize(k / a, granularity="tensor", global_amax=torch.tensor(1.0)) * a

    row = {"layer": layer, "top_elements": round(float(top.float().mean()), 4),
           "top_energy": round(float(k[top].pow(2).sum() / k.pow(2).sum()), 3)}
    for name, a in (("tensor", stats[f"{layer}.k_amax"].amax()), ("token", tok),
                    ("token_pow2", torch.exp2(torch.ceil(torch.log2(tok))))):
        e = (fake(a) - k).pow(2)
        row[f"{name}_rel_err_top"] = float(f"{float(e[top].sum() / k[top].pow(2).sum()):.3e}")
        row[f"{name}_rel_err_rest"] = float(f"{float(e[~top].sum() / k[~top].pow(2).sum()):.3e}")
    return row


def specs_for(fmt, spec, stats, n_layers, keys=True, values=True, sinks=0, per_token=False, head=False,
              headroom=1.0, rotate=False, kivi=False, smooth_k=0.0, smooth_v=0.0, search=False, pairs=False):
    from lpc.pipeline.kvcache import KVSpec

    out = []
    for i in range(n_layers):
        pair = []
        for part, on in (("k", keys), ("v", values)):
            a = stats[f"{i}.{part}_amax"].float() * headroom
            kw = dict(per_token=per_token, sinks=sinks, rotate=rotate, per_channel=kivi and part == "k", group=16)
            if on and pairs and part == "k":
                pair.append(pair_spec_class()(fmt, spec, a.amax(), mult=pair_multipliers(fmt, spec, stats, i), **kw))
            else:
                pair.append(KVSpec(fmt, spec, a if head else a.amax(), **kw) if on else None)
        out.append(tuple(pair))
    return out


def sink_profile(model, seqs) -> list[dict]:
    """Per layer: |k| and |v| of the first token over the median token (first window)."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([seqs[0]]), past_key_values=cache, use_cache=True)
    rows = []
    for i, layer in enumerate(cache.layers):
        kn, vn = layer.keys[0].float().norm(dim=-1), layer.values[0].float().norm(dim=-1)  # (H, T)
        rows.append({"layer": i, "k0_over_median": round(float((kn[:, 0] / kn[:, 1:].median(-1).values).max()), 2),
                     "v0_over_median": round(float((vn[:, 0] / vn[:, 1:].median(-1).values).min()), 3),
                     "k_amax": round(float(layer.keys.abs().amax()), 2),
                     "k_amax_no_first": round(float(layer.keys[:, :, 1:].abs().amax()), 2)})
    return rows


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import load_file, save_file

    from lpc.pipeline.artifact.load import load
    from lpc.pipeline.io.data import calibration_batches
    from lpc.pipeline.kvcache import attach_kv_quantization, kv_stat_tensors, kv_statistics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--calib-windows", type=int, default=CALIB_SAMPLES, help="calibration windows of 512 tokens")
    ap.add_argument("--only", default="fp8,nvfp4")
    ap.add_argument("--fp32", type=int, default=1, help="1: also the plain format in fp32 compute")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default all)")
    ap.add_argument("--tag", default="", help="a `run` field added to every row")
    args = ap.parse_args()
    tag = {"run": args.tag} if args.tag else {}
    model, tok = load(model_dir())
    path = Path(STATS.format(args.calib_windows))
    if not path.is_file():
        save_file(kv_stat_tensors(kv_statistics(model, calibration_batches(str(CALIB), tok, args.calib_windows,
                                                                           CALIB_SEQ_LEN))), str(path))
    stats = load_file(str(path))
    seqs = heldout_windows(tok, args.windows)
    for r in sink_profile(model, seqs):
        print(json.dumps({"sink_profile": r}), flush=True)
    for i in range(model.config.num_hidden_layers):
        print(json.dumps({**tag, "key_energy": key_energy(stats, i)}), flush=True)
    n = model.config.num_hidden_layers
    formats = {"fp8": ("fp8_e4m3", {"granularity": "tensor"}), "nvfp4": ("nvfp4", {})}
    for dtype in (torch.bfloat16, torch.float32)[:1 + args.fp32]:
        model.to(dtype)
        base = score(model, seqs)
        print(json.dumps({**tag, "variant": "bf16 cache", "compute": str(dtype), **base}), flush=True)
        for name in args.only.split(","):
            fmt, spec = formats[name]
            for label, kw in variants(name, spec).items():
                if (dtype == torch.float32 and label != name) or (args.variants and label not in args.variants.split(",")):
                    continue
                t0 = time.perf_counter()
                with smoothed(model, stats, kw.get("smooth_k", 0.0), kw.get("smooth_v", 0.0)) as st:
                    if kw.get("search"):
                        from lpc.pipeline.kvcache.search import search_scales

                        st = search_scales(st, {"format": fmt, "spec": spec}, prefix="")
                    handle = attach_kv_quantization(model, specs_for(fmt, spec, st, n, **kw))
                    try:
                        r = score(model, seqs)
                    finally:
                        handle.remove()
                print(json.dumps({**tag, "variant": label, "compute": str(dtype), "perplexity": r["perplexity"],
                                  "ppl_increase_pct": round(100 * (r["perplexity"] / base["perplexity"] - 1), 3),
                                  "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
