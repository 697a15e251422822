"""Ctrl-C that never lands inside an import.

A KeyboardInterrupt raised while Python is importing a module leaves that module half-initialized
in `sys.modules`, and libraries that import optional dependencies inside `try/except` keep going
with it: numpy then fails with "cannot load module more than once" or recurses in its module
`__getattr__`, and the run dies with a traceback and exit 1 instead of the clean exit 130. So the
`lpc` command defers an interrupt that arrives during an import until the import has finished
(checked every 50 ms with SIGALRM), and only then raises KeyboardInterrupt, where the command's
own handlers clean up unfinished outputs. A third Ctrl-C while one is pending exits at once
(an import that never returns must not make the command unkillable). A command that is all
imports (`lpc formats`) can finish while its interrupt is still pending: `finish()` says so, and
the command then exits 130 as if it had been interrupted.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

RECHECK_S = 0.05
_pending = 0


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _deliver(frame: FrameType | None) -> None:
    global _pending
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    _pending = 0
    raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending += 1
    if _pending >= 3:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    _deliver(frame)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _pending:
        _deliver(frame)


def _supported() -> bool:
    """Main thread only (where Python runs signal handlers), on a platform with interval timers."""
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


def install() -> None:
    """Route SIGINT through the import check."""
    if not _supported():
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, _on_sigint)


def finish() -> bool:
    """Stop deferring (timer off, Python's own SIGINT handler back); True if an interrupt was pending."""
    global _pending
    if not _supported():
        return False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    was, _pending = _pending, 0
    return bool(was)
