"""Subcommands. Each parses options, calls one pipeline function, and renders its result."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lpc.cli import render
from lpc.cli.app import (Data, Debug, Device, Gate, Json, Limit, ModelArg, Out, Overwrite, Ppl, Samples, SeqLen, Sets,
                         Tasks, TasksData, TasksDir, app, emit, guarded, load_recipe_arg, split_tasks, stage_rows)

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="built-in recipe name (`lpc recipes`) or YAML path")]


def _calibration_sets(sets: list[str] | None, samples: int | None, seq_len: int | None) -> list[str]:
    """--samples/--seq-len as the recipe overrides they stand for."""
    return (list(sets or []) + ([f"calibrate.samples={samples}"] if samples is not None else [])
            + ([f"calibrate.seq_len={seq_len}"] if seq_len is not None else []))


def _set_tasks_data(tasks_data: str | None) -> None:
    """--tasks-data is LPC_TASKS_DATA for this run (the built-in local tasks read their JSON there)."""
    if tasks_data is not None:
        import os

        from lpc.pipeline.evaluation.tasks import TASKS_DATA_ENV

        os.environ[TASKS_DATA_ENV] = str(Path(tasks_data).expanduser().resolve())


def _stage_done(result, as_json: bool) -> None:
    summary = result.summary()
    emit(summary, as_json, f"lpc {result.stage} -> {result.out}" + (" (up to date, skipped)" if result.skipped else ""),
          stage_rows(summary), ["field", "value"])


@app.command()
@guarded
def calibrate(model: ModelArg, data: Data, out: Out, recipe: RecipeOpt = "nvfp4", samples: Samples = None,
              seq_len: SeqLen = None,
              fisher: Annotated[bool, typer.Option("--fisher", help="also collect Fisher statistics (for fgmp/vapr)")] = False,
              sets: Sets = None, device: Device = "cpu", overwrite: Overwrite = False,
              json_out: Json = False, debug: Debug = False) -> None:
    """Collect input statistics (absmax, X^T X) and optionally Fisher information."""
    from lpc.pipeline import stages

    sets = _calibration_sets(sets, samples, seq_len) + (["calibrate.fisher=true"] if fisher else [])
    with render.progress(not json_out) as progress:
        result = stages.calibrate(model, data, out, load_recipe_arg(recipe, sets), overwrite, device, progress)
    _stage_done(result, json_out)


@app.command()
@guarded
def quantize(model: ModelArg, out: Out,
             recipe: Annotated[Optional[str], typer.Option(
                 "--recipe", "-r", help="built-in recipe name or YAML path (default: nvfp4, or the plan's recipe)")] = None,
             calib: Annotated[Optional[Path], typer.Option("--calib", help="calibration artifact (lpc calibrate)")] = None,
             plan: Annotated[Optional[Path], typer.Option(
                 "--plan", help="allocation artifact (lpc allocate); its recipe and calibration are used")] = None,
             sets: Sets = None, device: Device = "cpu", overwrite: Overwrite = False, json_out: Json = False,
             max_shard_size: Annotated[str, typer.Option(
                 "--max-shard-size", help="largest weight file (e.g. 5GB, 500MB); above it, HF shards + index")] = "5GB",
             debug: Debug = False) -> None:
    """Quantize the recipe's target Linears (or follow an allocation plan)."""
    from lpc.pipeline import stages

    if recipe is None and plan is not None:
        from lpc.pipeline.allocation.plan import plan_recipe
        r = plan_recipe(plan, sets or [])
    else:
        r = load_recipe_arg(recipe or "nvfp4", sets)
    with render.progress(not json_out) as progress:
        result = stages.quantize(model, r, out, calib=calib, plan=plan, overwrite=overwrite, progress=progress,
                                 device=device, max_shard_size=max_shard_size)
    _stage_done(result, json_out)


@app.command()
@guarded
def allocate(calib: Annotated[Path, typer.Argument(help="calibration artifact (lpc calibrate; --fisher for fgmp/vapr)")],
             out: Out, recipe: RecipeOpt = "fgmp_nvfp4a16",
             model: Annotated[Optional[str], typer.Option(
                 "--model", help="model directory (default: the one the calibration was made from)")] = None,
             sets: Sets = None, overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False) -> None:
    """Decide which weights keep more precision (FGMP blocks or a VaPr format search); `lpc quantize --plan`
    reads the result."""
    from lpc.pipeline import stages

    with render.progress(not json_out) as progress:
        result = stages.allocate(calib, load_recipe_arg(recipe, sets), out, model=model, overwrite=overwrite,
                                 progress=progress)
    _stage_done(result, json_out)


@app.command()
@guarded
def compensate(quant: Annotated[Path, typer.Argument(help="quantize artifact (lpc quantize)")],
               calib: Annotated[Path, typer.Option("--calib", help="calibration artifact of the same model")],
               out: Out, recipe: RecipeOpt = "nvfp4_eora", sets: Sets = None, device: Device = "cpu",
               overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False) -> None:
    """Low-rank compensation of the quantization error (e.g. --set compensate.method=svd --set compensate.rank=16)."""
    from lpc.pipeline import stages

    with render.progress(not json_out) as progress:
        result = stages.compensate(quant, calib, load_recipe_arg(recipe, sets), out, overwrite=overwrite, progress=progress,
                                   device=device)
    _stage_done(result, json_out)


@app.command()
@guarded
def export(src: Annotated[Path, typer.Argument(help="quantize/compensate artifact")], out: Out,
           fmt: Annotated[str, typer.Option("--format", help="an exporter: auto | compressed-tensors | modelopt | lpc | dense | peft")] = "lpc",
           overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False) -> None:
    """Write a deployable model: packed lpc, dense (dequantized), a PEFT adapter, or compressed-tensors."""
    from lpc.pipeline import stages

    with render.progress(not json_out) as progress:
        result = stages.export(src, out, fmt, overwrite, progress)
    _stage_done(result, json_out)


@app.command(name="eval")
@guarded
def eval_cmd(path: Annotated[str, typer.Argument(help="artifact or model directory")],
             ppl: Ppl = None,
             seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="perplexity window in tokens")] = 256,
             tasks: Tasks = None, tasks_dir: TasksDir = None, tasks_data: TasksData = None, limit: Limit = None,
             max_length: Annotated[Optional[int], typer.Option("--max-length",
                                                               help="lm-eval context length (default: the model's)")] = None,
             baseline: Annotated[Optional[str], typer.Option("--baseline", help=(
                 "model to compare against, or a saved report of it (lpc eval MODEL --json > FILE.json, "
                 "or an -o DIR): compared without re-evaluating it; KL needs the model"))] = None,
             fail_under_recovery: Gate = None,
             out: Annotated[Optional[Path], typer.Option(
                 "-o", "--out", help="write the report as an eval artifact here (eval.json + manifest.json)")] = None,
             kv_policy: Annotated[Optional[str], typer.Option(
                 "--kv-policy", help="simulate a KV cache policy in perplexity: thinkv, h2o, streaming, uniform")] = None,
             kv_budget: Annotated[Optional[float], typer.Option(
                 "--kv-budget", help="the policy's KV budget, a fraction of the bf16 cache bytes (e.g. 0.1)")] = None,
             device: Device = "cpu", overwrite: Overwrite = False, json_out: Json = False, debug: Debug = False) -> None:
    """Perplexity and lm-eval tasks of a model, optionally against a baseline (exit 3 on a failed gate)."""
    from lpc.pipeline import stages
    from lpc.pipeline.errors import GateFailed
    from lpc.pipeline.stages.evaluate import read_report

    task_list = split_tasks(tasks)
    _set_tasks_data(tasks_data)
    kwargs = dict(baseline=baseline, fail_under_recovery=fail_under_recovery, ppl=ppl, seq_len=seq_len,
                  tasks=task_list, tasks_dir=tasks_dir, limit=limit, max_length=max_length, device=device)
    if kv_policy is not None or kv_budget is not None:
        kwargs["kv_policy"] = kv_policy_option(kv_policy, kv_budget)
    with render.progress(not json_out) as progress:
        try:
            if out is None:
                result = stages.evaluate_report(path, progress=progress, **kwargs)
            else:
                result = read_report(stages.evaluate(path, out, overwrite=overwrite, progress=progress, **kwargs).out)
            failed = None
        except GateFailed as err:
            result, failed = err.report, err  # type: ignore[attr-defined]
    show_eval(result, json_out)
    if failed is not None:
        raise failed


def kv_policy_option(policy: str | None, budget: float | None) -> dict:
    """--kv-policy / --kv-budget, checked as the recipe's kv_cache section checks them."""
    from lpc.recipes.schema import KVCacheConfig
    from lpc.pipeline.errors import InputError

    if policy is None or budget is None:
        raise InputError("--kv-policy and --kv-budget go together", "e.g. --kv-policy thinkv --kv-budget 0.1")
    from lpc.pipeline.kvcache.policy import make_policy

    try:
        kv = KVCacheConfig(policy=policy, budget=budget).model_dump(include={"policy", "budget", "policy_options"})
    except ValueError as err:  # pydantic's ValidationError: its first message is the checker's own
        msg = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise InputError(msg.removeprefix("Value error, "), "see `lpc eval --help`") from None
    make_policy(kv["policy"], kv["budget"])  # options and budget checked before any model is loaded
    return kv


def show_eval(result: dict, as_json: bool) -> None:
    if as_json:
        render.print_json(result)
        return
    base = result.get("baseline") or {}
    rows = []
    for f, v in result.get("perplexity", {}).items():
        rows.append([f"perplexity {Path(f).name}", base.get("perplexity", {}).get(f), v])
    for f, v in (result.get("kl_to_baseline") or {}).items():
        rows.append([f"KL to baseline {Path(f).name}", 0.0, v])
    for task, metrics in result.get("tasks", {}).items():
        for m, v in metrics.items():
            if "stderr" not in m and m != "samples":
                rows.append([f"{task} {m}", base.get("tasks", {}).get(task, {}).get(m), v])
    render.print_table(f"lpc eval {result.get('model')}", ["metric", "baseline", "model"], rows)
    if result.get("recovery") is not None:
        render.out_console.print(f"recovery: {result['recovery']:.4f}")


@app.command()
@guarded
def compress(model: ModelArg, out: Out, recipe: RecipeOpt = "nvfp4", data: Data = "self",
             samples: Samples = None, seq_len: SeqLen = None, ppl: Ppl = None, tasks: Tasks = None,
             tasks_dir: TasksDir = None, tasks_data: TasksData = None, limit: Limit = None,
             fail_under_recovery: Gate = None,
             sets: Sets = None, device: Device = "cpu", overwrite: Overwrite = False,
             json_out: Json = False, debug: Debug = False) -> None:
    """Every stage in order (calibrate, allocate, quantize, compensate, export, eval); resumable."""
    from lpc.pipeline.stages.compress import compress as run

    r = load_recipe_arg(recipe, _calibration_sets(sets, samples, seq_len))
    task_list = split_tasks(tasks)
    _set_tasks_data(tasks_data)
    with render.progress(not json_out) as progress:
        result = run(model, r, data, out, overwrite=overwrite, device=device, progress=progress, ppl=ppl,
                     tasks=task_list, tasks_dir=tasks_dir, limit=limit, fail_under_recovery=fail_under_recovery)
    if json_out:
        render.print_json(result)
    else:
        rows = [[s["stage"], "skipped" if s["skipped"] else f"{s['seconds']:.1f}s", s["out"]] for s in result["stages"]]
        render.print_table(f"lpc compress {model} ({r.name})", ["stage", "time", "output"], rows)
        render.out_console.print(f"bits per weight: {result['bits_per_weight']:.4f}   "
                                 f"wall {result['seconds']:.1f}s   peak RSS {result['peak_rss_mb']:.0f} MB")
        if result.get("eval"):
            show_eval(result["eval"], False)
    if result.get("gate_failed"):
        raise typer.Exit(3)


@app.command()
@guarded
def inspect(path: Annotated[Path, typer.Argument(help="any lpc artifact directory")],
            plot: Annotated[Optional[Path], typer.Option("--plot", help="draw the precision map to this PNG")] = None,
            json_out: Json = False, debug: Debug = False) -> None:
    """What an artifact holds: per-layer formats, bits, errors (and a precision map)."""
    from lpc.pipeline.artifact.inspect import inspect_artifact

    info = inspect_artifact(path, plot=plot)
    if json_out:
        render.print_json(info)
        return
    cols = ["layer", "format", "shape", "bits", "sqnr dB", "rel out err"]
    cols += ["rank", "err before"] if info["has_rank"] else []
    rows = [[r["layer"], r["format"], r["shape"], r["bits"], r.get("sqnr_db"), r.get("rel_output_error")]
            + ([r.get("rank"), r.get("rel_output_error_before")] if info["has_rank"] else []) for r in info["layers"]]
    render.print_table(f"{info['stage']} artifact {path}", cols, rows)
    render.out_console.print(f"bits per weight: {render.fmt(info.get('bits_per_weight'))}")


@app.command()
@guarded
def verify(path: Annotated[Path, typer.Argument(help="artifact directory")], json_out: Json = False,
           debug: Debug = False) -> None:
    """Check an artifact: hashes, tensors present and finite, scales non-zero, shapes."""
    from lpc.pipeline.artifact.inspect import verify_artifact

    report = verify_artifact(path)
    if json_out:
        render.print_json(report)
    else:
        render.out_console.print(f"[green]ok[/]: {path} ({report['files']} files, {report['layers']} quantized layers)")


@app.command()
@guarded
def formats(json_out: Json = False, debug: Debug = False) -> None:
    """The built-in number formats."""
    from lpc.formats import get_format, list_formats

    rows = []
    for name in list_formats():
        f = get_format(name)
        try:
            bits = f.bits_per_weight()
        except Exception:
            bits = None
        rows.append([name, bits, ", ".join(f.Spec.model_fields), f.description])
    emit({r[0]: {"bits_per_weight": r[1], "spec": r[2].split(", ") if r[2] else [], "description": r[3]} for r in rows},
          json_out, "formats", rows, ["format", "bits", "spec keys", "description"])


@app.command()
@guarded
def recipes(json_out: Json = False, debug: Debug = False) -> None:
    """The built-in recipes."""
    from lpc.recipes import list_recipes

    items = list_recipes()
    emit(items, json_out, "recipes", [[k, v] for k, v in items.items()], ["recipe", "description"])
