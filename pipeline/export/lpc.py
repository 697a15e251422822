"""`--format lpc`: the packed artifact as it is (every format and mix), its files hard-linked (the same
bytes stored once; copied byte for byte where the filesystem cannot link)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lpc.pipeline.artifact import store as art
from lpc.pipeline.export.registry import EXPORTERS


def write_lpc(src: Path, tmp: Path) -> dict[str, Any]:
    for name in sorted(art.read_manifest(src)["files"]):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(art.artifact_file(src, name), art.artifact_file(tmp, name))
    return {}


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link of src (no second copy of the weights), else a byte copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


EXPORTERS.add("lpc", write_lpc)
