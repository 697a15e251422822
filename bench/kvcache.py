"""KV cache quantization on SmolLM2-135M under the SmolLM2 protocol: JSON per KV setting.

The weights stay as they are; keys (after RoPE) and values are quantized on write through lpc's
quantize-on-write transformers Cache, exactly as an lpc artifact with a `kv_cache` section is
evaluated (`lpc.pipeline.kvcache`). Calibration: the K/V absmax per layer (and KV head) over the
protocol's 128 windows of 512 tokens of calib_tail.txt (`kv_statistics`, what `lpc calibrate` runs for
such a recipe). Perplexity: eval_head.txt in 2048-token windows with lpc eval's own function, the
model loaded as `lpc eval` loads it. `kv_bits` counts stored bits per K/V element (block scales
included) against the bf16 cache's 16. Settings with `kv_cache.smooth` fold the smoothing into the model's
q/k/v/o weights for their run (restored after) and use the smoothed model's statistics, as quantize does;
`kv_cache.scale_search` multiplies each layer's amax by its searched multiplier. The statistics saved by
bench/kvcache_diagnose.py for the same calibration are reused when present.

    python bench/kvcache.py [--only kv_fp8,kv_nvfp4] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import CALIB, CALIB_SAMPLES, CALIB_SEQ_LEN, EVAL, EVAL_SEQ_LEN, model_dir  # noqa: E402

SETTINGS = {
    "kv_fp8": ("kv_fp8", []),
    "kv_fp8_head": ("kv_fp8", ["kv_cache.scales=head"]),
    "kv_nvfp4": ("kv_nvfp4", []),
    "kv_nvfp4_head": ("kv_nvfp4", ["kv_cache.scales=head"]),
    "kv_fp8_headroom": ("kv_fp8", ["kv_cache.headroom=2"]),
    "kv_fp8_token_sink": ("kv_fp8", ["kv_cache.scales=token", "kv_cache.sinks=1"]),
    "kv_nvfp4_headroom": ("kv_nvfp4", ["kv_cache.headroom=2"]),
    "kv_nvfp4_token_sink": ("kv_nvfp4", ["kv_cache.scales=token", "kv_cache.sinks=1"]),
    "kv_nvfp4_rotate": ("kv_nvfp4", ["kv_cache.rotate=true"]),
    "kv_nvfp4_rotate_headroom_sink": ("kv_nvfp4", ["kv_cache.rotate=true", "kv_cache.headroom=2", "kv_cache.sinks=1"]),
    "kv_nvfp4_kivi": ("kv_nvfp4", ["kv_cache.kivi=true", "kv_cache.group=16"]),
    "kv_int4_kivi": ("kv_nvfp4", ["kv_cache.format=int", "kv_cache.spec={bits: 4, vector: 32}",
                                  "kv_cache.scales=dynamic", "kv_cache.kivi=true", "kv_cache.group=32"]),
}
# key / value smoothing folded into q/k/v/o (kv_cache.smooth) and the per-layer scale search, alone and combined
for _fmt in ("fp8", "nvfp4"):
    _r = f"kv_{_fmt}"
    SETTINGS.update({
        f"{_r}_plain": (_r, ["kv_cache.smooth=false", "kv_cache.scale_search=false"]),
        f"{_r}_smooth_k": (_r, ["kv_cache.smooth=true", "kv_cache.smooth_alpha=1.0", "kv_cache.smooth_values=0",
                                "kv_cache.scale_search=false"]),
        f"{_r}_smooth_kv": (_r, ["kv_cache.smooth=true", "kv_cache.smooth_alpha=1.0", "kv_cache.smooth_values=1.0",
                                 "kv_cache.scale_search=false"]),
        f"{_r}_search": (_r, ["kv_cache.smooth=false", "kv_cache.scale_search=true"]),
        f"{_r}_smooth_k_search": (_r, ["kv_cache.smooth=true", "kv_cache.smooth_alpha=1.0", "kv_cache.smooth_values=0",
                                       "kv_cache.scale_search=true"]),
        f"{_r}_smooth_kv_search": (_r, ["kv_cache.smooth=true", "kv_cache.smooth_alpha=1.0",
                                        "kv_cache.smooth_values=1.0", "kv_cache.scale_search=true"]),
    })
# the statistics bench/kvcache_diagnose.py saves for the protocol's calibration (same windows, same model)
STATS = "/tmp/lpc-kvcache-smollm2-stats-v2-{}.safetensors"


class prepared:
    """Context: the model's q/k/v/o smoothed in place when the section asks for it, the K/V statistics it
    then calibrates to (`lpc.kv.*`, scale search applied) as the value; weights restored on exit."""

    def __init__(self, model, stats, kv):
        self.model, self.stats, self.kv, self.saved = model, stats, kv, {}

    def __enter__(self):
        from lpc.pipeline.kvcache.smooth import apply_transforms, smoothed_stats, smoothing_plan, weight_transforms

        st = self.stats
        if self.kv.smooth:
            plan = smoothing_plan(st, self.model.config, self.kv.smooth_alpha, self.kv.smooth_values)
            tf = weight_transforms(self.model, plan)
            self.saved = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in tf}
            apply_transforms(self.model, tf)
            st = smoothed_stats(st, plan)
        if self.kv.scale_search:
            from lpc.pipeline.kvcache.search import search_scales

            st = search_scales(st, self.kv.model_dump(mode="json"))
        return st

    def __exit__(self, *exc):
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.saved:
                    p.copy_(self.saved[n])
        self.saved = {}


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lpc.formats import get_format
    from lpc.pipeline.artifact.load import load
    from lpc.pipeline.evaluation.perplexity import perplexity
    from lpc.pipeline.io.data import calibration_batches
    from lpc.pipeline.kvcache import KV_PREFIX, attach_kv_quantization, kv_specs, kv_stat_tensors, kv_statistics
    from lpc.recipes import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="kv_fp8,kv_nvfp4", help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    args = ap.parse_args()
    src = model_dir()
    model, tok = load(src)
    t0 = time.perf_counter()
    cached = Path(STATS.format(CALIB_SAMPLES))
    if cached.is_file():
        from safetensors.torch import load_file

        amax = {KV_PREFIX + k: v for k, v in load_file(str(cached)).items()}
    else:
        batches = calibration_batches(str(CALIB), tok, CALIB_SAMPLES, CALIB_SEQ_LEN)
        amax = {KV_PREFIX + k: v for k, v in kv_stat_tensors(kv_statistics(model, batches)).items()}
    calib_s = time.perf_counter() - t0
    base = perplexity(model, tok, EVAL, seq_len=EVAL_SEQ_LEN)
    rows = [{"setting": "bf16 cache", "kv_bits": 16.0, "perplexity": base["perplexity"], "ppl_increase_pct": 0.0,
             "predictions": base.get("tokens") or base.get("predictions")}]
    print(json.dumps(rows[-1]), flush=True)
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        recipe, sets = SETTINGS[name]
        kv = load_recipe(recipe, sets).kv_cache
        t1 = time.perf_counter()
        with prepared(model, amax, kv) as st:
            specs = kv_specs(kv.model_dump(mode="json"), st, model.config.num_hidden_layers)
            handle = attach_kv_quantization(model, specs)
            try:
                r = perplexity(model, tok, EVAL, seq_len=EVAL_SEQ_LEN)
            finally:
                handle.remove()
        bits = get_format(kv.format).bits_per_weight(**kv.spec) + (32 / model.config.head_dim if kv.scales == "token" else 0)
        rows.append({"setting": name, "format": kv.format, "scales": kv.scales, "kivi": kv.kivi, "sinks": kv.sinks,
                     "headroom": kv.headroom, "smooth": kv.smooth and {"keys": kv.smooth_alpha, "values": kv.smooth_values},
                     "scale_search": kv.scale_search, "kv_bits": bits,
                     "perplexity": r["perplexity"], "ppl_increase_pct": 100 * (r["perplexity"] / base["perplexity"] - 1),
                     "eval_seconds": round(time.perf_counter() - t1, 1), "calib_seconds": round(calib_s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        print("| KV cache | bits/element | perplexity | vs bf16 cache |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['kv_bits']:.2f} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f}% |")


if __name__ == "__main__":
    main()
