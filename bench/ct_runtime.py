"""W4A4 compressed-tensors export on CPU: forward time with compressed-tensors' own FP4 activation
rounding against lpc's registered CPU backend (pipeline/export/ct_runtime.py), and whether the logits
are identical. Prints JSON.

    python bench/ct_runtime.py runs/smollm2/nvfp4_w4a4 [--batch 8 --tokens 160 --repeat 3 --threads 1]

The artifact is any NVFP4 W4A4 compressed-tensors export (`lpc compress MODEL --recipe nvfp4_w4a4`
writes one for SmolLM2; `bench/smollm2.py --only nvfp4_w4a4` too).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lpc
    from compressed_tensors.utils.impl_backend import ImplBackend

    from lpc.pipeline.export.ct_runtime import fp4_cast_cpu

    model, _ = lpc.load(args.artifact)
    backends = ImplBackend._backends["cast_to_fp4"]
    ours = next(entry for entry in backends if entry[0] is fp4_cast_cpu)
    x = torch.randint(100, model.config.vocab_size - 100, (args.batch, args.tokens),
                      generator=torch.Generator().manual_seed(0))

    def timed() -> tuple[torch.Tensor, float]:
        times, out = [], None
        for _ in range(args.repeat + 1):  # the first run warms up (and compiles)
            t = time.perf_counter()
            with torch.no_grad():
                out = model(x).logits
            times.append(time.perf_counter() - t)
        return out, statistics.median(times[1:])

    fast, fast_s = timed()
    backends.remove(ours)
    try:
        ref, ref_s = timed()
    finally:
        backends.append(ours)
    print(json.dumps({"artifact": args.artifact, "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
                      "forward_s_compressed_tensors_cast": round(ref_s, 3), "forward_s_lpc_cast": round(fast_s, 3),
                      "speedup": round(ref_s / fast_s, 2), "logits_identical": bool(torch.equal(fast, ref))}))


if __name__ == "__main__":
    main()
