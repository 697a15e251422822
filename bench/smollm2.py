"""Built-in lpc recipes on SmolLM2-135M-Instruct under the issue-12 protocol; prints JSON per row.

    python bench/smollm2.py                                # every built-in recipe (about 2 hours)
    python bench/smollm2.py --only nvfp4,nvfp4_gptq,fp8 -o bench/results/smollm2.json
    python bench/smollm2.py --only nvfp4 --set quantize.weights.spec.scale_search=0
    python bench/smollm2.py --only fp8 --tasks --limit 50  # + the five local multiple-choice tasks
    python bench/smollm2.py --markdown bench/results/smollm2.json bench/results/peers.json
                                                           # the README table, from saved JSON

Each row is two or three child processes, timed and measured (peak RSS from os.wait4's rusage of that child):
  lpc compress MODEL --recipe R --data calib_tail.txt --set calibrate.samples=128
               --set calibrate.seq_len=512 [--set ...] -o WORK/ROW --overwrite --json
  lpc eval ARTIFACT --baseline MODEL --ppl eval_head.txt --seq-len 2048 --json
  lpc eval ARTIFACT --tasks arc_easy_local,... --tasks-data MC --json [--limit N]     (with --tasks)
The original's task results are computed once (`lpc eval MODEL --tasks ...`) and cached in
WORK/original_tasks.json, keyed on the model's weight files, the tasks, their data folder and the
limit; every row is compared with the cache (task_recovery = mean accuracy / the original's). Rows
already measured get their tasks later without recompressing:
    python bench/smollm2.py --tasks-of nvfp4=runs/smollm2/nvfp4 -o bench/results/smollm2.json
(PATH may also be a saved `lpc eval ... --tasks --json` report; --original-report seeds the cache).
`-o FILE` keeps the rows of other labels already in FILE and replaces those of the same label.
Perplexity and KL(original || compressed) are lpc eval's (bench/_protocol.py describes the
protocol; `lpc eval` computes in the checkpoint's dtype, bf16 here, not fp32). The model directory
comes from ../shared/assets/smollm2/get.sh (LPC_MODELS respected). lpc is called only through its CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _protocol as P  # noqa: E402

# row label -> (built-in recipe, extra --set overrides)
ROWS = {
    "nvfp4": ("nvfp4", []),
    "nvfp4_gptq": ("nvfp4", ["quantize.method=gptq"]),
    "fp8": ("fp8", []),
    "mxfp4": ("mxfp4", []),
    "mxfp8": ("mxfp8", []),
    "int4": ("int4", []),
    "bcq": ("bcq", []),
    "nvfp4_w4a4": ("nvfp4_w4a4", []),
    "fgmp_nvfp4a16": ("fgmp_nvfp4a16", []),
    "fgmp_nvfp4a16_rtn": ("fgmp_nvfp4a16", ["quantize.method=rtn"]),
    "fgmp_nvfp4": ("fgmp_nvfp4", []),
    "fgmp_nvfp4_rtn": ("fgmp_nvfp4", ["quantize.method=rtn"]),
    "nvfp4_eora": ("nvfp4_eora", []),
    "vapr": ("vapr", []),
    "kv_fp8": ("kv_fp8", []),
    "kv_nvfp4": ("kv_nvfp4", []),
}
# every built-in recipe as written (the variants above are rows of their own, asked for by name)
DEFAULT = ["nvfp4", "fp8", "mxfp4", "mxfp8", "int4", "bcq", "nvfp4_w4a4", "fgmp_nvfp4a16", "fgmp_nvfp4",
           "nvfp4_eora", "vapr", "kv_fp8", "kv_nvfp4"]
# The accuracy reported per task (lm-eval's usual choice); the full metric dict is kept in "tasks".
TASK_METRIC = {"arc_easy_local": "acc", "arc_challenge_local": "acc_norm", "piqa_local": "acc_norm",
               "winogrande_local": "acc", "openbookqa_local": "acc_norm"}


def _child(cmd: list[str]) -> tuple[dict | None, str, float, float, float]:
    """(parsed JSON stdout or None, stderr tail, wall seconds, peak RSS MB, CPU seconds (user + sys) of
    that child via wait4)."""
    env = {**os.environ, **P.OFFLINE_ENV}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    try:
        data = json.loads(stdout) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        data = None
    cpu = usage.ru_utime + usage.ru_stime
    return data, "\n".join(stderr.strip().splitlines()[-3:]), wall, usage.ru_maxrss / 1024, cpu


def lpc(*args: str) -> list[str]:
    return [sys.executable, "-m", "lpc.cli", *args]


def run_row(label: str, recipe: str, sets: list[str], model: Path, work: Path, tasks: bool,
            limit: int | None, reuse_calib: Path | None = None) -> dict:
    out = work / label
    if reuse_calib is not None and reuse_calib.resolve() != (out / "stages" / "calib").resolve():
        # lpc skips a stage whose manifest matches its inputs and config, and recomputes it otherwise
        shutil.rmtree(out, ignore_errors=True)
        (out / "stages").mkdir(parents=True)
        shutil.copytree(reuse_calib, out / "stages" / "calib")
    cmd = lpc("compress", str(model), "--recipe", recipe, "--data", str(P.CALIB),
              "--set", f"calibrate.samples={P.CALIB_SAMPLES}", "--set", f"calibrate.seq_len={P.CALIB_SEQ_LEN}",
              "-o", str(out), "--overwrite", "--json")
    for s in sets:
        cmd += ["--set", s]
    comp, err, wall, rss, cpu = _child(cmd)
    row: dict = {"row": label, "recipe": recipe, "set": sets, "model": str(model)}
    if reuse_calib is not None:
        row["calib_copied_from"] = str(reuse_calib)
    if comp is None:
        return {**row, "error": f"lpc compress failed: {err}"}
    row.update(bits_per_weight=comp.get("bits_per_weight"),
               compress_seconds=round(wall, 1), compress_cpu_seconds=round(cpu, 1),
               compress_seconds_lpc=comp.get("compress_seconds"),
               stage_seconds={s.get("stage", str(i)): s.get("seconds") for i, s in enumerate(comp.get("stages", []))},
               stages_skipped=[s.get("stage") for s in comp.get("stages", []) if s.get("skipped")],
               compress_peak_rss_mb=round(rss, 1), compress_peak_rss_mb_lpc=comp.get("peak_rss_mb"))
    artifact = comp.get("artifact", str(out / "model"))
    ecmd = lpc("eval", artifact, "--baseline", str(model),
               "--ppl", str(P.EVAL), "--seq-len", str(P.EVAL_SEQ_LEN), "--json")
    ev, err, ewall, erss, _ = _child(ecmd)
    if ev is None:
        return {**row, "error": f"lpc eval failed: {err}"}
    key = str(P.EVAL)
    det = (ev.get("details") or {}).get(key, {})
    row.update(artifact=str(artifact), perplexity=ev["perplexity"][key], predictions=det.get("tokens"),
               original_perplexity=ev["baseline"]["perplexity"][key],
               kl_to_original=(ev.get("kl_to_baseline") or {}).get(key),
               eval_seconds=round(ewall, 1), eval_peak_rss_mb=round(erss, 1))
    if tasks:
        add_tasks(row, Path(artifact), model, work, limit)
    return row


def _tasks_cmd(path: Path, limit: int | None) -> list[str]:
    cmd = lpc("eval", str(path), "--tasks", ",".join(P.TASKS), "--tasks-data", str(P.MC), "--json")
    return cmd + (["--limit", str(limit)] if limit else [])


def original_tasks(model: Path, work: Path, limit: int | None) -> dict:
    """The original's task report, computed once and cached in WORK/original_tasks.json, keyed on the
    model directory (path, weight file sizes and mtimes), the task list, the data folder and the limit;
    every row is compared with it instead of evaluating the original again."""
    key = _original_key(model, limit)
    cache = work / "original_tasks.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved
    ev, err, wall, rss, _ = _child(_tasks_cmd(model, limit))
    if ev is None:
        raise SystemExit(f"lpc eval of the original's tasks failed: {err}")
    saved = {"key": key, "tasks": ev["tasks"], "seconds": round(wall, 1), "peak_rss_mb": round(rss, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def _original_key(model: Path, limit: int | None) -> dict:
    model = model.resolve()
    weights = sorted(model.glob("*.safetensors"))
    return {"model": str(model), "weights": [[w.name, w.stat().st_size, int(w.stat().st_mtime)] for w in weights],
            "tasks": P.TASKS, "tasks_data": str(P.MC), "limit": limit}


def add_tasks(row: dict, artifact: Path, model: Path, work: Path, limit: int | None,
              report: dict | None = None) -> dict:
    """Task accuracies of `artifact` (or of a saved `lpc eval --tasks --json` report) into `row`, with
    the cached original's and the recovery (mean accuracy / the original's mean accuracy)."""
    if report is None:
        report, err, wall, rss, _ = _child(_tasks_cmd(artifact, limit))
        if report is None:
            row["tasks_error"] = f"lpc eval --tasks failed: {err}"
            return row
        row.update(task_seconds=round(wall, 1), task_peak_rss_mb=round(rss, 1))
    orig = original_tasks(model, work, limit)
    samples = {t: v.get("samples") for t, v in report["tasks"].items()}
    orig_samples = {t: v.get("samples") for t, v in orig["tasks"].items()}
    if samples != orig_samples:
        raise SystemExit(f"{artifact}: task sample counts {samples} differ from the original's {orig_samples}")
    row.update(tasks=report["tasks"], original_tasks=orig["tasks"], task_limit=limit,
               accuracy=_accuracies(report["tasks"]), original_accuracy=_accuracies(orig["tasks"]))
    mean, base = row["accuracy"].get("mean"), row["original_accuracy"].get("mean")
    row["task_recovery"] = mean / base if mean is not None and base else None
    return row


def seed_original(model: Path, work: Path, limit: int | None, report_path: Path) -> None:
    """Write the original's task cache from a saved `lpc eval MODEL --tasks ... --json` report."""
    report = json.loads(report_path.read_text())
    if sorted(report.get("tasks") or {}) != sorted(P.TASKS) or Path(report.get("model", "")).resolve() != model.resolve():
        raise SystemExit(f"{report_path}: not a report of {model} on the tasks {P.TASKS}")
    (work / "original_tasks.json").unlink(missing_ok=True)
    key = _original_key(model, limit)
    work.mkdir(parents=True, exist_ok=True)
    (work / "original_tasks.json").write_text(json.dumps(
        {"key": key, "tasks": report["tasks"], "seconds": report.get("seconds"), "from": str(report_path)},
        indent=1) + "\n")


def _label(row: dict) -> str:
    return row["row"] if "row" in row else f"{row.get('peer')}_{row.get('config')}"


def _accuracies(tasks: dict) -> dict:
    acc = {t: tasks[t].get(m, tasks[t].get("acc")) for t, m in TASK_METRIC.items() if t in tasks}
    if acc and all(v is not None for v in acc.values()):
        acc["mean"] = sum(acc.values()) / len(acc)
    return acc


def markdown(rows: list[dict]) -> str:
    """The README table: lpc rows (smollm2.py) and peer rows (peers.py) in one table."""
    orig = next((r.get("original_perplexity") for r in rows if r.get("original_perplexity")), None)
    with_tasks = any(r.get("accuracy") for r in rows)
    head = ["method", "bits/weight", "perplexity", "KL", "compress s", "peak RSS MB"]
    if with_tasks:
        head += ["task mean acc (recovery)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if orig is not None:
        cells = ["bf16 original", "16", f"{orig:.3f}", "0", "", ""]
        if with_tasks:
            acc = next((r["original_accuracy"].get("mean") for r in rows if r.get("original_accuracy")), None)
            cells.append(f"{acc:.4f}" if acc is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if "error" in r:
            continue
        if "peer" in r:
            name = f"{r['peer']} {r['config']} ({r.get('modifier')} {r.get('scheme')})"
            bits = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") is not None else ""
            secs, rss = r.get("compress_seconds"), r.get("compress_peak_rss_mb")
        else:
            name = f"lpc `{r['recipe']}`" + (" " + " ".join(f"`{s}`" for s in r["set"]) if r.get("set") else "")
            bits = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") is not None else ""
            secs, rss = r.get("compress_seconds"), r.get("compress_peak_rss_mb")
        kl = r.get("kl_to_original")
        cells = [name, bits, f"{r['perplexity']:.3f}", f"{kl:.4f}" if kl is not None else "",
                 (f"{secs:.0f}" if secs is not None else "")
                 + (" (calibration reused)" if "calibrate" in r.get("stages_skipped", []) else ""),
                 f"{rss:.0f}" if rss is not None else ""]
        if with_tasks:
            mean, rec = (r.get("accuracy") or {}).get("mean"), r.get("task_recovery")
            cells.append((f"{mean:.4f}" if mean is not None else "") + (f" ({rec:.1%})" if rec is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _name(r: dict) -> str:
    if "peer" in r:
        return f"{r['peer']} {r['config']} ({r.get('modifier')} {r.get('scheme')})"
    return f"lpc `{r['recipe']}`" + (" " + " ".join(f"`{s}`" for s in r["set"]) if r.get("set") else "")


def markdown_tasks(rows: list[dict]) -> str:
    """The README's task table: accuracy per task (TASK_METRIC), mean and recovery, rows with tasks only."""
    rows = [r for r in rows if (r.get("accuracy") or {}).get("mean") is not None and "error" not in r]
    if not rows:
        return ""
    tasks = list(TASK_METRIC)
    head = ["method"] + [f"{t.removesuffix('_local')} ({TASK_METRIC[t]})" for t in tasks] + ["mean", "recovery"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    orig = rows[0]["original_accuracy"]
    n = {t: rows[0]["original_tasks"][t].get("samples") for t in tasks}
    lines.append("| " + " | ".join(["bf16 original"] + [f"{orig[t]:.4f}" for t in tasks]
                                   + [f"{orig['mean']:.4f}", "100%"]) + " |")
    for r in rows:
        if r["original_accuracy"] != orig:
            raise SystemExit(f"{_label(r)}: compared with another original's accuracies than the first row's")
        acc = r["accuracy"]
        lines.append("| " + " | ".join([_name(r)] + [f"{acc[t]:.4f}" for t in tasks]
                                       + [f"{acc['mean']:.4f}", f"{r['task_recovery']:.1%}"]) + " |")
    limit = rows[0].get("task_limit")
    lines.append("")
    lines.append("Documents per task: " + ", ".join(f"{t.removesuffix('_local')} {n[t]}" for t in tasks)
                 + (f" (first {limit})" if limit else " (full sets)") + "; zero-shot, lm-eval via `lpc eval --tasks`.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated rows or built-in recipe names "
                                   f"(rows: {','.join(ROWS)}; default: {','.join(DEFAULT)})")
    ap.add_argument("--set", action="append", default=[], help="recipe override passed to every row")
    ap.add_argument("--tasks", action="store_true", help="also run the five local multiple-choice tasks")
    ap.add_argument("--limit", type=int, help="documents per task (with --tasks)")
    ap.add_argument("--work", type=Path, default=P.REPO / "runs" / "smollm2", help="compress outputs go here")
    ap.add_argument("--reuse-calib", type=Path, metavar="CALIB_DIR",
                    help="copy this calib/ (e.g. runs/smollm2/nvfp4/stages/calib) into each row first; lpc skips "
                         "calibration when it matches (its seconds are then not in compress_seconds)")
    ap.add_argument("-o", "--out", type=Path, help="also write the JSON list here")
    ap.add_argument("--tasks-of", action="append", default=[], metavar="ROW=PATH",
                    help="add task accuracies to the existing row ROW of --out (lpc or peer row, e.g. "
                         "llmcompressor_nvfp4a16_rtn): PATH is the row's model directory (evaluated now) or a "
                         "saved `lpc eval --tasks ... --json` report")
    ap.add_argument("--original-report", type=Path, metavar="JSON",
                    help="a saved `lpc eval MODEL --tasks ... --json` report of the original: seeds the cache "
                         "WORK/original_tasks.json instead of evaluating the original")
    ap.add_argument("--markdown", nargs="*", type=Path, metavar="JSON",
                    help="print the README table; with files, from those saved JSON lists (no run)")
    args = ap.parse_args()
    if args.markdown:
        rows = [r for f in args.markdown for r in json.loads(f.read_text())]
        print(markdown(rows))
        if any((r.get("accuracy") or {}).get("mean") is not None for r in rows):
            print("\n" + markdown_tasks(rows))
        return
    model = P.model_dir()
    if args.original_report:
        seed_original(model, args.work, args.limit, args.original_report)
    if args.tasks_of:
        if not args.out or not args.out.is_file():
            raise SystemExit("--tasks-of needs -o/--out FILE, the saved JSON list holding the rows")
        rows = json.loads(args.out.read_text())
        for spec in args.tasks_of:
            label, _, path = spec.partition("=")
            row = next((r for r in rows if _label(r) == label), None)
            if row is None or not path:
                raise SystemExit(f"--tasks-of {spec}: give ROW=PATH with ROW among {[_label(r) for r in rows]}")
            path = Path(path)
            report = json.loads(path.read_text()) if path.is_file() else None
            add_tasks(row, path, model, args.work, args.limit, report)
            print(json.dumps({k: row.get(k) for k in ("accuracy", "task_recovery")}), flush=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
        return
    names = args.only.split(",") if args.only else DEFAULT
    rows = []
    for name in names:
        recipe, sets = ROWS.get(name, (name, []))
        label = name if not args.set else name + "+" + "+".join(args.set)
        row = run_row(label.replace("/", "_"), recipe, sets + args.set, model, args.work, args.tasks, args.limit,
                      args.reuse_calib)
        rows.append(row)
        if args.markdown is None:
            print(json.dumps(row), flush=True)
    if args.out:  # rows of other labels already in the file are kept; a row of the same label is replaced
        args.out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.out.read_text()) if args.out.is_file() else []
        new = {_label(r) for r in rows}
        args.out.write_text(json.dumps([r for r in old if _label(r) not in new] + rows, indent=1) + "\n")
    if args.markdown is not None:
        print(markdown(rows))


if __name__ == "__main__":
    main()
