"""Every method's paper claim, re-measured on SmolLM2-135M under the SmolLM2 protocol; JSON per row.

    python bench/claims.py                          # every claim (about an hour on 2 cores)
    python bench/claims.py --only clipping,eora     # some claims
    python bench/claims.py --report bench/results/claims.jsonl   # the README table + verdicts, no run

Each row is `bench/smollm2.py`'s row: `lpc compress` with the protocol's calibration (128 windows of
512 tokens of calib_tail.txt) in one child process, `lpc eval --baseline ORIGINAL` on eval_head.txt
(2048-token windows) in another. Rows of one claim differ only in the setting the claim is about; rows
whose calibration is the same reuse the first row's (lpc skips a calibration whose inputs and config
match, and recomputes it otherwise). A claim holds when its method's KL to the original is lower than
every baseline's (KL is the headline; perplexity moves with rounding luck). Rows append to
bench/results/claims.jsonl as they finish, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _protocol as P  # noqa: E402
from smollm2 import run_row  # noqa: E402

RTN = "quantize.method=rtn"
PLAIN = "quantize.weights.spec.scale_search=0"
# claim -> (statement, the method's row, {row label: (recipe, --set overrides)})
CLAIMS: dict[str, tuple[str, str, dict[str, tuple[str, list[str]]]]] = {
    "fgmp": ("FGMP (Fisher-weighted block choice) beats random and magnitude at equal FP8 fraction p=0.3",
             "fgmp p=0.3", {
                 "fgmp p=0.3": ("fgmp_nvfp4a16", [RTN]),
                 "random p=0.3": ("fgmp_nvfp4a16", [RTN, "allocate.policy=random"]),
                 "magnitude p=0.3": ("fgmp_nvfp4a16", [RTN, "allocate.policy=magnitude"])}),
    "clipping": ("sensitivity-weighted clipping beats max and MSE clipping for NVFP4 blocks",
                 "nvfp4 clip=sensitivity", {
                     "nvfp4 clip=sensitivity": ("nvfp4", [PLAIN, "quantize.weights.spec.clip=sensitivity"]),
                     "nvfp4 clip=none (max)": ("nvfp4", [PLAIN, "quantize.weights.spec.clip=none"]),
                     "nvfp4 clip=mse": ("nvfp4", [PLAIN, "quantize.weights.spec.clip=mse"])}),
    "bcq": ("LO-BCQ beats NVFP4 and MXFP4 at <= 4.625 bits", "bcq", {
        "bcq": ("bcq", []),
        "nvfp4 (plain)": ("nvfp4", [PLAIN]),
        "mxfp4": ("mxfp4", [])}),
    "octav": ("OCTAV clipping beats max scaling for int4", "int4 clip=octav", {
        "int4 clip=octav": ("int4", []),
        "int4 clip=none (max)": ("int4", ["quantize.weights.spec.clip=none"])}),
    "vsquant": ("VS-Quant per-vector int4 beats per-channel int4", "int4 per-vector (16)", {
        "int4 per-vector (16)": ("int4", ["quantize.weights.spec.clip=none"]),
        "int4 per-channel": ("int4", ["quantize.weights.spec.clip=none", "quantize.weights.spec.vector=0",
                                      "quantize.weights.spec.scale_format=bf16"])}),
    "eora": ("EoRA beats SVD at ranks 8, 16 and 32", "", {
        f"{m} r{r}": ("nvfp4_eora", [f"compensate.method={m}", f"compensate.rank={r}"])
        for r in (8, 16, 32) for m in ("eora", "svd")}),
    "espace": ("ESPACE gradient-aware projection beats plain autocorrelation at equal rank (16)",
               "espace grad r16", {
                   "espace grad r16": ("nvfp4_eora", ["calibrate.fisher=true", "compensate.method=espace",
                                                      "compensate.espace_stat=grad", "compensate.rank=16"]),
                   "espace act r16": ("nvfp4_eora", ["calibrate.fisher=true", "compensate.method=espace",
                                                     "compensate.espace_stat=act", "compensate.rank=16"])}),
    "vapr": ("VaPr at 5.5 bits beats uniform NVFP4 (and its Pareto front is monotone when measured)",
             "vapr 5.5 bits", {
                 "vapr 5.5 bits": ("vapr", []),
                 "nvfp4": ("nvfp4", [])}),
}


def pareto_of(run: Path) -> dict:
    """The allocation's Pareto front (VaPr: bits per weight and the loss increase lpc measured on the
    calibration text at each budget), when the row's run has one."""
    f = run / "stages" / "alloc" / "pareto.json"
    if not f.is_file():
        return {}
    points = json.loads(f.read_text())["points"]
    return {"pareto": [{k: p.get(k) for k in ("budget_bits_per_weight", "bits_per_weight", "predicted_loss",
                                              "measured_loss_increase")} for p in points]}


def monotone(points: list[dict]) -> bool | None:
    """Whether the measured loss increase falls as bits grow along the front (None: not measured)."""
    pts = sorted((p["bits_per_weight"], p["measured_loss_increase"]) for p in points
                 if p.get("measured_loss_increase") is not None)
    if len(pts) < 2:
        return None
    return all(b[1] < a[1] for a, b in zip(pts, pts[1:]))


def verdict(claim: str, rows: dict[str, dict]) -> dict:
    """Whether the claim's method has the lowest KL among its rows (EoRA: at every rank)."""
    statement, method, labels = CLAIMS[claim]
    have = {k: rows[k] for k in labels if k in rows and rows[k].get("kl_to_original") is not None}
    if claim == "eora":
        pairs = {r: (have.get(f"eora r{r}"), have.get(f"svd r{r}")) for r in (8, 16, 32)}
        if any(a is None or b is None for a, b in pairs.values()):
            return {"claim": claim, "statement": statement, "holds": None, "missing": True}
        wins = {r: a["kl_to_original"] < b["kl_to_original"] for r, (a, b) in pairs.items()}
        return {"claim": claim, "statement": statement, "holds": all(wins.values()), "by_rank": wins}
    if len(have) < len(labels):
        return {"claim": claim, "statement": statement, "holds": None, "missing": sorted(set(labels) - set(have))}
    best = min(have, key=lambda k: have[k]["kl_to_original"])
    out = {"claim": claim, "statement": statement, "holds": best == method, "lowest_kl": best}
    if claim == "vapr":  # and the measured front must be monotone
        out["pareto_monotone"] = monotone(have[method].get("pareto") or [])
        out["holds"] = out["holds"] and out["pareto_monotone"] is True
    return out


def report(rows: list[dict]) -> str:
    by = {r["row"]: r for r in rows if "error" not in r}
    out = ["| claim | row | bits/weight | KL | perplexity |", "|---|---|---|---|---|"]
    verdicts = []
    for claim, (statement, _, labels) in CLAIMS.items():
        for label in labels:
            r = by.get(label)
            if r is None:
                continue
            out.append(f"| {claim} | {label} | {r['bits_per_weight']:.3f} | {r['kl_to_original']:.4f} | "
                       f"{r['perplexity']:.3f} |")
        verdicts.append(verdict(claim, by))
    out.append("")
    for v in verdicts:
        state = {True: "holds", False: "does not hold", None: "not measured"}[v["holds"]]
        out.append(f"- {v['claim']}: {state}: {v['statement']}"
                   + (f" (lowest KL: {v['lowest_kl']})" if "lowest_kl" in v else "")
                   + (f" (by rank: {v['by_rank']})" if "by_rank" in v else "")
                   + (f" (measured Pareto front monotone: {v['pareto_monotone']})" if "pareto_monotone" in v else ""))
    for r in rows:
        if r.get("pareto"):
            out += ["", f"Pareto front of {r['row']} (loss increase measured on the calibration text, nats):", "",
                    "| budget | bits/weight | predicted | measured |", "|---|---|---|---|"]
            out += [f"| {p['budget_bits_per_weight']} | {p['bits_per_weight']:.3f} | {p['predicted_loss']:.5f} | "
                    f"{p['measured_loss_increase']:.4f} |" for p in r["pareto"]]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated claims: {','.join(CLAIMS)}")
    ap.add_argument("--work", type=Path, default=P.REPO / "runs" / "claims", help="compress outputs go here")
    ap.add_argument("-o", "--out", type=Path, default=P.REPO / "bench" / "results" / "claims.jsonl")
    ap.add_argument("--report", nargs="+", type=Path, metavar="JSONL", help="print the table from saved rows")
    args = ap.parse_args()
    if args.report:
        rows = [json.loads(line) for f in args.report for line in f.read_text().splitlines() if line.strip()]
        latest = {r["row"]: r for r in rows}  # a re-run row replaces the earlier one
        print(report(list(latest.values())))
        return
    names = args.only.split(",") if args.only else list(CLAIMS)
    bad = [n for n in names if n not in CLAIMS]
    if bad:
        ap.error(f"unknown claim(s) {bad}; choose among {list(CLAIMS)}")
    model = P.model_dir()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calib_of: dict[tuple, Path] = {}
    for claim in names:
        for label, (recipe, sets) in CLAIMS[claim][2].items():
            key = (recipe, tuple(s for s in sets if s.startswith("calibrate.")))
            safe = label.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "").replace("=", "-")
            row = run_row(safe, recipe, sets, model, args.work, False, None, calib_of.get(key))
            row.update(row=label, claim=claim, **pareto_of(args.work / safe))
            if "error" not in row:
                calib_of.setdefault(key, args.work / safe / "stages" / "calib")
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
