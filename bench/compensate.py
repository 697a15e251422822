"""Figures for low-rank compensation on a real model: perplexity, bits per weight, stage time (JSON).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/compensate.py [--ranks 4 8 16] [--out runs/bench-compensate]

Calibrates once (Fisher on, so ESPACE's gradient statistic is available), quantizes once with the
`nvfp4` recipe, then runs the compensate stage for each method x rank and evaluates perplexity with
the project's protocol (`lpc.pipeline.evaluation.perplexity.perplexity`, seq_len 256). `seconds` is the
compensate stage's wall time, `cpu_seconds` its process CPU time. `--extra` adds the ablations
(factor precision, normalized ESPACE statistics).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
METHODS = {"eora": [], "svd": ["compensate.method=svd"],
           "espace_act": ["compensate.method=espace", "compensate.espace_stat=act"],
           "espace_weight": ["compensate.method=espace", "compensate.espace_stat=weight"],
           "espace_grad": ["compensate.method=espace", "compensate.espace_stat=grad"]}
EXTRA = {"eora_fp32": ["compensate.factor_format=fp32"], "eora_fp8": ["compensate.factor_format=fp8_e4m3"],
         "eora_nvfp4": ["compensate.factor_format=nvfp4"],
         "espace_act_norm": METHODS["espace_act"] + ["compensate.normalize_rows=true"],
         "espace_grad_norm": METHODS["espace_grad"] + ["compensate.normalize_rows=true"],
         "eora_budget": []}  # the parameters of uniform rank r, spread by allocate_ranks


def ppl(path: Path, heldout: Path, seq_len: int) -> float:
    from lpc.pipeline.evaluation.perplexity import perplexity
    from lpc.pipeline.artifact.load import load

    model, tok = load(path)
    return round(perplexity(model, tok, heldout, seq_len=seq_len)["perplexity"], 4)


def run(model: Path, calib_data: Path, heldout: Path, out: Path, ranks: list[int], extra: bool,
        seq_len: int = 256) -> dict[str, Any]:
    """Every figure of the table as one dict: baselines, then one row per method x rank."""
    from lpc.pipeline import stages
    from lpc.pipeline.stages.compensate import compensate
    from lpc.recipes import load_recipe

    base = load_recipe("nvfp4_eora", ["calibrate.fisher=true"])  # its calibration keeps the covariances
    cal = stages.calibrate(str(model), str(calib_data), out / "calib", base, overwrite=True)
    quant = stages.quantize(str(model), base, out / "quant", calib=out / "calib", overwrite=True)
    result: dict[str, Any] = {
        "model": str(model), "calib": str(calib_data), "heldout": str(heldout), "seq_len": seq_len,
        "calibrate_seconds": round(cal.seconds, 2),
        "fp32": {"perplexity": ppl(model, heldout, seq_len), "bits_per_weight": 32.0},
        "nvfp4": {"perplexity": ppl(out / "quant", heldout, seq_len),
                  "bits_per_weight": round(quant.manifest["bits_per_weight"], 4)},
        "rows": []}
    variants = {**METHODS, **(EXTRA if extra else {})}
    for rank in ranks:
        for name, sets in variants.items():
            if name == "eora_budget":
                per_rank = sum(sum(rec["shape"]) for rec in quant.manifest["layers"].values())
                sets = [f"compensate.budget_params={rank * per_rank}"]
            recipe = load_recipe("nvfp4_eora", ["calibrate.fisher=true", f"compensate.rank={rank}", *sets])
            cpu0 = time.process_time()  # wall time swings with other load on a shared machine; CPU time less
            res = compensate(out / "quant", out / "calib", recipe, out / "comp", overwrite=True)
            cpu = time.process_time() - cpu0
            s = res.manifest["summary"]
            row = {"method": name, "rank": rank, "perplexity": ppl(out / "comp", heldout, seq_len),
                   "bits_per_weight": round(s["bits_per_weight"], 4), "seconds": round(res.seconds, 2),
                   "cpu_seconds": round(cpu, 2),
                   "rel_output_error_before": round(s["rel_output_error_before"], 6),
                   "rel_output_error_after": round(s["rel_output_error"], 6)}
            logging.getLogger("bench").info("%s", row)
            result["rows"].append(row)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ASSETS / "models" / "stories260K")
    p.add_argument("--calib", type=Path, default=ASSETS / "data" / "tinystories" / "calib.jsonl")
    p.add_argument("--heldout", type=Path, default=ASSETS / "data" / "tinystories" / "heldout.jsonl")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-compensate")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--extra", action="store_true", help="also factor precision and normalized ESPACE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    print(json.dumps(run(args.model, args.calib, args.heldout, args.out, args.ranks, args.extra), indent=2))


if __name__ == "__main__":
    main()
