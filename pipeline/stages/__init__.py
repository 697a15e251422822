"""The stages of lpc, one module each, under one contract (stages/base.py): each reads artifact
directories (and a recipe), writes one artifact directory with a manifest, and returns a
`StageResult`. `compress` is the runner over them.

    calibrate(model, data, out, recipe)          -> calib/
    allocate(calib, recipe, out)                 -> alloc/
    quantize(model, recipe, out, calib=, plan=)  -> quant/
    compensate(quant, calib, recipe, out)        -> comp/
    export(src, out, fmt)                        -> out/
    evaluate(path, out, baseline=, ppl=, ...)    -> eval/
"""
from lpc.pipeline.stages.allocate import allocate
from lpc.pipeline.stages.base import StageResult, check_recipe_names, run_stage
from lpc.pipeline.stages.calibrate import calibrate
from lpc.pipeline.stages.compensate import compensate
from lpc.pipeline.stages.compress import compress
from lpc.pipeline.stages.evaluate import evaluate, evaluate_report
from lpc.pipeline.stages.export import export
from lpc.pipeline.stages.quantize import quantize

__all__ = ["StageResult", "allocate", "check_recipe_names", "calibrate", "compensate", "compress", "evaluate", "evaluate_report",
           "export", "quantize", "run_stage"]
