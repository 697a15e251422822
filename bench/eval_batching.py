"""lm-eval's batch size in `lpc eval --tasks` (run_tasks' batch_size, 8 by default) on SmolLM2: CPU
seconds and accuracy of the same documents at each batch size; prints JSON.

    python bench/eval_batching.py --limit 60 --batch-sizes 1,8   # one thread

Batched requests are right-padded; in the checkpoint's bf16 the padded shapes round differently, so a
near-tie between two choices may flip (tests/evaluation/test_eval_streaming.py checks batched ==
unbatched log-likelihoods in fp32). Every lpc row is evaluated at the same batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _protocol as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="arc_easy_local")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--batch-sizes", default="1,8")
    args = ap.parse_args()
    os.environ.setdefault("LPC_TASKS_DATA", str(P.MC))
    from lpc.pipeline.artifact.load import load
    from lpc.pipeline.evaluation.tasks import run_tasks

    model, tok = load(str(P.model_dir()))
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        c0, w0 = time.process_time(), time.perf_counter()
        res = run_tasks(model, tok, [args.task], limit=args.limit, batch_size=bs)[args.task]
        rows.append({"task": args.task, "limit": args.limit, "batch_size": bs,
                     "cpu_seconds": round(time.process_time() - c0, 1), "wall_seconds": round(time.perf_counter() - w0, 1),
                     "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
                     **{k: res[k] for k in ("acc", "acc_norm", "samples") if k in res}})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
