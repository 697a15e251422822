"""`lpc export`: write a deployable model from a quantize/compensate artifact with a registered
exporter (export/registry.py): auto, lpc, dense, peft, compressed-tensors, modelopt."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lpc.pipeline.artifact import store as art
from lpc.pipeline.export import EXPORTERS
from lpc.pipeline.progress import Progress
from lpc.pipeline.stages.base import StageResult, run_stage


def export(src: Path, out: Path, fmt: str = "lpc", overwrite: bool = False,
           progress: Progress | None = None) -> StageResult:
    """Write `src` (a quantize, compensate or lpc export artifact) as `fmt` into `out`."""
    writer = EXPORTERS.get(fmt)
    manifest = art.read_checked_manifest(src, ("quantize", "compensate", "export"))

    def body(tmp: Path) -> dict[str, Any]:
        summary = dict(manifest.get("summary", {}))
        written = writer(Path(src), tmp)
        summary.update(written)
        summary["format"] = written.get("format", fmt)  # `auto` says which format it chose
        return {"recipe": manifest.get("recipe"), "layers": manifest.get("layers", {}), "summary": summary,
                "bits_per_weight": manifest.get("bits_per_weight")}

    inputs = [Path(src) / n for n in sorted(manifest["files"])]
    return run_stage("export", out, inputs, {"format": fmt}, overwrite, body)
