"""compressed-tensors' own NVFP4 decompression of lpc's SmolLM2 export, layer by layer, against lpc's.

    .venv/bin/python bench/ct_decompress_check.py   # after bench/vllm_check.py --export-only wrote the export

Prints JSON: per compressed-tensors NVFP4 layer, whether NVFP4PackedCompressor.decompress (bfloat16)
equals lpc's float32 dequantization rounded to bfloat16, and how many elements differ and by how much.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    from _engine_exports import ROOT
    from lpc.formats import get_format
    from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors
    from lpc.pipeline.export.ct_layouts import nvfp4_tensors

    quant = ROOT / "nvfp4" / "quant"
    qtensors, _ = read_qtensors(quant, read_qconfig(quant))
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    layers, elements, total, worst = 0, 0, 0, 0.0
    for name, q in sorted(qtensors.items()):
        fields, _ = nvfp4_tensors(q, None)
        got = NVFP4PackedCompressor.decompress(dict(fields), scheme)["weight"]
        want = get_format("nvfp4").dequantize(q).to(got.dtype)
        diff = got != want
        layers += int(bool(diff.any()))
        elements += int(diff.sum())
        total += got.numel()
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    print(json.dumps({"layers": len(qtensors), "layers_differing": layers, "elements_differing": elements,
                      "elements": total, "max_abs_diff": worst}, indent=2))


if __name__ == "__main__":
    main()
