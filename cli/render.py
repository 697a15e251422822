"""Rich rendering for the CLI: progress bars from the library's callback, tables, errors."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
out_console = Console()


class RichProgress:
    """Adapts `progress(task, done, total)` callbacks to a rich progress display (on stderr)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=True)
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
