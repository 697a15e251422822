"""`lpc inspect` and `lpc verify`: read what an artifact holds, and check it is sound."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.artifact import store as art
from lpc.pipeline.errors import ArtifactError


def inspect_artifact(path: Path, plot: Path | None = None) -> dict[str, Any]:
    """Per-layer format, shape, bits, errors (and rank) from an artifact's manifest.

    For a compensate artifact each row also has `rank`, `method` and `rel_output_error_before`
    (the relative output error of the quantized weight alone; `rel_output_error` is with the path)."""
    m = art.read_manifest(path)
    rows = []
    for name, rec in sorted(m.get("layers", {}).items()):
        if not isinstance(rec, dict):
            continue
        rows.append({"layer": name, "format": rec.get("format", rec.get("policy", "-")),
                     "shape": "x".join(str(d) for d in rec.get("shape", [])) or "-",
                     "bits": rec.get("bits_per_weight"), "sqnr_db": rec.get("sqnr_db"),
                     "rel_output_error": rec.get("rel_output_error"), "rank": rec.get("rank"),
                     # compensate artifacts: the error before the low-rank path (rel_output_error is after)
                     "rel_output_error_before": rec.get("rel_output_error_before"), "method": rec.get("method"),
                     "high_fraction": rec.get("high_fraction")})
    info = {"stage": m.get("stage"), "bits_per_weight": m.get("bits_per_weight", m.get("summary", {}).get("bits_per_weight")),
            "summary": m.get("summary", {}), "layers": rows, "has_rank": any(r["rank"] is not None for r in rows)}
    if plot is not None:
        from lpc.pipeline.artifact.plots import plot_artifact
        plot_artifact(path, m, plot)
        info["plot"] = str(plot)
    return info


def verify_artifact(path: Path) -> dict[str, Any]:
    """Raise ArtifactError on the first problem: hashes, missing tensors, NaN/inf, zero scales, shapes."""
    from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors

    m = art.read_manifest(path)
    problems = art.verify_files(path, m)
    if problems:
        raise ArtifactError(f"{path}: {problems[0]}", "the artifact was changed or damaged; re-create it")
    qconfig = read_qconfig(path) if (Path(path) / "config.json").is_file() else None
    layers = 0
    if qconfig is None:
        from lpc.pipeline.artifact.verify_exports import verify_export

        checked = verify_export(Path(path), m)
        if checked is not None:
            return {"ok": True, "files": len(m.get("files", {})), "stage": m.get("stage"), **checked}
    if qconfig is not None:
        qtensors, plain = read_qtensors(Path(path), qconfig)
        for name, q in qtensors.items():
            from lpc.formats import get_format
            w = get_format(q.format).dequantize(q)
            if tuple(w.shape) != tuple(q.shape) or not torch.isfinite(w).all():
                raise ArtifactError(f"{path}: layer {name} does not dequantize to a finite {tuple(q.shape)} tensor")
        _check_fused(path, qtensors, qconfig)
        for k, t in plain.items():
            if t.is_floating_point() and not torch.isfinite(t.float()).all():
                raise ArtifactError(f"{path}: tensor {k} holds NaN or inf", "the artifact is broken; re-create it")
        layers = len(qtensors)
    return {"ok": True, "files": len(m.get("files", {})), "layers": layers, "stage": m.get("stage")}


# Artifacts written before quantize recorded its groups were quantized with the schema's default.
LEGACY_FUSE_GROUPS = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]


def recorded_fuse_groups(qconfig: dict[str, Any]) -> list[list[str]]:
    """The sibling groups quantize shared global scales over (quantization_config.fuse_groups)."""
    groups = qconfig.get("fuse_groups")
    return LEGACY_FUSE_GROUPS if groups is None else [list(g) for g in groups]


def _check_fused(path: Path, qtensors: dict[str, Any], qconfig: dict[str, Any]) -> None:
    """Fused siblings (q/k/v, gate/up) of one global-scale format must share the global scale."""
    from lpc.pipeline.io.models import fuse_groups

    groups = fuse_groups(list(qtensors), recorded_fuse_groups(qconfig))
    for group in groups:
        scales = [qtensors[n].data.get("global_scale") for n in group if qtensors[n].format == qtensors[group[0]].format]
        scales = [s for s in scales if s is not None]
        if len(scales) > 1 and any(not torch.equal(scales[0], s) for s in scales[1:]):
            raise ArtifactError(f"{path}: fused layers {group} have different global scales",
                                "engines fuse them; re-quantize with lpc (it shares them)")
