"""Run a fused per-chunk kernel compiled (torch.compile, inductor C++ on CPU) or eagerly.

A kernel is a pure function of tensors whose first argument is a (rows, blocks, block) view
and whose outputs all have `rows` as their first dimension. Eagerly it runs over row chunks
(bounded temporaries); compiled it runs once over the whole tensor (inductor fuses the
element-wise math, so temporaries stay in registers). Both run the very same function, and the
compiled code keeps IEEE float32 semantics (no reassociation, no reciprocal tricks), so the
outputs are equal bit for bit; tests/formats/test_fast.py checks it.

A kernel may carry an `inductor_options` dict (inductor config for its compilation only).
Compilation costs seconds once per kernel, so only tensors of at least `MIN_NUMEL` elements
take the compiled path. Set LPC_COMPILE=0 to never compile. Any failure to compile (no C++
compiler, an unsupported platform) is logged once and that kernel stays eager from then on.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 21
CHUNK = 1 << 22                       # elements per eager chunk
_compiled: dict[Callable, Any] = {}   # kernel -> compiled callable, or None after a failure


def enabled() -> bool:
    """Whether compiled kernels may be used at all (LPC_COMPILE=0 turns them off)."""
    return os.environ.get("LPC_COMPILE", "1") != "0"


def run(kernel: Callable, xb: torch.Tensor, *args: Any, compiled: bool | None = None,
        chunk: int = CHUNK) -> tuple:
    """kernel(xb, *args) -> tuple of tensors with xb.shape[0] rows.

    compiled: True/False forces the path; None chooses compiled for large tensors.
    chunk: elements per eager chunk (smaller for kernels with wide temporaries).
    """
    if compiled is None:
        compiled = enabled() and xb.numel() >= MIN_NUMEL
    if compiled:
        out = _run_compiled(kernel, xb, *args)
        if out is not None:
            return out
    return run_eager(kernel, xb, *args, chunk=chunk)


def run_eager(kernel: Callable, xb: torch.Tensor, *args: Any, chunk: int = CHUNK) -> tuple:
    """The reference: the kernel over row chunks of about `chunk` elements, outputs concatenated."""
    per_row = max(1, xb[0].numel()) if xb.shape[0] else 1
    step = max(1, chunk // per_row)
    if xb.shape[0] <= step:
        return kernel(xb, *args)
    parts = [kernel(xb[i:i + step], *args) for i in range(0, xb.shape[0], step)]
    return tuple(torch.cat(p) for p in zip(*parts))


def worth_compiling(kernel: Callable, xb: torch.Tensor) -> bool:
    """Whether `run_compiled` should be tried: compiling is enabled, has not failed for this kernel,
    and the tensor is large (or the kernel is compiled already, so small tensors cost nothing more)."""
    state = _compiled.get(kernel, False)
    return enabled() and state is not None and (xb.numel() >= MIN_NUMEL or state is not False)


def run_compiled(kernel: Callable, xb: torch.Tensor, *args: Any) -> tuple | None:
    """kernel(xb, *args) compiled, once over the whole tensor; None if it cannot compile here.

    Unlike `run`, the other arguments may be per-row or per-block tensors too (their dimensions
    that match xb's are dynamic, like xb's); there is no eager fallback: the caller has its own.
    """
    return _run_compiled(kernel, xb, *args) if enabled() else None


def _run_compiled(kernel: Callable, xb: torch.Tensor, *args: Any) -> tuple | None:
    fn = _compiled.get(kernel, False)
    if fn is None:
        return None
    try:
        if fn is False:
            options = getattr(kernel, "inductor_options", None)
            fn = _compiled[kernel] = torch.compile(kernel, dynamic=False, fullgraph=True, options=options)
        # Rows and blocks vary between tensors; the block length stays a constant so that
        # inductor vectorizes along it.
        for dim in range(xb.ndim - 1):
            torch._dynamo.maybe_mark_dynamic(xb, dim)
            for a in args:  # per-row / per-block arguments vary with xb
                if isinstance(a, torch.Tensor) and a.ndim > dim + 1 and a.shape[dim] == xb.shape[dim] > 1:
                    torch._dynamo.maybe_mark_dynamic(a, dim)
        return fn(xb, *args)
    except Exception as err:  # any compiler failure: fall back for good, say so once
        log.warning("compiling %s failed (%s: %s); using the eager kernel",
                    getattr(kernel, "__name__", kernel), type(err).__name__, str(err)[:200])
        _compiled[kernel] = None
        return None
