"""llm-compressor on SmolLM2-135M under the lpc protocol; prints JSON (one object per config).

    make peers                                     # creates .venv-peers, runs every config
    .venv-peers/bin/python bench/peers.py --only nvfp4a16_rtn,fp8 [--dtype float32] [-o out.json]
    .venv-peers/bin/python bench/peers.py --eval-dir DIR [DIR ...]   # the same evaluation of any
                                                   # model directory (original, lpc dense/ct export)

Runs in its own venv (.venv-peers: torch==2.13.0 first, then llmcompressor==0.14.0.1), never a
dependency of lpc. Each config is two child processes of this script, so that wall time and peak RSS
(os.wait4's rusage of that child) are the peer's own:
  1. `oneshot` on the bf16 model with the same 128 calibration windows of 512 tokens lpc uses
     (bench/_protocol.py, calib_windows: calib_tail.txt tokenized once, consecutive windows, first
     128, no shuffling), ignore=["lm_head"], saved with save_compressed=True;
  2. the saved checkpoint loaded back with transformers' compressed-tensors integration (weights
     decompressed; W4A4 keeps compressed-tensors' activation fake-quantization in forward), scored
     on eval_head.txt in 2048-token windows: perplexity and mean KL(original || peer) per prediction,
     the same arithmetic as `lpc eval --seq-len 2048 --baseline MODEL` (bench/_protocol.py, score).
`--dtype auto` (default) computes in the checkpoints' bf16, as `lpc eval` does today, so the figures
sit beside lpc's; `--dtype float32` is the protocol's fp32 compute (original: 20.85).
Task accuracies of a peer's weight-only checkpoint (lm-eval is not in .venv-peers) come from lpc's
evaluator in the main venv, which decompresses compressed-tensors checkpoints, against the cached
original's (bench/smollm2.py, original_tasks):
    python bench/smollm2.py --tasks-of llmcompressor_nvfp4a16_rtn=runs/peers/nvfp4a16_rtn -o bench/results/peers.json
(weight-only configs only: for W4A4 it is not checked that the activation fake-quantization is kept).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _protocol as P  # noqa: E402

CONFIGS = {
    "nvfp4a16_rtn": ("QuantizationModifier", "NVFP4A16"),
    "nvfp4a16_gptq": ("GPTQModifier", "NVFP4A16"),
    "nvfp4_w4a4_rtn": ("QuantizationModifier", "NVFP4"),
    # FP8 E4M3 weights, one scale per output channel (FP8_DYNAMIC's weight args), activations left
    # in bf16: the same thing lpc's `fp8` recipe stores, so the two compare on equal terms.
    "fp8": ("QuantizationModifier", "FP8_WEIGHT_CHANNEL"),
}


def _modifier(kind: str, scheme: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    cls = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier}[kind]
    if scheme == "FP8_WEIGHT_CHANNEL":
        groups = {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}
        return cls(config_groups=groups, ignore=["lm_head"])
    return cls(targets="Linear", scheme=scheme, ignore=["lm_head"])


def compress(name: str, out: Path) -> dict:
    """Child 1: oneshot + save_compressed. Returns what the run did."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    src = str(P.model_dir())
    tok = AutoTokenizer.from_pretrained(src)
    wins = P.calib_windows(tok)
    ds = Dataset.from_dict({"input_ids": wins, "attention_mask": [[1] * len(w) for w in wins]})
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    kind, scheme = CONFIGS[name]
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=_modifier(kind, scheme),
            num_calibration_samples=len(wins), max_seq_length=P.CALIB_SEQ_LEN,
            shuffle_calibration_samples=False)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    fmt = json.loads((out / "config.json").read_text()).get("quantization_config", {}).get("format")
    return {"modifier": kind, "scheme": scheme, "calib_windows": len(wins),
            "calib_tokens": sum(map(len, wins)), "format": fmt, "checkpoint": str(out),
            "checkpoint_mb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 2)}


def evaluate(path: Path, dtype: str) -> dict:
    """Child 2: load `path` (plain or compressed-tensors) and the original; perplexity and KL."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    src = P.model_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    seqs = P.eval_windows(tok)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    act_quant = sum(1 for m in model.modules()
                    if getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None)
    out: dict = {"dtype": str(next(model.parameters()).dtype), "activation_quantized_linears": act_quant}
    if Path(path).resolve() == Path(src).resolve():
        out.update(P.score(model, seqs))
        out["kl_to_original"] = 0.0
    else:
        base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch_dtype)
        out.update(P.score(model, seqs, baseline=base))
    return out


def checkpoint_bits(path: Path) -> float:
    """Stored bits per weight of the quantized Linears of a compressed-tensors checkpoint: every
    `<m>.weight*` tensor (packed codes, block scales, global scales) of a module with `weight_scale`,
    over that module's weight count (packed nvfp4: 2 codes per byte). Activation scales not counted."""
    from safetensors import safe_open

    shapes, nbytes = {}, {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                size = {"U8": 1, "I8": 1, "F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}[dtype]
                shapes[k] = (shape, dtype)
                nbytes[k] = size * math.prod(shape)
    mods = [k[: -len(".weight_scale")] for k in shapes if k.endswith(".weight_scale")]
    bits = weights = 0
    for m in mods:
        if f"{m}.weight_packed" in shapes:
            out, half = shapes[f"{m}.weight_packed"][0]
            n = out * half * 2
        else:
            n = math.prod(shapes[f"{m}.weight"][0])
        weights += n
        bits += 8 * sum(v for k, v in nbytes.items() if k.startswith(m + ".weight") and k != f"{m}.weight_shape")
    return bits / weights if weights else float("nan")


def _child(args: list[str]) -> tuple[dict, float, float]:
    """Run this script as a child; (its JSON, wall seconds, its peak RSS in MB)."""
    env = {**os.environ, **P.OFFLINE_ENV}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}, wall, usage.ru_maxrss / 1024
    return json.loads(stdout.strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024


def run_config(name: str, work: Path, dtype: str) -> dict:
    ckpt = work / name
    info, wall, rss = _child(["--worker-compress", name, str(ckpt)])
    if "error" not in info:
        info["bits_per_weight"] = checkpoint_bits(ckpt)
    row = {"peer": "llmcompressor", "config": name, **info,
           "compress_seconds": round(wall, 1), "compress_peak_rss_mb": round(rss, 1)}
    if "error" in info:
        return row
    ev, ewall, erss = _child(["--worker-eval", str(ckpt), dtype])
    row.update({"eval": ev, "eval_seconds": round(ewall, 1), "eval_peak_rss_mb": round(erss, 1)})
    if "perplexity" in ev:
        row.update(perplexity=ev["perplexity"], kl_to_original=ev["kl_to_original"],
                   predictions=ev["predictions"])
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-compress":
        print(json.dumps(compress(sys.argv[2], Path(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-eval":
        print(json.dumps(evaluate(Path(sys.argv[2]), sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated configs: " + ",".join(CONFIGS))
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype of the evaluation (auto = the checkpoint's, as lpc eval)")
    ap.add_argument("--work", type=Path, default=P.REPO / "runs" / "peers", help="checkpoints go here")
    ap.add_argument("--eval-dir", nargs="+", type=Path, help="only evaluate these model directories")
    ap.add_argument("--bits", nargs="+", type=Path, help="only print the stored bits/weight of these checkpoints")
    ap.add_argument("-o", "--out", type=Path, help="also write the JSON list here")
    args = ap.parse_args()
    rows = []
    if args.bits:
        print(json.dumps({str(d): checkpoint_bits(d) for d in args.bits}))
        return
    if args.eval_dir:
        for d in args.eval_dir:
            ev, wall, rss = _child(["--worker-eval", str(d), args.dtype])
            rows.append({"model": str(d), **ev, "eval_seconds": round(wall, 1), "eval_peak_rss_mb": round(rss, 1)})
            print(json.dumps(rows[-1]), flush=True)
    else:
        names = args.only.split(",") if args.only else list(CONFIGS)
        bad = [n for n in names if n not in CONFIGS]
        if bad:
            ap.error(f"unknown config(s) {bad}; choose among {list(CONFIGS)}")
        import importlib.metadata as md

        versions = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
        for n in names:
            rows.append({**run_config(n, args.work, args.dtype), "versions": versions})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
