"""Figures: contribution heatmaps, reconstruction curves, cascaded-replacement accuracy.

Layouts follow the paper's supplementary figures: contribution heatmaps (Figures 11-16)
with rows = source layer s, columns = target layer l, the lower triangle (s > l) empty,
a fixed RdBu scale from -1 to 1 and every cell annotated to 3 decimals; reconstruction
curves (Figures 6-10) as three panels (cosine, MSE on a log scale, R^2) with one line per
run; the cascade as accuracy against the first replaced layer, one line per token mode.

Design decisions: matplotlib's object API (`Figure` + Agg canvas), never pyplot, so no
global state and no GUI backend inside a training process; every function returns its
`Figure` (tests inspect the drawn data) and writes a PNG atomically when given a path.
Each function here is self-contained (other figures live in their own functions/modules).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from mpl_toolkits.axes_grid1 import make_axes_locatable

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.undefined import Undefined
from clt_lightning.files import atomic_write_bytes

logger = logging.getLogger(__name__)

DPI = 150
HEATMAP_AXES_LABEL = "contributions"
"""`Axes.get_label()` of a heatmap's main (source x target) panel."""
BIAS_AXES_LABEL = "bias"
"""`Axes.get_label()` of a heatmap's separate bias row."""
RECONSTRUCTION_METRICS = (
    ("cosine", "cosine similarity", "linear"),
    ("mse", "MSE per element (log scale)", "log"),
    ("r2", "variance explained R²", "linear"),
)


def save_figure(fig: Figure, path: str | Path | None) -> Figure:
    """Write `fig` as a PNG (dpi 150, tight bounding box) atomically, if `path` is given.

    Args:
        fig: The figure.
        path: Destination .png, or None to skip writing.

    Returns:
        The same figure.
    """
    if path is not None:
        buffer = io.BytesIO()
        FigureCanvasAgg(fig)
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        atomic_write_bytes(path, buffer.getvalue())
        logger.info("figure written to %s", path)
    return fig


def _as_array(values: Any) -> np.ndarray:
    """float64 array; undefined entries (`Undefined`, None: JSON null) become NaN, which
    matplotlib leaves out of a line or a heatmap."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    if isinstance(values, list | tuple):
        values = [_as_array(v) if isinstance(v, list | tuple) else v for v in values]
        values = [np.nan if v is None or isinstance(v, Undefined) else v for v in values]
    return np.asarray(values, dtype=np.float64)


def masked_triangle(scores: Any) -> np.ndarray:
    """Source rows of a score table with the empty triangle (s > l) set to NaN.

    Args:
        scores: [L, L] or [L + 1, L] (row L = bias, dropped here).

    Returns:
        [L, L] float64.
    """
    table = _as_array(scores)
    n_layers = table.shape[1]
    if table.ndim != 2 or table.shape[0] not in (n_layers, n_layers + 1):
        raise ConfigError(f"contribution scores must be [L, L] or [L+1, L], got {table.shape}")
    data = table[:n_layers].copy()
    data[np.tril(np.ones((n_layers, n_layers), dtype=bool), k=-1)] = np.nan
    return data


def _annotate(ax: Axes, data: np.ndarray, fontsize: float) -> None:
    for (row, col), value in np.ndenumerate(data):
        if np.isfinite(value):
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=fontsize,
                    color=color)  # fmt: skip


def _heatmap_panel(ax: Axes, scores: Any, title: str, show_bias: bool) -> AxesImage:
    """Draw one heatmap onto `ax`, with its bias row as a strip attached underneath."""
    data = masked_triangle(scores)
    n_layers = data.shape[1]
    fontsize = float(np.clip(84 / n_layers, 4, 10))
    cmap = mpl.colormaps["RdBu"].with_extremes(bad="white")
    image = ax.imshow(data, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    _annotate(ax, data, fontsize)
    ax.set_label(HEATMAP_AXES_LABEL)
    ax.set_xticks(range(n_layers))
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=max(fontsize, 6))
    ax.set_xlabel("target layer ℓ")
    ax.set_ylabel("source layer s")
    ax.set_title(title)
    table = _as_array(scores)
    if show_bias and table.shape[0] == n_layers + 1:
        # same width as the heatmap, one cell high, a gap to set it apart from the sources
        bias_ax = make_axes_locatable(ax).append_axes("bottom", size=f"{100 / n_layers}%", pad=0.6)
        bias = table[n_layers : n_layers + 1]
        bias_ax.imshow(bias, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
        _annotate(bias_ax, bias, fontsize)
        bias_ax.set_label(BIAS_AXES_LABEL)
        bias_ax.set_yticks([0], ["bias"])
        bias_ax.set_xticks(range(n_layers))
        bias_ax.tick_params(labelsize=max(fontsize, 6))
    return image


def contribution_heatmaps(
    panels: Mapping[str, Any],
    path: str | Path | None = None,
    title: str | None = None,
    show_bias: bool = True,
) -> Figure:
    """Side-by-side contribution heatmaps (e.g. {"CLS": ..., "Patches": ...}), one colour bar.

    Args:
        panels: Panel title -> scores [L, L] or [L + 1, L] (row L = bias).
        path: PNG to write, or None.
        title: Figure title.
        show_bias: Draw the bias row (when present) as a separate strip under each panel.

    Returns:
        The figure; each panel's main axes has label `HEATMAP_AXES_LABEL`, each bias strip
        `BIAS_AXES_LABEL`.
    """
    if not panels:
        raise ConfigError("contribution_heatmaps needs at least one panel")
    n_layers = _as_array(next(iter(panels.values()))).shape[1]
    side = max(4.0, 0.55 * n_layers + 1.5)
    fig = Figure(figsize=(side * len(panels) + 1.0, side + (0.8 if show_bias else 0.0)))
    grid = fig.add_gridspec(1, len(panels) + 1, width_ratios=[1.0] * len(panels) + [0.04])
    image = None
    for i, (name, table) in enumerate(panels.items()):
        image = _heatmap_panel(fig.add_subplot(grid[0, i]), table, name, show_bias)
    fig.colorbar(image, cax=fig.add_subplot(grid[0, -1]), label="contribution C[s, ℓ]")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def reconstruction_curves(
    runs: Mapping[str, Mapping[str, Any]], path: str | Path | None = None, title: str = ""
) -> Figure:
    """Per-layer reconstruction quality: cosine, MSE (log), R², one line per run.

    Args:
        runs: Run name (e.g. sparsifier) -> {"cosine": [L], "mse": [L], "r2": [L]}
            (`ReconstructionMetrics.compute()` output works as is).
        path: PNG to write, or None.
        title: Figure title.

    Returns:
        The figure (three axes, in the order cosine, MSE, R²).
    """
    if not runs:
        raise ConfigError("reconstruction_curves needs at least one run")
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (metric, label, scale) in zip(axes, RECONSTRUCTION_METRICS, strict=True):
        for name, metrics in runs.items():
            if metric not in metrics:
                raise ConfigError(f"run {name!r} lacks metric {metric!r} (has {sorted(metrics)})")
            values = _as_array(metrics[metric])
            ax.plot(np.arange(len(values)), values, marker="o", markersize=4, label=name)
        ax.set_yscale(scale)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def cascade_plot(
    result: Any, path: str | Path | None = None, title: str | None = None, metric: str = "top1"
) -> Figure:
    """Accuracy against the first replaced layer s (window s→L-1), one line per token mode.

    Args:
        result: A `CascadeResult`.
        path: PNG to write, or None.
        title: Axes title.
        metric: "top1" or "top5".

    Returns:
        The figure (one axes; the baseline is a dashed horizontal line).
    """
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    starts: Sequence[int] = result.starts
    for mode in result.modes:
        ax.plot(starts, result.accuracy[mode][metric], marker="o", label=mode, zorder=2)
    # drawn under the modes: a mode at the teacher's accuracy stays visible on it
    ax.axhline(result.baseline[metric], color="black", linestyle="--", label="baseline",
               zorder=1)  # fmt: skip
    ax.set_xticks(list(starts))
    ax.set_xlabel(f"first replaced layer s (window s→{result.n_layers - 1})")
    ax.set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy (%)")
    ax.set_title(title or f"cascaded replacement ({result.n_images} images)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the data
    fig.tight_layout()
    return save_figure(fig, path)
