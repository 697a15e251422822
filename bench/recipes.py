"""Quality, bits, wall time and peak RSS of built-in recipes on the real model; prints JSON.

    python bench/recipes.py                       # the README table (all rows)
    python bench/recipes.py --only nvfp4 fp8      # some rows

Each row runs `lpc compress MODEL --recipe R --data calib.jsonl --ppl heldout.jsonl --json` in a fresh
process (so peak RSS is that run's), perplexity with the project protocol at seq-len 256. Every row
exports `lpc` (`--set export.format=lpc`): the evaluated model is lpc's artifact in the original's
dtype (fp32), whatever engine format `auto` would pick (a compressed-tensors export loads in bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LPC_ASSETS", REPO.parent / "shared" / "assets"))
ROWS = {
    "fp8": ("fp8", []),
    "nvfp4": ("nvfp4", []),
    "nvfp4 (plain RTN, no scale search)": ("nvfp4", ["quantize.weights.spec.scale_search=0", "quantize.importance=none"]),
    "nvfp4 + GPTQ": ("nvfp4", ["quantize.method=gptq"]),
    "nvfp4 W4A4": ("nvfp4_w4a4", []),
    "mxfp8": ("mxfp8", []),
    "mxfp4": ("mxfp4", []),
    "int4 (VS-Quant, OCTAV)": ("int4", []),
    "bcq (LO-BCQ)": ("bcq", []),
    "fgmp weights p=0.1": ("fgmp_nvfp4a16", ["allocate.fraction=0.1"]),
    "fgmp weights p=0.3": ("fgmp_nvfp4a16", []),
    "random p=0.1": ("fgmp_nvfp4a16", ["allocate.fraction=0.1", "allocate.policy=random"]),
    "random p=0.3": ("fgmp_nvfp4a16", ["allocate.policy=random"]),
    "magnitude p=0.1": ("fgmp_nvfp4a16", ["allocate.fraction=0.1", "allocate.policy=magnitude"]),
    "magnitude p=0.3": ("fgmp_nvfp4a16", ["allocate.policy=magnitude"]),
    "fgmp weights p=0.1 rtn": ("fgmp_nvfp4a16", ["allocate.fraction=0.1", "quantize.method=rtn"]),
    "fgmp weights p=0.3 rtn": ("fgmp_nvfp4a16", ["quantize.method=rtn"]),
    "random p=0.1 rtn": ("fgmp_nvfp4a16", ["allocate.fraction=0.1", "allocate.policy=random", "quantize.method=rtn"]),
    "random p=0.3 rtn": ("fgmp_nvfp4a16", ["allocate.policy=random", "quantize.method=rtn"]),
    "magnitude p=0.1 rtn": ("fgmp_nvfp4a16", ["allocate.fraction=0.1", "allocate.policy=magnitude", "quantize.method=rtn"]),
    "magnitude p=0.3 rtn": ("fgmp_nvfp4a16", ["allocate.policy=magnitude", "quantize.method=rtn"]),
    "fgmp weights+activations p=0.3": ("fgmp_nvfp4", []),
    "fgmp weights+activations p=0.3 rtn": ("fgmp_nvfp4", ["quantize.method=rtn"]),
    "nvfp4 + distill": ("nvfp4", ["quantize.method=distill"]),
    "fgmp weights p=0.3 + EoRA r8": ("fgmp_nvfp4a16", ["compensate.method=eora", "compensate.rank=8"]),
    "nvfp4 + EoRA r8": ("nvfp4_eora", []),
    "fp8 per-tensor": ("fp8", ["quantize.weights.spec.granularity=tensor"]),
    "fp8 per-tensor + distill": ("fp8", ["quantize.weights.spec.granularity=tensor", "quantize.method=distill"]),
    "vapr 4.75 bits": ("vapr", ["allocate.budget_bits=4.75", "allocate.pareto_budgets=[]"]),
    "vapr 5.0 bits": ("vapr", ["allocate.budget_bits=5.0", "allocate.pareto_budgets=[]"]),
    "vapr 5.5 bits": ("vapr", ["allocate.budget_bits=5.5"]),
    "vapr 6.0 bits": ("vapr", ["allocate.budget_bits=6.0", "allocate.pareto_budgets=[]"]),
}


def run_row(label: str, recipe: str, sets: list[str], work: Path) -> dict:
    model = ASSETS / "models" / "stories260K"
    heldout = ASSETS / "data" / "tinystories" / "heldout.jsonl"
    cmd = [sys.executable, "-m", "lpc.cli", "compress", str(model), "--recipe", recipe,
           "--data", str(ASSETS / "data" / "tinystories" / "calib.jsonl"), "--ppl", str(heldout),
           "-o", str(work / label.replace(" ", "_").replace("/", "_")), "--overwrite", "--json"]
    for s in ["export.format=lpc", *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"row": label, "error": proc.stderr.strip().splitlines()[-1:]}
    out = json.loads(proc.stdout)
    ev = out["eval"]
    return {"row": label, "recipe": recipe, "set": sets, "bits_per_weight": out["bits_per_weight"],
            "perplexity": ev["perplexity"][str(heldout)], "baseline": ev["baseline"]["perplexity"][str(heldout)],
            "kl_to_original": (ev.get("kl_to_baseline") or {}).get(str(heldout)),
            "compress_seconds": out["compress_seconds"], "peak_rss_mb": out["peak_rss_mb"],
            "stage_seconds": {s["stage"]: s["seconds"] for s in out["stages"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="row labels or recipe names to run")
    args = ap.parse_args()
    rows = {k: v for k, v in ROWS.items() if not args.only or k in args.only or v[0] in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_row(label, r, s, Path(tmp)) for label, (r, s) in rows.items()]
    json.dump({"model": "stories260K", "eval": "heldout.jsonl, seq-len 256", "rows": results}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
