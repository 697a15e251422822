"""PNG plots of precision allocation: the Pareto front, the map of high-precision blocks, the format
chosen per layer, and `plot_artifact` which picks the right one for an artifact directory.

Figures are drawn on matplotlib's Agg canvas (no pyplot, no display, no global backend switch)
and saved without the Software/date metadata, so the same inputs give byte-identical files.
Files are written atomically (temporary name, fsync, rename).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lpc.formats import get_format
from lpc.pipeline.errors import InputError

MAX_BINS = 64  # columns of the block map: input-block positions binned to at most this many


def plot_pareto(points: Sequence[Any], path: str | os.PathLike, chosen_budget: float | None = None) -> Path:
    """Bits per weight (x) against predicted loss increase (left axis) and measured loss increase
    (right axis), each point labelled with its budget; the plan made at `chosen_budget` is ringed.

    points: objects or mappings with `bits_per_weight`, `predicted_loss`, optionally
    `budget_bits_per_weight` and `measured_loss_increase` (or `measured_loss`, used as is when
    no increase is given; None = not measured), e.g. vapr's pareto.json points. Returns the PNG path.
    """
    rows = sorted((_field(p, "bits_per_weight"), _field(p, "predicted_loss"), _measured_increase(p),
                   _field(p, "budget_bits_per_weight", None)) for p in points)
    if not rows:
        raise InputError("plot_pareto got no points", "pass the solutions of pareto_front")
    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color="tab:blue", label="predicted")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("predicted loss increase", color="tab:blue")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.12)  # room for the budget labels
    for bits, pred, _, budget in rows:
        if budget is not None:
            ax.annotate(f"{budget:g}", (bits, pred), textcoords="offset points", xytext=(9, 7), fontsize=8,
                        color="tab:blue")
    handles = ax.get_lines()[:1]
    measured = [(r[0], r[2]) for r in rows if r[2] is not None]
    if measured:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*measured), "s--", color="tab:red", label="measured")
        ax2.set_ylabel("measured loss increase", color="tab:red")
    chosen = [r for r in rows if chosen_budget is not None and r[3] is not None and abs(r[3] - chosen_budget) < 1e-9]
    if chosen:
        handles += ax.plot([chosen[0][0]], [chosen[0][1]], "o", markersize=14, markerfacecolor="none",
                           markeredgecolor="black", markeredgewidth=1.5, label=f"chosen plan ({chosen_budget:g} bits)")
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title("precision allocation: Pareto front (labels: budget in bits per weight)")
    fig.tight_layout()
    return _save(fig, path)


def _measured_increase(point: Any) -> float | None:
    increase = _field(point, "measured_loss_increase", None)
    return increase if increase is not None else _field(point, "measured_loss", None)


def plot_formats(layers: Mapping[str, tuple[str, float]], path: str | os.PathLike,
                 budget: float | None = None) -> Path:
    """One horizontal bar per layer (bits per weight), coloured by the format chosen, with a legend
    (format: number of layers) and the budget as a dashed line. layers: name -> (format, bits)."""
    if not layers:
        raise InputError("plot_formats got no layers", "pass {layer: (format, bits)}")
    names = list(layers)
    formats = list(dict.fromkeys(layers[n][0] for n in names))
    colours = {f: f"C{i % 10}" for i, f in enumerate(formats)}
    fig = Figure(figsize=(8.0, _height(len(names))), dpi=100)
    ax = fig.add_subplot()
    for f in formats:
        idx = [i for i, n in enumerate(names) if layers[n][0] == f]
        ax.barh(idx, [float(layers[names[i]][1]) for i in idx], color=colours[f], label=f"{f} ({len(idx)})")
    if budget is not None:
        ax.axvline(float(budget), color="black", linestyle="--", linewidth=1.2, label=f"budget {budget:g} bits")
    ax.set_yticks(range(len(names)), names, fontsize=_fontsize(len(names)))
    ax.invert_yaxis()  # first layer on top, as in the heat map
    ax.set_xlabel("bits per weight")
    ax.set_title("format and bits per weight per layer")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="format (layers)")
    fig.tight_layout()
    return _save(fig, path)


def plot_artifact(directory: str | os.PathLike, manifest: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The picture of what an artifact decided, read from it: FGMP block masks (allocate or quantize
    artifact) as the heat map of blocks kept FP8; otherwise each layer's format and bits with the
    allocation budget (VaPr) when there is one."""
    masks = artifact_masks(Path(directory), manifest)
    if masks:
        return plot_precision_map(masks, path)
    layers = {}
    for name, rec in manifest.get("layers", {}).items():
        if isinstance(rec, dict) and rec.get("format"):
            bits = rec.get("bits_per_weight")
            layers[name] = (rec.get("label") or rec["format"], bits if bits is not None else _nominal_bits(rec))
    layers = {n: v for n, v in layers.items() if v[1] is not None}
    if not layers:
        raise InputError(f"{directory} holds no per-layer formats or masks to draw",
                         "give an allocate, quantize, compensate or lpc export artifact")
    return plot_formats(layers, path, budget=_budget(manifest))


def artifact_masks(directory: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """FGMP block masks, layer -> bool (R, nb): from an allocate artifact's masks.safetensors or from
    the packed `mask` field of fgmp layers in an lpc model directory; {} when there are none."""
    from lpc.pipeline.artifact.store import artifact_file, load_tensors

    layers = {n: r for n, r in manifest.get("layers", {}).items() if isinstance(r, dict) and r.get("format") == "fgmp"}
    if not layers:
        return {}
    if manifest.get("stage") == "allocate" and "masks.safetensors" in manifest.get("files", {}):
        tensors = load_tensors(artifact_file(directory, "masks.safetensors"))
        return {n: tensors[r["mask"]].bool() for n, r in layers.items() if r.get("mask") in tensors}
    if "model.safetensors" in manifest.get("files", {}) and (directory / "config.json").is_file():
        return _model_masks(directory)
    return {}


def _model_masks(directory: Path) -> dict[str, torch.Tensor]:
    from lpc.formats.numerics import unpack_bits
    from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors

    qconfig = read_qconfig(directory)
    if qconfig is None:
        return {}
    qtensors, _ = read_qtensors(directory, qconfig)
    out = {}
    for name, q in qtensors.items():
        if q.format == "fgmp" and "mask" in q.data:
            nb = -(-q.shape[-1] // get_format(q.format).block_width(**q.spec))
            out[name] = unpack_bits(q.data["mask"], 1, nb).bool()
    return out


def _nominal_bits(rec: Mapping[str, Any]) -> float | None:
    """Bits per weight of a plan entry that records none (a VaPr plan names only the format)."""
    from lpc.formats import get_format

    try:
        return float(get_format(rec["format"]).bits_per_weight(**(rec.get("spec") or {})))
    except Exception:  # a format whose bits depend on the data (masks, codebooks): not drawable
        return None


def _budget(manifest: Mapping[str, Any]) -> float | None:
    """The allocation budget in bits per weight, from the recipe an artifact was made with."""
    alloc = (manifest.get("recipe") or {}).get("allocate") or (manifest.get("config") or {}).get("allocate") or {}
    if (alloc.get("policy") or "vapr") != "vapr":
        return None
    return alloc.get("budget_bits")


def plot_precision_map(masks_or_bits_by_layer: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Where the high-precision blocks are, or how many bits each layer got.

    masks_or_bits_by_layer: layer -> bool (R, nb) FGMP mask (True = FP8), drawn as a heat map
    with one row per layer and columns = input-block position (binned to at most 64 columns),
    colour = fraction of that column's blocks kept high; or layer -> bits per weight (float),
    drawn as one horizontal bar per layer. Layers keep the mapping's order. Returns the PNG path.
    """
    if not masks_or_bits_by_layer:
        raise InputError("plot_precision_map got no layers", "pass {layer: mask} or {layer: bits}")
    values = list(masks_or_bits_by_layer.values())
    if all(isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.ndim == 2 for v in values):
        fig = _mask_figure(dict(masks_or_bits_by_layer))
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        fig = _bits_figure(dict(masks_or_bits_by_layer))
    else:
        raise InputError("plot_precision_map needs all values to be bool (R, nb) masks or all "
                         "numbers (bits per weight)", "do not mix masks and numbers in one plot")
    return _save(fig, path)


def block_position_profile(mask: torch.Tensor, bins: int) -> torch.Tensor:
    """mask bool (R, nb) -> float32 (bins,): fraction high over the rows and the input blocks
    falling in each of `bins` equal slices of the block positions (a slice narrower than one
    block takes the block it starts in)."""
    per_col = mask.to(torch.float32).mean(0)
    nb = per_col.numel()
    out = torch.empty(bins, dtype=torch.float32)
    for b in range(bins):
        lo = b * nb // bins
        hi = max((b + 1) * nb // bins, lo + 1)
        out[b] = per_col[lo:hi].mean()
    return out


def _mask_figure(masks: dict[str, torch.Tensor]) -> Figure:
    bins = min(MAX_BINS, max(m.shape[1] for m in masks.values()))
    image = torch.stack([block_position_profile(m.cpu(), bins) for m in masks.values()])
    labels = [f"{name}  ({m.float().mean().item():.2f})" for name, m in masks.items()]
    fig = Figure(figsize=(8.0, _height(len(masks))), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(image.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(labels)), labels, fontsize=_fontsize(len(labels)))
    ax.set_xlabel(f"input block position ({bins} bins)")
    ax.set_title("fraction of blocks kept high (FP8) per layer")
    fig.colorbar(im, ax=ax, label="fraction high")
    fig.tight_layout()
    return fig


def _bits_figure(bits: dict[str, float]) -> Figure:
    names = list(bits)
    fig = Figure(figsize=(8.0, _height(len(names))), dpi=100)
    ax = fig.add_subplot()
    ax.barh(range(len(names)), [float(bits[n]) for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=_fontsize(len(names)))
    ax.invert_yaxis()  # first layer on top, as in the heat map
    ax.set_xlabel("bits per weight")
    ax.set_title("bits per weight per layer")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _height(n_layers: int) -> float:
    return min(60.0, max(3.0, 1.5 + 0.18 * n_layers))


def _fontsize(n_layers: int) -> float:
    return 8.0 if n_layers <= 60 else 5.0


def _field(point: Any, name: str, *default: Any) -> Any:
    if isinstance(point, Mapping):
        if name in point:
            return point[name]
    elif hasattr(point, name):
        return getattr(point, name)
    if default:
        return default[0]
    raise InputError(f"a Pareto point has no '{name}'",
                     "pass knapsack.Solution objects or dicts with bits_per_weight and predicted_loss")


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Render to PNG bytes without metadata, then write atomically."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", metadata={"Software": None})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
