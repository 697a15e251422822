"""nvidia-modelopt reads lpc's modelopt exports of SmolLM2-135M: JSON to bench/results/modelopt_check.json.

Two steps in two venvs (`make modelopt` runs both):

    .venv/bin/python bench/modelopt_check.py --export-only     # lpc writes the exports (runs/engine-exports/)
    .venv-modelopt/bin/python bench/modelopt_check.py --check  # modelopt's own functions read them

The check imports lpc's pure parts (formats, artifact reader) from this source tree and compares, per
layer: modelopt's NVFP4QTensor.dequantize(weight, weight_scale, weight_scale_2) and FP8QTensor.dequantize
(weight, weight_scale) against lpc's own dequantization of the artifact the export came from (exact
equality in float32); input_scale against modelopt's NVFP4QTensor.get_weights_scaling_factor_2 of the
calibrated activation amax; the KV cache scales against modelopt's own export step
(quant_utils.postprocess_state_dict of the calibrated K/V amax: key names and values).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT = HERE / "results" / "modelopt_check.json"
CASES = {"mo-nvfp4-w4a4-kv": "nvfp4_w4a4_kv", "mo-fp8-kv": "fp8_tensor_kv"}  # export -> lpc artifact


def export_only() -> None:
    from _engine_exports import build

    build(sorted(set(CASES.values())))


def _import_lpc() -> None:
    """Make this source tree importable as `lpc` (the venv has no lpc installed)."""
    link = Path(tempfile.mkdtemp()) / "lpc"
    link.symlink_to(HERE.parent, target_is_directory=True)
    sys.path.insert(0, str(link.parent))


def check_export(export: Path, quant: Path) -> dict:
    import torch
    from modelopt.torch.export.quant_utils import postprocess_state_dict
    from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor
    from safetensors.torch import load_file

    from lpc.formats import get_format
    from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors

    qconfig = read_qconfig(quant)
    qtensors, plain = read_qtensors(quant, qconfig)
    tensors = load_file(str(export / "model.safetensors"))
    hq = json.loads((export / "hf_quant_config.json").read_text())["quantization"]
    layers = {"nvfp4": 0, "fp8": 0, "exact": 0, "max_abs_diff": 0.0, "dense": 0}
    for name, q in sorted(qtensors.items()):
        if f"{name}.weight_scale" not in tensors:
            layers["dense"] += 1
            continue
        w, s = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        if q.format == "nvfp4":
            got = NVFP4QTensor(q.shape, torch.float32, w).dequantize(
                scale=s, double_scale=tensors[f"{name}.weight_scale_2"], block_sizes={-1: 16})
            layers["nvfp4"] += 1
        else:
            got = FP8QTensor(q.shape, torch.float32, w).dequantize(scale=s)
            layers["fp8"] += 1
        want = get_format(q.format).dequantize(q)
        layers["exact"] += int(torch.equal(got.float(), want))
        layers["max_abs_diff"] = max(layers["max_abs_diff"], (got.float() - want).abs().max().item())
    acts = (qconfig.get("activations") or {}).get("layers") or {}
    input_scales = {"layers": 0, "equal": 0}
    for name, entry in acts.items():
        if f"{name}.input_scale" in tensors:
            ref = NVFP4QTensor.get_weights_scaling_factor_2(torch.tensor([float(entry["global_amax"])]))
            input_scales["layers"] += 1
            input_scales["equal"] += int(torch.equal(tensors[f"{name}.input_scale"].reshape(()), ref.float().reshape(())))
    kv = {"layers": 0, "equal": 0, "kv_cache_quant_algo": hq.get("kv_cache_quant_algo")}
    if qconfig.get("kv_cache"):
        n = sum(1 for k in plain if k.startswith("lpc.kv.") and k.endswith(".k_amax"))
        amax = {f"model.layers.{i}.self_attn.{p}_bmm_quantizer._amax": plain[f"lpc.kv.{i}.{p}_amax"].float().amax()
                for i in range(n) for p in ("k", "v")}
        ref = postprocess_state_dict(amax, maxbound=448.0, quantization="FP8")
        kv["layers"] = n
        kv["equal"] = sum(int(k in tensors and torch.equal(tensors[k].float().reshape(()), v.float().reshape(())))
                          for k, v in ref.items())
        kv["names"] = sorted(ref)[:2]
    return {"quant_algo": hq.get("quant_algo"), "weights": layers, "input_scales": input_scales, "kv_cache": kv}


def check() -> None:
    _import_lpc()
    import modelopt
    import torch

    from _engine_exports import ROOT

    t0 = time.time()
    result = {"modelopt_version": modelopt.__version__, "torch": torch.__version__, "exports": {}}
    for export, artifact in CASES.items():
        result["exports"][export] = check_export(ROOT / export, ROOT / artifact / "quant")
    e = result["exports"]
    result["ok"] = all(v["weights"]["exact"] == v["weights"]["nvfp4"] + v["weights"]["fp8"] > 0
                       and v["input_scales"]["equal"] == v["input_scales"]["layers"]
                       and v["kv_cache"]["equal"] == 2 * v["kv_cache"]["layers"] for v in e.values())
    result["seconds"] = round(time.time() - t0, 1)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    from _two_venvs import two_venv_main

    two_venv_main(__doc__, "write lpc's exports (lpc's venv)", "read them with modelopt (.venv-modelopt)",
                  export_only, check)


if __name__ == "__main__":
    main()
