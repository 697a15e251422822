"""`lpc compensate`: add low-rank paths (EoRA, SVD, ESPACE) to a quantize artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lpc.cli import render
from lpc.cli.commands import RecipeOpt, _stage_done
from lpc.cli.main import Debug, Device, Json, Out, Overwrite, Sets, _recipe, app, guarded


@app.command()
@guarded
def compensate(quant: Annotated[Path, typer.Argument(help="quantize artifact (lpc quantize)")],
               calib: Annotated[Path, typer.Option("--calib", help="calibration artifact of the same model")],
               out: Out, recipe: RecipeOpt = "nvfp4_eora", sets: Sets = None, device: Device = "cpu",
               overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False) -> None:
    """Low-rank compensation of the quantization error (e.g. --set compensate.method=svd --set compensate.rank=16)."""
    from lpc.pipeline.stages.compensate import compensate as run

    r = _recipe(recipe, sets)
    with render.RichProgress(not json_out) as progress:
        result = run(quant, calib, r, out, overwrite=overwrite, progress=progress, device=device)
    _stage_done(result, json_out)
