"""Wall time, CPU seconds and peak RSS of each lpc stage on random-init Llama checkpoints of real widths,
next to llm-compressor NVFP4A16 oneshot + save on the same checkpoint; prints JSON (one row per run).

    .venv/bin/python bench/scale.py --shapes tinyllama-1.1b \
        --recipes nvfp4,nvfp4+quantize.weights.spec.scale_search=0,fp8 [--peers] [--per-stage] [-o OUT.json]

A recipe item `name+key=value+...` adds --set overrides to that item only (--set applies to all).
By default `lpc compress` runs as one process (the whole job, as a user runs it: `compress` row);
--per-stage runs calibrate, quantize and export as separate processes instead (each stage's own
peak RSS and CPU seconds, plus one interpreter start-up per stage).
Shapes: tinyllama-1.1b (hidden 2048, intermediate 5632, 22 layers) and tinyllama-4 (its first 4 layers
only), llama2-7b-4 and llama2-7b-32
(hidden 4096, intermediate 11008, 4 / 32 layers), mid-4 and mid-32 (hidden 1024, intermediate 2816,
16 heads, 4 KV heads; 4 / 32 layers: the depth scaling of every recipe); vocabulary and tokenizer are SmolLM2's (49,152).
Each checkpoint is written in bf16 one decoder layer per shard (HF index), never holding the model.
With --per-stage, each lpc stage (calibrate, quantize, export) runs as its own child process, so
its peak RSS (os.wait4's rusage) and CPU seconds are its own; `compress` is then the sum of the
stages' CPU seconds and the largest of their peaks. Threads: OMP_NUM_THREADS of the environment
(default 2), the same for lpc and llm-compressor. Calibration: 32 windows of 128 tokens of WikiText-2.
Checkpoints and outputs go under runs/scale/ (gitignored); --keep keeps them (13.5 GB at 7B x 32).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path(os.environ.get("LPC_SCALE_TOKENIZER", "/root/.cache/lpc-models/smollm2-135m"))
DATA = Path(os.environ.get("LPC_ASSETS", ROOT.parent / "shared" / "assets")) / "data" / "wikitext2" / "wiki.test.raw"
SHAPES = {
    "smoke": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2),
    "tinyllama-1.1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    "tinyllama-4": dict(hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=4),
    "llama2-7b-4": dict(hidden=4096, intermediate=11008, layers=4, heads=32, kv_heads=32),
    "llama2-7b-32": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    # a narrower width at 4 and 32 layers: every built-in recipe's depth scaling in minutes, not hours
    "mid-4": dict(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4),
    "mid-32": dict(hidden=1024, intermediate=2816, layers=32, heads=16, kv_heads=4),
}
VOCAB = 49152
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def build_checkpoint(path: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> float:
    """A random-init bf16 Llama at `path` written layer by layer (one shard each); returns GB written."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [("embed", {"model.embed_tokens.weight": lambda: rnd(VOCAB, hidden)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append((f"layer{i}", {
            p + "self_attn.q_proj.weight": lambda: rnd(hidden, hidden),
            p + "self_attn.k_proj.weight": lambda: rnd(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": lambda: rnd(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": lambda: rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": lambda: rnd(intermediate, hidden),
            p + "mlp.up_proj.weight": lambda: rnd(intermediate, hidden),
            p + "mlp.down_proj.weight": lambda: rnd(hidden, intermediate),
            p + "input_layernorm.weight": lambda: torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": lambda: torch.ones(hidden, dtype=torch.bfloat16)}))
    shards.append(("head", {"model.norm.weight": lambda: torch.ones(hidden, dtype=torch.bfloat16),
                            "lm_head.weight": lambda: rnd(VOCAB, hidden)}))
    weight_map, total = {}, 0
    for k, (_, makers) in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: make() for key, make in makers.items()}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, path / f)
    return total / 1e9


def _wait4(cmd: list[str], errpath: Path) -> dict:
    """Run `cmd` (stderr to `errpath`); its wall seconds, CPU seconds (user + system) and peak RSS (GB),
    from os.wait4's rusage of that child alone."""
    t0 = time.perf_counter()
    errpath.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as devnull, open(errpath, "w") as errf:
        proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE}, stdout=devnull, stderr=errf)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    row = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}
    if code:
        tail = errpath.read_text().strip().splitlines()[-1:]
        row["error"] = f"exit {code}: {tail[0] if tail else ''}"
    return row


def lpc_stages(model: Path, recipe: str, work: Path, sets: list[str]) -> dict:
    """calibrate -> quantize -> export (the recipe's format), each its own process."""
    lpc = [sys.executable, "-m", "lpc.cli"]
    s = sum((["--set", x] for x in ["calibrate.samples=32", "calibrate.seq_len=128", *sets]), [])
    steps = {
        "calibrate": lpc + ["calibrate", str(model), "--data", str(DATA), "--recipe", recipe, *s, "-o", str(work / "calib")],
        "quantize": lpc + ["quantize", str(model), "--recipe", recipe, *s, "--calib", str(work / "calib"),
                           "-o", str(work / "quant")],
        "export": lpc + ["export", str(work / "quant"), "--format", "auto", "-o", str(work / "out")],
    }
    rows = {}
    for name, cmd in steps.items():
        rows[name] = _wait4(cmd + ["--overwrite"], work.parent / "last-stderr.txt")
        if "error" in rows[name]:
            break
    ok = [r for r in rows.values() if "error" not in r]
    rows["compress"] = {"wall_s": round(sum(r["wall_s"] for r in ok), 1), "cpu_s": round(sum(r["cpu_s"] for r in ok), 1),
                        "peak_rss_gb": max((r["peak_rss_gb"] for r in ok), default=None),
                        "complete": len(ok) == len(steps)}
    return rows


def lpc_compress(model: Path, recipe: str, work: Path, sets: list[str]) -> dict:
    """`lpc compress` as one process (the whole job); the stages' wall seconds from its summary."""
    s = sum((["--set", x] for x in ["calibrate.samples=32", "calibrate.seq_len=128", *sets]), [])
    row = {"compress": _wait4([sys.executable, "-m", "lpc.cli", "compress", str(model), "--recipe", recipe,
                               "--data", str(DATA), *s, "-o", str(work / "out"), "--overwrite"],
                               work.parent / "last-stderr.txt")}
    summary = work / "out" / "summary.json"
    if summary.is_file():
        stages = json.loads(summary.read_text()).get("stages", [])
        row["stage_wall_s"] = {st.get("stage"): st.get("seconds") for st in stages}
    row["compress"]["complete"] = "error" not in row["compress"]
    return row


def peer(model: Path, work: Path) -> dict:
    """llm-compressor NVFP4A16 oneshot (same 32 x 128 windows) + save_pretrained(save_compressed=True)."""
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.is_file():
        return {"skipped": f"{python} is absent (make peers creates it)"}
    return _wait4([str(python), str(Path(__file__).resolve()), "--worker-peer", str(model), str(work / "peer")],
                  work / "last-stderr.txt")


def worker_peer(model: str, out: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(DATA.read_text()[:400_000])["input_ids"]
    wins = [ids[i * 128:(i + 1) * 128] for i in range(32)]
    ds = Dataset.from_dict({"input_ids": wins, "attention_mask": [[1] * 128 for _ in wins]})
    m = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    oneshot(model=m, tokenizer=tok, dataset=ds, recipe=QuantizationModifier(targets="Linear", scheme="NVFP4A16",
                                                                           ignore=["lm_head"]),
            num_calibration_samples=32, max_seq_length=128, shuffle_calibration_samples=False)
    m.save_pretrained(out, save_compressed=True)


def depth_table(shallow: str, deep: str) -> str:
    """Markdown: per recipe, CPU seconds and peak RSS of the shallow and the deep model and the peak ratio."""
    rows = [{(r["recipe"], tuple(r["sets"])): r for r in json.loads(Path(f).read_text()) if r["tool"] == "lpc"}
            for f in (shallow, deep)]
    a, b = (next(iter(r.values())) for r in rows)
    out = [f"| recipe | {a['layers']} layers: CPU-s | peak RSS | {b['layers']} layers: CPU-s | peak RSS | "
           f"{b['layers']} vs {a['layers']} |", "|---|---|---|---|---|---|"]
    for key, r4 in rows[0].items():
        r32 = rows[1].get(key)
        if r32 is None:
            continue
        c4, c32 = r4["compress"], r32["compress"]
        name = "+".join([key[0], *key[1]])
        ratio = c32["peak_rss_gb"] / c4["peak_rss_gb"]
        out.append(f"| `{name}` | {c4['cpu_s']} | {c4['peak_rss_gb']:.2f} GB | {c32['cpu_s']} | "
                   f"{c32['peak_rss_gb']:.2f} GB | {'**' if ratio <= 1.3 else ''}{ratio:.2f}x{'**' if ratio <= 1.3 else ''} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tinyllama-1.1b")
    ap.add_argument("--recipes", default="nvfp4,fp8")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--per-stage", action="store_true")
    ap.add_argument("-o", "--out")
    ap.add_argument("--merge", action="store_true",
                    help="with -o: replace the rows of the same shape, tool, recipe and sets in OUT, keep the rest")
    ap.add_argument("--worker-peer", nargs=2)
    ap.add_argument("--depth-table", nargs=2, metavar=("SHALLOW.json", "DEEP.json"),
                    help="print the markdown table of peak RSS, deep against shallow, per recipe, and exit")
    a = ap.parse_args()
    if a.worker_peer:
        worker_peer(*a.worker_peer)
        return
    if a.depth_table:
        print(depth_table(*a.depth_table))
        return
    rows = []
    for shape in a.shapes.split(","):
        work = ROOT / "runs" / "scale" / shape
        model = work / "model"
        t0 = time.perf_counter()
        if not (model / "config.json").is_file():
            gb = build_checkpoint(model, **SHAPES[shape])
        else:
            gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        base = {"shape": shape, **SHAPES[shape], "checkpoint_gb": round(gb, 2), "build_s": round(time.perf_counter() - t0, 1)}
        for item in a.recipes.split(","):
            recipe, *own = item.split("+")
            sets = [*a.sets, *own]
            run = lpc_stages if a.per_stage else lpc_compress
            row = {**base, "tool": "lpc", "recipe": recipe, "sets": sets, "threads": OFFLINE["OMP_NUM_THREADS"],
                   **run(model, recipe, work / "lpc-run", sets)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / "lpc-run", ignore_errors=True)
        if a.peers:
            row = {**base, "tool": "llmcompressor", "recipe": "NVFP4A16 oneshot+save",
                   "threads": OFFLINE["OMP_NUM_THREADS"], **peer(model, work)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / "peer", ignore_errors=True)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.out:
        if a.merge and Path(a.out).is_file():
            def key(r):
                return r["shape"], r["tool"], r["recipe"], tuple(r.get("sets", []))
            new = {key(r) for r in rows}
            old = [r for r in json.loads(Path(a.out).read_text()) if key(r) not in new]
            rows = old + rows
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
