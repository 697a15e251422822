"""Speed and quality of every number format; prints JSON.

    .venv/bin/python bench/formats.py                 # speed + quality (a few minutes on 2 cores)
    .venv/bin/python bench/formats.py --skip-speed    # quality only
    .venv/bin/python bench/formats.py --fake          # fake quantization of activations only

Speed: (quantize + pack time) / (clone time) of the same bf16 4096 x 11008 tensor, both the best
of several runs in the same process, after one warm-up call (which compiles the fused kernel).
LPC_COMPILE=0 measures the eager path instead.
bcq encodes with an already-fitted codebook and fgmp with a given 10 % mask, as the pipeline does.
Quality: SQNR (dB) and stored bits per weight of every format on (a) all Linear weights of
stories260K (skipped when the asset is absent) and (b) a seeded Student-t (4 dof) 1024 x 1024
tensor. `goals` checks the targets of the formats issue.
Fake (--fake): NVFP4 quantize-then-dequantize of bf16 activations of SmolLM2-like shapes (what simulated
W4A4 and the NVFP4 KV cache run at every forward), the fused pass against pack + unpack, with a bf16
Linear of the same input for scale.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lpc.formats import fast, get_format
from lpc.formats.codebooks import fit_codebooks

STORIES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "stories260K" / "model.safetensors"

SPEED_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "nvfp4": ("nvfp4", {}), "mxfp4": ("mxfp4", {}), "mxfp8": ("mxfp8", {}),
    "fp8_e4m3": ("fp8_e4m3", {}), "fp8_e5m2": ("fp8_e5m2", {}),
    "int4": ("int", {}), "int4_e4m3": ("int", {"scale_format": "e4m3"}), "int8": ("int", {"bits": 8}),
    "bcq": ("bcq", {}), "fgmp": ("fgmp", {}),
}
QUALITY_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "nvfp4": ("nvfp4", {}), "nvfp4_mse": ("nvfp4", {"clip": "mse"}),
    "nvfp4_search": ("nvfp4", {"scale_search": 2}), "nvfp4_rotate": ("nvfp4", {"rotate": True}),
    "mxfp4": ("mxfp4", {}), "mxfp4_mse": ("mxfp4", {"clip": "mse"}), "mxfp8": ("mxfp8", {}),
    "fp8_e4m3": ("fp8_e4m3", {}), "fp8_e5m2": ("fp8_e5m2", {}),
    "int4": ("int", {}), "int4_octav": ("int", {"clip": "octav"}), "int4_mse": ("int", {"clip": "mse"}),
    "int4_e4m3": ("int", {"scale_format": "e4m3"}), "int4_e4m3_octav": ("int", {"scale_format": "e4m3", "clip": "octav"}),
    "int8": ("int", {"bits": 8}),
    "bcq": ("bcq", {}), "bcq_nc8": ("bcq", {"codebooks": 8}),
    "fgmp_p10": ("fgmp", {"high_fraction": 0.1}), "fgmp_p25": ("fgmp", {"high_fraction": 0.25}),
}


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of `repeats` calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed(rows: int, cols: int, repeats: int) -> dict[str, Any]:
    """Per format: seconds and ratio to a clone of the same bf16 tensor."""
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    context = {"bcq": {"codebook": fit_codebooks([x[:256].float()]).codebook},
               "fgmp": {"mask": torch.rand(rows, cols // 16, generator=torch.Generator().manual_seed(1)) < 0.1}}
    out: dict[str, Any] = {"shape": [rows, cols], "dtype": "bfloat16", "threads": torch.get_num_threads(),
                           "compiled": fast.enabled(), "formats": {}}
    for key, (name, spec) in SPEED_CASES.items():
        fmt, kw = get_format(name), {**spec, **context.get(name, {})}
        start = time.perf_counter()
        fmt.quantize(x, **kw)  # warm-up: compiles the fused kernel once
        warm = time.perf_counter() - start
        clone = best_time(lambda: x.clone(), repeats + 4)
        secs = best_time(lambda: fmt.quantize(x, **kw), repeats)
        out["formats"][key] = {"seconds": round(secs, 4), "clone_seconds": round(clone, 4),
                               "ratio_to_clone": round(secs / clone, 2), "first_call_seconds": round(warm, 2)}
    # clone() writes fresh pages (page faults included, like quantize's own outputs); a copy into
    # an existing tensor shows the bare memory traffic, for a stricter comparison.
    dst = torch.empty_like(x)
    out["copy_into_existing_seconds"] = round(best_time(lambda: dst.copy_(x), repeats + 4), 4)
    return out


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    e = (x.double() - y.double()).square().sum()
    return float(10 * torch.log10(x.double().square().sum() / e.clamp_min(1e-300)))


def quality(tensors: list[torch.Tensor]) -> dict[str, Any]:
    """SQNR over all tensors together and stored bits per weight, per format case."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    books = {nc: fit_codebooks(tensors, codebooks=nc).codebook for nc in (8, 16)}  # model-wide
    out = {}
    for key, (name, spec) in QUALITY_CASES.items():
        fmt = get_format(name)
        extra = {"codebook": books[spec.get("codebooks", 16)]} if name == "bcq" else {}
        qs = [fmt.quantize(t, **spec, **extra) for t in tensors]
        deq = torch.cat([fmt.dequantize(q).reshape(-1) for q in qs])
        bits = sum(q.storage_bits() for q in qs) / flat.numel()
        out[key] = {"sqnr_db": round(sqnr_db(flat, deq), 3), "bits_per_weight": round(bits, 4),
                    "nominal_bits": round(fmt.bits_per_weight(**spec), 4)}
    return out


def stories_weights() -> list[torch.Tensor] | None:
    if not STORIES.exists():
        return None
    from safetensors.torch import load_file

    state = load_file(str(STORIES))
    return [t.float() for k, t in sorted(state.items()) if t.ndim == 2 and "embed" not in k and "lm_head" not in k]


def student_t(n: int = 1024, seed: int = 0) -> torch.Tensor:
    """Seeded Student-t (4 degrees of freedom) n x n float32."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((n, n))


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The formats issue's targets, checked on this run's figures."""
    out: dict[str, Any] = {}
    if "speed" in report:
        ratios = {k: v["ratio_to_clone"] for k, v in report["speed"]["formats"].items()}
        out["nvfp4_le_5x_clone"] = ratios["nvfp4"] <= 5
        out["others_le_15x_clone"] = all(r <= 15 for k, r in ratios.items() if k != "nvfp4")
    for data, q in report.get("quality", {}).items():
        out[f"{data}: bcq >= nvfp4 + 1 dB"] = q["bcq"]["sqnr_db"] >= q["nvfp4"]["sqnr_db"] + 1
        out[f"{data}: nvfp4 > mxfp4"] = q["nvfp4"]["sqnr_db"] > q["mxfp4"]["sqnr_db"]
        out[f"{data}: int4 octav > max"] = q["int4_octav"]["sqnr_db"] > q["int4"]["sqnr_db"]
    return out


FAKE_SHAPES = [(8, 100, 576), (8, 100, 1536), (1, 2048, 576)]


def fake_speed(repeats: int = 50) -> list[dict[str, Any]]:
    """Milliseconds per call: fused `fake_quantize`, quantize + dequantize, a bf16 Linear (576 out)."""
    fmt, out = get_format("nvfp4"), []
    for shape in FAKE_SHAPES:
        x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
        lin = torch.nn.Linear(shape[-1], 576).to(torch.bfloat16)
        cases = {"fused_ms": lambda: fmt.fake_quantize(x, global_amax=5.0),
                 "pack_unpack_ms": lambda: fmt.dequantize(fmt.quantize(x, global_amax=5.0), dtype=x.dtype),
                 "bf16_linear_ms": lambda: lin(x)}
        row: dict[str, Any] = {"shape": list(shape)}
        with torch.no_grad():
            for name, fn in cases.items():
                fn()  # warm-up (compiles the fused kernel once)
                t = time.perf_counter()
                for _ in range(repeats):
                    fn()
                row[name] = round((time.perf_counter() - t) / repeats * 1e3, 3)
        row["speedup"] = round(row["pack_unpack_ms"] / row["fused_ms"], 1)
        out.append(row)
    return out


def run(skip_speed: bool = False, skip_quality: bool = False, rows: int = 4096, cols: int = 11008,
        repeats: int = 3) -> dict[str, Any]:
    report: dict[str, Any] = {"torch": torch.__version__}
    if not skip_speed:
        report["speed"] = speed(rows, cols, repeats)
    if not skip_quality:
        report["quality"] = {}
        weights = stories_weights()
        if weights is not None:
            report["quality"]["stories260K_linear_weights"] = quality(weights)
        report["quality"]["student_t4_1024x1024"] = quality([student_t()])
    report["goals"] = goals(report)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=11008)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fake", action="store_true", help="only the fake-quantization speed of activations")
    a = p.parse_args(argv)
    if a.fake:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "nvfp4_fake_quantize": fake_speed()}, indent=1))
        return
    report = run(a.skip_speed, a.skip_quality, a.rows, a.cols, a.repeats)
    sys.stdout.write(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
