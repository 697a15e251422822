"""lpc: post-training compression of Hugging Face causal language models.

The Python API is three calls, the same pipeline as the `lpc` command:

    import lpc
    summary = lpc.compress("path/to/model", "nvfp4", "calib.jsonl", "run/", calibrate__samples=64)
    model, tokenizer = lpc.load("run/")
    report = lpc.evaluate("run/", ppl=["heldout.jsonl"], baseline="path/to/model")

This file is the package `lpc` itself (pyproject maps `lpc` to the repository root, and
`lpc.cli`, `lpc.pipeline`, `lpc.formats`, `lpc.recipes` to their folders). Heavy imports wait
until a function is called, so `import lpc` stays cheap; the `lpc` quantization method is
registered with transformers as soon as transformers is imported (now, if it already is), so that
`import lpc` then `AutoModelForCausalLM.from_pretrained(artifact)` gives lpc's model.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["__version__", "compress", "evaluate", "load"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lpc")
    except Exception:  # a source tree that was never installed
        return "0.0.0+src"


__version__ = _version()


def _register_with_transformers() -> None:
    from lpc.pipeline.artifact import hf_quantizer  # noqa: F401  (registers on import)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then()` right after the module `name` is first imported (transformers is heavy: lpc does
    not import it for the user, only hooks its import)."""

    def __init__(self, name: str, then: Any):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, then: Any):
        self.inner, self.then = inner, then

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        self.then()

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self.inner, name)


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport("transformers", _register_with_transformers))


def compress(model: Any, recipe: Any = "nvfp4", data: str | Path = "self", out: str | Path = "lpc-out", *,
             overwrite: bool = False, device: str = "cpu", ppl: list[str] | None = None,
             tasks: list[str] | None = None, tasks_dir: str | None = None, limit: int | None = None,
             fail_under_recovery: float | None = None, progress: Any = None, **overrides: Any) -> dict[str, Any]:
    """Run every stage, as `lpc compress`, and return its summary (the run's summary.json).

    model: a local model directory, a hub id, or an in-memory `transformers.PreTrainedModel`
    (saved with its tokenizer, when it carries one as `model.tokenizer`, or `tokenizer=` among the
    overrides, to a temporary directory first). recipe: a built-in name, a YAML path, or a
    `lpc.recipes.Recipe`. data: as `--data` (.txt, .jsonl, datasets dir, hub id, or "self").
    overrides: recipe fields, `section__field=value` (e.g. `calibrate__samples=64`,
    `allocate__budget_bits=5.0`) or dotted keys passed as a dict (`**{"calibrate.samples": 64}`).
    The result's `artifact` is the finished model directory; `lpc.load` reads it.
    """
    from lpc.pipeline.stages.compress import compress as run

    tokenizer = overrides.pop("tokenizer", None)
    r = _recipe(recipe, overrides)
    if isinstance(model, (str, Path)):
        return run(str(model), r, str(data), Path(out), overwrite=overwrite, device=device, progress=progress,
                   ppl=ppl, tasks=tasks, tasks_dir=tasks_dir, limit=limit, fail_under_recovery=fail_under_recovery)
    with tempfile.TemporaryDirectory(prefix="lpc-model-") as tmp:
        src = _save_in_memory(model, tokenizer, Path(tmp))
        return run(str(src), r, str(data), Path(out), overwrite=overwrite, device=device, progress=progress,
                   ppl=ppl, tasks=tasks, tasks_dir=tasks_dir, limit=limit, fail_under_recovery=fail_under_recovery)


def load(path: str | Path, device: str = "cpu", **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from an lpc artifact (dequantized, simulated activations attached) or any
    Hugging Face model directory; eval mode, no gradients."""
    from lpc.pipeline.artifact.load import load as load_artifact

    return load_artifact(path, device=device, **kwargs)


def evaluate(path: str | Path, ppl: list[str] | str | None = None, baseline: str | Path | None = None,
             tasks: list[str] | None = None, fail_under_recovery: float | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """The report of `lpc eval` (perplexity, tasks, and with a baseline: recovery and KL).

    A failed gate raises `lpc.pipeline.errors.GateFailed` (its `report` attribute holds the numbers).
    Other keywords: seq_len, tasks_dir, limit, max_length, device, progress, batch_size."""
    from lpc.pipeline.stages.evaluate import evaluate_report

    files = [ppl] if isinstance(ppl, (str, Path)) else ppl
    return evaluate_report(str(path), baseline=baseline, fail_under_recovery=fail_under_recovery,
                           ppl=[str(f) for f in files] if files else None, tasks=tasks, **kwargs)


def _recipe(recipe: Any, overrides: dict[str, Any]) -> Any:
    """A validated recipe with `overrides` applied (as --set would)."""
    import json

    from lpc.pipeline.stages import check_recipe_names
    from lpc.recipes import load_recipe

    sets = [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in overrides.items()]
    if hasattr(recipe, "model_dump"):  # a Recipe object: its fields, then the overrides
        from lpc.recipes import apply_overrides, validate_recipe

        r = validate_recipe(apply_overrides(recipe.model_dump(mode="json"), sets), "recipe (object)")
    else:
        r = load_recipe(str(recipe), sets)
    check_recipe_names(r)
    return r


def _save_in_memory(model: Any, tokenizer: Any, tmp: Path) -> Path:
    """Write an in-memory model (and its tokenizer) as a model directory lpc can read."""
    from lpc.pipeline.errors import InputError

    if not hasattr(model, "save_pretrained"):
        raise InputError(f"model must be a path, a hub id or a transformers PreTrainedModel, got {type(model).__name__}",
                         "pass model=AutoModelForCausalLM.from_pretrained(...) or its directory")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if not Path(name).is_dir():
            raise InputError("an in-memory model needs its tokenizer to be saved with it",
                             "pass tokenizer=... to lpc.compress, or the model's directory instead")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    return tmp
