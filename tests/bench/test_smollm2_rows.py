"""bench/smollm2.py runs every built-in recipe by default, and every named row is a valid recipe."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lpc.recipes import load_recipe

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("smollm2_bench", REPO / "bench" / "smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return mod


def test_the_default_rows_are_every_built_in_recipe():
    bench = _bench()
    built_in = sorted(p.stem for p in (REPO / "recipes" / "builtin").glob("*.yaml"))
    assert sorted(bench.DEFAULT) == built_in
    for label, (recipe, sets) in bench.ROWS.items():
        assert load_recipe(recipe, sets).name == recipe, label
