"""The model card: a short README.md in every artifact directory, as users of the hub expect.

It says what the directory holds (stage, source model, recipe, bits per weight, formats), the
evaluation results when there are any, and how to load it. It is built from the manifest fields
alone (no dates, no absolute staging paths), so equal inputs still give byte-identical artifacts.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

CARD = "README.md"

_LOADERS = {
    "dense": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
             "model = AutoModelForCausalLM.from_pretrained(\"{dir}\")\n"
             "tokenizer = AutoTokenizer.from_pretrained(\"{dir}\")",
    "compressed-tensors": "from transformers import AutoModelForCausalLM  # with compressed-tensors installed; vLLM loads it too\n"
                          "model = AutoModelForCausalLM.from_pretrained(\"{dir}\")",
    "modelopt": "# TensorRT-LLM / vLLM load this directory (hf_quant_config.json, quant_method modelopt)\n"
                "import lpc\nmodel, tokenizer = lpc.load(\"{dir}\")",
    "peft": "import lpc  # the dense base here, the low-rank paths in adapter/\n"
            "from peft import PeftModel\nbase, tokenizer = lpc.load(\"{dir}\")\n"
            "model = PeftModel.from_pretrained(base, \"{dir}/adapter\")",
}
_DEFAULT_LOADER = "import lpc\nmodel, tokenizer = lpc.load(\"{dir}\")  # dequantized weights, simulated activations"


def model_card(name: str, manifest: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None) -> str:
    """The README.md text for an artifact called `name` with these manifest fields (`evaluation`:
    an eval report to show, e.g. the one `lpc compress --ppl` made of this model)."""
    stage = manifest.get("stage", "?")
    recipe = manifest.get("recipe") or {}
    config = manifest.get("config") or {}
    summary = manifest.get("summary") or {}
    fmt = summary.get("format") or config.get("format")
    formats = _formats(manifest.get("layers") or {})
    bits = manifest.get("bits_per_weight", summary.get("bits_per_weight"))
    tags = ["lpc", "quantized", *sorted(formats)] if formats else ["lpc"]
    lines = ["---", "library_name: transformers", f"tags: [{', '.join(tags)}]", "---", "",
             f"# {name}", "", f"Written by `lpc {_command(stage)}` (lpc {manifest.get('lpc_version', '?')}).", "",
             "| | |", "|---|---|"]
    rows = [("stage", stage), ("model evaluated" if stage == "eval" else "source model", config.get("model")),
            ("baseline", config.get("baseline")), ("recipe", _recipe_text(recipe)),
            ("export format", fmt), ("bits per weight", f"{bits:.4f}" if isinstance(bits, (int, float)) else None),
            ("layers", ", ".join(f"{f} x{n}" for f, n in sorted(formats.items())) or None)]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows if v not in (None, "", [])]
    report = evaluation if evaluation is not None else (summary if stage == "eval" else None)
    lines += _evaluation(report) if report else []
    if _holds_model(manifest):
        loader = _LOADERS.get(fmt or "", _DEFAULT_LOADER).format(dir=name)
        lines += ["", "## How to load", "", "```python", loader, "```"]
    lines += ["", f"`lpc inspect {name}` lists every layer's format, bits and error; `lpc verify {name}` checks the "
              "files against the sha256 in `manifest.json`.", ""]
    return "\n".join(lines)


def write_card(directory: Path, manifest: Mapping[str, Any], name: str | None = None,
               evaluation: Mapping[str, Any] | None = None) -> Path:
    """Write README.md into `directory` (atomically: a file hard-linked from an input is replaced,
    never written through)."""
    from lpc.pipeline.artifact.store import fsync_write

    path = Path(directory) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    fsync_write(tmp, model_card(name or Path(directory).name, manifest, evaluation).encode())
    os.replace(tmp, path)
    return path


def _command(stage: str) -> str:
    return {"calibrate": "calibrate", "allocate": "allocate", "quantize": "quantize", "compensate": "compensate",
            "export": "export", "eval": "eval"}.get(stage, stage)


def _formats(layers: Mapping[str, Any]) -> dict[str, int]:
    return dict(Counter(r["format"] for r in layers.values() if isinstance(r, dict) and r.get("format")))


def _recipe_text(recipe: Mapping[str, Any]) -> str | None:
    if not recipe:
        return None
    q = recipe.get("quantize") or {}
    weights = (q.get("weights") or {}).get("format")
    parts = [p for p in (weights and f"weights {weights}", q.get("method") and f"method {q['method']}",
                         (recipe.get("compensate") or {}).get("method") and
                         f"compensation {recipe['compensate']['method']}",
                         (recipe.get("allocate") or {}).get("policy") and
                         f"allocation {recipe['allocate']['policy']}") if p]
    return f"`{recipe.get('name', '?')}`" + (f" ({', '.join(parts)})" if parts else "")


def _evaluation(report: Mapping[str, Any]) -> list[str]:
    rows = [(f"perplexity {Path(f).name}", v) for f, v in (report.get("perplexity") or {}).items()]
    base = (report.get("baseline") or {}).get("perplexity") or {}
    rows += [(f"baseline perplexity {Path(f).name}", v) for f, v in base.items()]
    rows += [(f"KL to baseline {Path(f).name}", v) for f, v in (report.get("kl_to_baseline") or {}).items()]
    for task, metrics in (report.get("tasks") or {}).items():
        rows += [(f"{task} {m}", v) for m, v in metrics.items() if m in ("acc", "acc_norm")]
    if report.get("recovery") is not None:
        rows.append(("recovery (vs baseline)", report["recovery"]))
    gate = report.get("gate")
    if gate:
        rows.append(("gate", f"recovery >= {gate.get('fail_under_recovery')}: "
                             f"{'passed' if gate.get('passed') else 'FAILED'}"))
    if not rows:
        return []
    return ["", "## Evaluation", "", "| metric | value |", "|---|---|"] + \
        [f"| {k} | {_cell(v)} |" for k, v in rows]


def _holds_model(manifest: Mapping[str, Any]) -> bool:
    files = manifest.get("files") or {}
    return manifest.get("stage") in ("quantize", "compensate", "export") or any(
        str(f).endswith("model.safetensors") for f in files)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")
