"""Ctrl-C during an import is held until the import finishes (cli/interrupt.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    from lpc.cli import interrupt

    interrupt.install()
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        import slowmod  # busy for 1 s at import: the interrupt arrives in the middle
        time.sleep(5)
        print("not interrupted")
    except KeyboardInterrupt:
        mod = sys.modules.get("slowmod")
        print("interrupted after import", mod is not None and getattr(mod, "done", False))
    print("pending after", interrupt.finish())
""")

# busy at import for 1 s, and on until the interrupt has arrived (a loaded machine may deliver it late)
SLOW = ("import time\nfrom lpc.cli import interrupt\nt = time.time()\n"
        "while time.time() - t < 1.0 or (not interrupt._pending and time.time() - t < 30):\n    pass\ndone = True\n")


def test_interrupt_during_import_waits_for_the_import_to_finish(tmp_path):
    (tmp_path / "slowmod.py").write_text(SLOW)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "interrupted after import True" in out.stdout, out.stdout + out.stderr
    assert "pending after False" in out.stdout


def test_an_interrupt_still_pending_when_deferring_stops_is_reported(tmp_path):
    """A command made only of imports ends with its interrupt pending: finish() says so, raises nothing."""
    (tmp_path / "slowmod.py").write_text(SLOW + "PENDING = interrupt.finish()\n")
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("time.sleep(5)", "print(slowmod.PENDING)"),
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["True", "not interrupted"], out.stdout + out.stderr
