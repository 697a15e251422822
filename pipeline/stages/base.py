"""The stage contract: every stage reads artifact directories (and a recipe), writes one artifact
directory holding `manifest.json`, and returns a `StageResult`.

`run_stage` is the frame every stage runs in: it skips a stage whose output is complete for the
same inputs and config (resume), refuses an existing different output unless `overwrite`, builds the
output in a staging directory renamed into place when complete, and writes a model card (README.md)
and the manifest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lpc.pipeline.artifact import store as art
from lpc.pipeline.artifact.card import write_card

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage did: its manifest, where, whether it was skipped, and how long it took."""

    stage: str
    out: Path
    manifest: dict[str, Any]
    skipped: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": str(self.out), "skipped": self.skipped,
                "seconds": round(self.seconds, 3), **self.manifest.get("summary", {}), **self.extra}


def run_stage(stage: str, out: Path, inputs: list[str | Path], config: dict[str, Any], overwrite: bool,
              body: Callable[[Path], dict[str, Any]]) -> StageResult:
    """Run `body(staging_dir) -> manifest fields` inside the common frame (see the module docstring).

    inputs: every file the stage reads (hashed into the manifest; a changed input re-runs the stage).
    config: everything else that decides the output (resolved recipe sections, options).
    """
    out = Path(out)
    records = [art.input_record(p) for p in inputs]
    t0 = time.perf_counter()
    if art.is_up_to_date(out, stage, records, config):
        log.info("%s: %s is up to date, skipping", stage, out)
        return StageResult(stage, out, art.read_manifest(out, stage), skipped=True)
    art.check_output(out, [p for p in inputs if Path(p).exists()], overwrite)
    with art.staging(out) as tmp:
        fields = {"stage": stage, "config": config, "inputs": records, **body(tmp)}
        write_card(tmp, {"lpc_version": art.lpc_version(), **fields}, name=out.name)  # README.md, hashed too
        manifest = art.finish_manifest(tmp, fields)
    return StageResult(stage, out, manifest, seconds=time.perf_counter() - t0)


def check_recipe_names(recipe: Any) -> None:
    """Every pluggable name of the recipe is registered: refused before any stage runs, listing the valid ones."""
    from lpc.pipeline.allocation import ALLOCATION_POLICIES
    from lpc.pipeline.compensation import COMPENSATION_METHODS
    from lpc.pipeline.export import EXPORTERS
    from lpc.pipeline.quantization import QUANTIZE_METHODS

    QUANTIZE_METHODS.get(recipe.quantize.method)
    EXPORTERS.get(recipe.export.format)
    if recipe.allocate is not None:
        ALLOCATION_POLICIES.get(recipe.allocate.policy)
    if recipe.compensate is not None:
        COMPENSATION_METHODS.get(recipe.compensate.method)
