"""`--format auto` (the default): compressed-tensors when every quantized layer has a compressed-tensors
form (engines such as vLLM and plain transformers load it), else the lpc format (every format and mix;
loads with `import lpc`). The summary says which (`format`) and why (`format_reason`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.export.compressed_tensors import expressible, write_compressed_tensors
from lpc.pipeline.export.lpc import write_lpc
from lpc.pipeline.export.registry import EXPORTERS


def write_auto(src: Path, tmp: Path) -> dict[str, Any]:
    qconfig = read_qconfig(src)
    reason = "the artifact holds no lpc quantization" if qconfig is None else expressible(qconfig)
    if reason is None:
        summary = write_compressed_tensors(src, tmp)
        kv = " and the FP8 KV cache" if qconfig.get("kv_cache") else ""
        return {**summary, "format": "compressed-tensors",
                "format_reason": f"every quantized layer{kv} has a compressed-tensors form (engines load it)"}
    summary = write_lpc(src, tmp)
    return {**summary, "format": "lpc", "format_reason": f"compressed-tensors cannot hold it: {reason}; "
                                                         "the lpc format loads after `import lpc`"}


EXPORTERS.add("auto", write_auto)
