"""`--format dense`: dequantized weights (low-rank paths merged) as a plain Hugging Face model that any
tool loads; simulated activation and KV cache quantization cannot be expressed and are reported as dropped."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lpc.pipeline.artifact.load import load
from lpc.pipeline.artifact.lpc_model import read_qconfig
from lpc.pipeline.export.registry import EXPORTERS
from lpc.pipeline.io.models import copy_tokenizer_files

log = logging.getLogger(__name__)


def write_dense(src: Path, tmp: Path) -> dict[str, Any]:
    qconfig = read_qconfig(src) or {}
    model, _ = load(src, activations=False, merge_lowrank=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    copy_tokenizer_files(src, tmp)
    dropped = []
    if qconfig.get("activations"):
        dropped.append("activation quantization (a dense model has none; evaluate the lpc artifact for W+A)")
        log.warning("dense export drops the simulated activation quantization")
    if qconfig.get("kv_cache"):
        dropped.append("KV cache quantization (a dense model keeps a plain cache; export compressed-tensors or "
                       "modelopt for an engine's FP8 KV cache)")
        log.warning("dense export drops the KV cache quantization")
    return {"dropped": dropped}


EXPORTERS.add("dense", write_dense)
