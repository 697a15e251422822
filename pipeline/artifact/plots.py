"""PNG plots of precision allocation: the Pareto front and the map of high-precision blocks.

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

from lpc.pipeline.errors import InputError

MAX_BINS = 64  # columns of the block map: input-block positions binned to at most this many


def plot_pareto(points: Sequence[Any], path: str | os.PathLike) -> Path:
    """Bits per weight (x) against predicted loss (left axis) and measured loss (right axis).

    points: objects or mappings with `bits_per_weight`, `predicted_loss` and optionally
    `measured_loss` (None = not measured), e.g. `knapsack.Solution`. Returns the PNG path.
    """
    rows = sorted((_field(p, "bits_per_weight"), _field(p, "predicted_loss"),
                   _field(p, "measured_loss", None)) for p in points)
    if not rows:
        raise InputError("plot_pareto got no points", "pass the solutions of pareto_front")
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color="tab:blue", label="predicted")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("predicted loss increase", color="tab:blue")
    ax.grid(True, alpha=0.3)
    measured = [(r[0], r[2]) for r in rows if r[2] is not None]
    if measured:
        ax2 = ax.twinx()
        ax2.plot(*zip(*measured), "s--", color="tab:red", label="measured")
        ax2.set_ylabel("measured loss increase", color="tab:red")
    ax.set_title("precision allocation: Pareto front")
    fig.tight_layout()
    return _save(fig, path)


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
