"""The `--device` option: checked once at a stage's boundary, before anything is read or written.

`cpu` is the reference; `cuda` / `cuda:N` need a CUDA build of torch and a visible GPU. Anything
else is refused with the list of valid values, instead of failing deep inside a stage.
"""
from __future__ import annotations

import re

import torch

from lpc.pipeline.errors import InputError

_VALID = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str | None) -> str:
    """`device` normalized ('cpu', 'cuda', 'cuda:1'), or InputError when unknown or unavailable."""
    d = str(device if device is not None else "cpu").strip().lower()
    if not _VALID.match(d):
        raise InputError(f"unknown device {device!r}", "use --device cpu, cuda or cuda:N")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"--device {d}: {why}", "use --device cpu, or install a CUDA build of torch on a GPU machine")
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {d}: only {torch.cuda.device_count()} CUDA device(s) are visible",
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return d
