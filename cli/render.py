"""Rendering for the CLI: progress from the library's callback, library logging, tables, errors.

On a terminal progress is drawn as rich bars and log records print above them through the same
console. When stderr is not a terminal (CI logs, `2>&1 | tee log`) progress becomes plain lines,
one when a task starts, at most one per `LPC_PROGRESS_INTERVAL` seconds (default 5) while it runs,
and one when it ends:

    lpc: quantize 3/14 (21%) elapsed 0:00:04 eta 0:00:15
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out_console = Console()
INTERVAL_ENV = "LPC_PROGRESS_INTERVAL"


class RichProgress:
    """Adapts `progress(task, done, total)` callbacks to a rich progress display (on stderr)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "RichProgress":
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._progress.stop()

    def __call__(self, task: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if task not in self._tasks or done == 0:
            if task in self._tasks:
                self._progress.remove_task(self._tasks[task])
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=done, total=total)


class LineProgress:
    """Progress as plain lines for logs: start, every `interval` seconds at most per task, end."""

    def __init__(self, write: Callable[[str], None] | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._write = write or _stderr_line
        self.interval = _interval() if interval is None else interval
        self._clock = clock
        self._start: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __call__(self, task: str, done: int, total: int | None) -> None:
        now = self._clock()
        if done == 0 or task not in self._start:
            self._start[task], self._last[task] = now, now
            self._write(f"lpc: {task} started" + (f" ({total} steps)" if total else ""))
            if done == 0:
                return
        finished = total is not None and done >= total
        if not finished and now - self._last[task] < self.interval:
            return
        self._last[task] = now
        self._write(progress_line(task, done, total, now - self._start[task]) + (" done" if finished else ""))


def progress_line(task: str, done: int, total: int | None, elapsed: float) -> str:
    """`lpc: <task> i/N (p%) elapsed h:mm:ss eta h:mm:ss` (no total: `step i`, no eta)."""
    if not total:
        return f"lpc: {task} step {done} elapsed {_clock_text(elapsed)}"
    eta = elapsed / done * (total - done) if done else None
    return (f"lpc: {task} {done}/{total} ({100 * done // total}%) elapsed {_clock_text(elapsed)}"
            + (f" eta {_clock_text(eta)}" if eta is not None and done < total else ""))


def progress(enabled: bool = True) -> RichProgress | LineProgress:
    """Bars on a terminal (unless disabled, e.g. by --json), plain lines otherwise."""
    return RichProgress(enabled) if console.is_terminal else LineProgress()


def setup_logging(debug: bool) -> None:
    """Send lpc's log records to stderr: through the rich console on a terminal (so they print above
    the progress bars), as plain `warning: name: message` lines otherwise."""
    logger = logging.getLogger("lpc")
    for h in [h for h in logger.handlers if getattr(h, "lpc_cli", False)]:
        logger.removeHandler(h)
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=debug,
                                               rich_tracebacks=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    handler.lpc_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "5")))
    except ValueError:
        return 5.0


def _clock_text(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table on stdout; when stdout is not a terminal, nothing is cut (the full width is used)."""
    t = table(title, columns, rows)
    if out_console.is_terminal:
        out_console.print(t)
    else:
        for col in t.columns:
            col.no_wrap, col.overflow = True, "ignore"
        wide = out_console.options.update_width(1 << 16)  # measure unconstrained by the 80-column default
        width = max(t.__rich_measure__(out_console, wide).maximum, out_console.width)
        Console(width=width).print(t)  # Console.print clamps its width= to the console's own width


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def error(message: str, hint: str | None = None) -> None:
    text = f"[bold red]error:[/] {escape(message)}"
    if hint:
        text += f" [dim]({escape(hint)})[/]"
    console.print(text, soft_wrap=True, highlight=False)


def escape(s: str) -> str:
    from rich.markup import escape as _escape
    return _escape(str(s))
