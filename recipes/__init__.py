"""Recipes: a pydantic schema (`Recipe`) and built-in YAML files.

    recipe = load_recipe("nvfp4", overrides=["quantize.weights.spec.scale_search=4"])
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lpc.formats.errors import LpcError
from lpc.recipes.schema import Recipe


class RecipeError(LpcError):
    """A recipe that cannot be found, parsed or validated."""


def list_recipes() -> dict[str, str]:
    """Built-in recipe names -> descriptions."""
    out = {}
    for entry in sorted(resources.files("lpc.recipes.builtin").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out[entry.name[:-5]] = " ".join(str(data.get("description", "")).split())
    return out


def read_recipe_dict(name_or_path: str | Path) -> dict[str, Any]:
    """A built-in name or a YAML path -> raw dict (not validated)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist",
                              f"give a YAML file or a built-in name: {', '.join(list_recipes())}")
        text = path.read_text()
    else:
        res = resources.files("lpc.recipes.builtin") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise RecipeError(f"unknown recipe '{name_or_path}'",
                              f"built-in recipes: {', '.join(list_recipes())}; or give a YAML path")
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {name_or_path} is not valid YAML: {_yaml_problem(err)}",
                          "fix the YAML at that line and column") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name_or_path} must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (value parsed as YAML) to a copy of a recipe dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"bad override '{item}'", "write --set section.key=value, e.g. --set calibrate.samples=64")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"override '{item}': '{part}' is not a section")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)})",
                              "quote it, or write a complete value, e.g. --set 'x=[1, 2]'") from None
    return data


def _yaml_problem(err: Exception) -> str:
    """A YAML error as 'problem at line L, column C' (1-based), the way editors count."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source} is invalid: " + "; ".join(_explain(e) for e in err.errors())) from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (a built-in name or a YAML path)."""
    data = apply_overrides(read_recipe_dict(name_or_path), overrides or [])
    return validate_recipe(data, f"recipe {name_or_path}")


def _explain(e: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = _section_for(e["loc"][:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        return f"unknown key '{loc}' (valid keys here: {valid})"
    if e["type"] == "missing":
        return f"missing key '{loc}'"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}={e.get('input')!r}: {msg}"


def _section_for(loc: tuple[Any, ...]):
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and hasattr(cand, "model_fields"):
                model = cand
                break
        else:
            return None
    return model


__all__ = ["Recipe", "RecipeError", "apply_overrides", "list_recipes", "load_recipe", "validate_recipe"]
