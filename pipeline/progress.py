"""Progress reporting without a UI dependency: the library calls a callback, the CLI draws it.

    def progress(task: str, done: int, total: int | None) -> None: ...

`done == 0` opens a task, `done == total` closes it. `NO_PROGRESS` ignores everything.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

Progress = Callable[[str, int, "int | None"], None]
T = TypeVar("T")


def NO_PROGRESS(task: str, done: int, total: int | None) -> None:  # noqa: N802 - a constant
    return None


def track(items: Iterable[T], task: str, progress: Progress | None, total: int | None = None) -> Iterator[T]:
    """Iterate `items`, reporting each step to `progress` under the name `task`."""
    progress = progress or NO_PROGRESS
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    progress(task, 0, total)
    done = 0
    for item in items:
        yield item
        done += 1
        progress(task, done, total)
    if total is None:
        progress(task, done, done)
