"""`--format lpc`: the packed artifact as it is (every format and mix), its files copied byte for byte."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lpc.pipeline.artifact import store as art
from lpc.pipeline.export.registry import EXPORTERS


def write_lpc(src: Path, tmp: Path) -> dict[str, Any]:
    for name in sorted(art.read_manifest(src)["files"]):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(src) / name, tmp / name)
    return {}


EXPORTERS.add("lpc", write_lpc)
