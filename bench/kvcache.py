"""KV cache quantization on SmolLM2-135M under the SmolLM2 protocol: JSON per KV setting.

Each setting is a recipe whose weights stay as they are (bf16) and whose kv_cache section quantizes
keys (after RoPE) and values on write. `lpc compress` calibrates the K/V absmax on calib_tail.txt
(128 windows of 512 tokens) and evaluates perplexity and KL to the original on eval_head.txt in
2048-token windows, with the quantized cache simulated through a transformers Cache (every position
attends to the quantized K/V, the current ones included). `kv_bits` counts the stored bits per K/V
element (block scales included) against the bf16 cache's 16.

    python bench/kvcache.py [--only kv_fp8,kv_nvfp4] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import CALIB, CALIB_SAMPLES, CALIB_SEQ_LEN, EVAL, EVAL_SEQ_LEN, OFFLINE_ENV, model_dir  # noqa: E402

SETTINGS = {
    "kv_fp8": ("kv_fp8", []),
    "kv_fp8_head": ("kv_fp8", ["kv_cache.scales=head"]),
    "kv_nvfp4": ("kv_nvfp4", []),
    "kv_nvfp4_head": ("kv_nvfp4", ["kv_cache.scales=head"]),
    "kv_int4_kivi": ("kv_nvfp4", ["kv_cache.format=int", "kv_cache.spec={bits: 4, vector: 32}",
                                  "kv_cache.scales=dynamic", "kv_cache.kivi=true", "kv_cache.group=32"]),
}


def run(name: str, model: Path, work: Path) -> dict:
    recipe, sets = SETTINGS[name]
    sets = sets + [f"calibrate.samples={CALIB_SAMPLES}", f"calibrate.seq_len={CALIB_SEQ_LEN}",
                   f"eval.seq_len={EVAL_SEQ_LEN}"]
    cmd = [sys.executable, "-m", "lpc.cli", "compress", str(model), "--recipe", recipe, "--data", str(CALIB),
           "--ppl", str(EVAL), "-o", str(work / name), "--overwrite", "--json"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    if out.returncode != 0:
        raise SystemExit(f"{name}: lpc compress failed: {out.stderr.strip()[-2000:]}")
    summary = json.loads(out.stdout)
    ev = summary["eval"]
    ppl, base = ev["perplexity"][str(EVAL)], ev["baseline"]["perplexity"][str(EVAL)]
    from lpc.formats import get_format  # the bench runs in the project venv
    from lpc.recipes import load_recipe

    rec = load_recipe(recipe, sets).kv_cache
    bits = get_format(rec.format).bits_per_weight(**rec.spec)
    return {"setting": name, "format": rec.format, "scales": rec.scales, "kivi": rec.kivi, "kv_bits": bits,
            "kv_fraction_of_bf16": bits / 16, "perplexity": ppl, "baseline_perplexity": base,
            "ppl_increase_pct": 100 * (ppl / base - 1), "kl": ev["kl_to_baseline"][str(EVAL)],
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["| KV cache | bits/element | perplexity | vs bf16 cache | KL |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['setting']}` | {r['kv_bits']:.2f} | {r['perplexity']:.3f} | "
                     f"{r['ppl_increase_pct']:+.2f}% | {r['kl']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="kv_fp8,kv_nvfp4", help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    ap.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temp dir)")
    args = ap.parse_args()
    model = model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = []
        for name in [s.strip() for s in args.only.split(",") if s.strip()]:
            rows.append(run(name, model, work))
            print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
