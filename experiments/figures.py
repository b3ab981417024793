"""Figures of the paper's supplementary material, drawn from our runs.

- Figures 6-10: reconstruction (cosine / MSE, log scale / R^2) across layers per
  (dataset, backbone), one line per sparsifier.
- Figures 11-16: contribution scores C[s, l], rows [CLS] and patches, one column per sparsifier.
- Cascaded replacement top-1 against the paper's Tables 6-23 (ours solid, paper dashed).

Single-run and single-row figures go through `clt_lightning.evaluation.plots`
(`contribution_heatmaps`, `reconstruction_curves`) when the package has them, so that training-time and report
figures look alike; otherwise the minimal versions here are used. The multi-panel layouts
exist only here. Figures are built with `matplotlib.figure.Figure` (no pyplot), so no
global backend is touched.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

RECONSTRUCTION_PANELS: tuple[tuple[str, str], ...] = (
    ("cosine", "cosine similarity"),
    ("mse", "MSE per token (log)"),
    ("r2", "R² (variance explained)"),
)
MODE_TITLES: dict[str, str] = {"cls": "[CLS]", "patches": "patches", "all": "all tokens"}
_ANNOTATE_MAX_LAYERS = 16


def _package_plots() -> ModuleType | None:
    try:
        return importlib.import_module("clt_lightning.evaluation.plots")
    except ImportError:
        return None


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def reconstruction_figure(
    curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str
) -> Path:
    """Figures 6-10: cosine, MSE (log) and R² across layers, one line per run.

    Args:
        curves: Legend label -> {"cosine", "mse", "r2"} -> one value per layer.
        path: PNG to write.
        title: Figure title.

    Returns:
        The written path.
    """
    plots = _package_plots()
    if plots is not None and hasattr(plots, "reconstruction_curves"):
        plots.reconstruction_curves(
            {name: dict(c) for name, c in curves.items()}, path=path, title=title
        )
        return Path(path)
    fig = Figure(figsize=(14, 4), layout="constrained")
    axes = fig.subplots(1, len(RECONSTRUCTION_PANELS))
    for ax, (metric, label) in zip(axes, RECONSTRUCTION_PANELS, strict=True):
        for name, curve in curves.items():
            values = np.asarray(curve[metric], dtype=float)
            ax.plot(np.arange(len(values)), values, marker="o", label=name)
        if metric == "mse":
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    return _save(fig, path)


def _draw_heatmap(fig: Figure, ax: Axes, scores: np.ndarray, title: str) -> None:
    """C[s, l] with sources as rows (bias last when there are L + 1 rows), targets as columns."""
    n_rows, n_layers = scores.shape
    sources, targets = np.indices(scores.shape)
    masked = np.ma.masked_where((sources > targets) & (sources < n_layers), scores)
    image = ax.imshow(masked, cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(n_layers))
    ax.set_yticks(range(n_rows))
    labels = [str(s) for s in range(n_layers)] + (["bias"] if n_rows > n_layers else [])
    ax.set_yticklabels(labels)
    ax.set_xlabel("target layer l")
    ax.set_ylabel("source layer s")
    ax.set_title(title)
    if n_layers <= _ANNOTATE_MAX_LAYERS:
        hidden = np.ma.getmaskarray(masked)
        fontsize = float(np.clip(60 / n_layers, 5, 10))
        for (s, t), value in np.ndenumerate(scores):
            if not hidden[s, t]:
                ax.text(t, s, f"{value:.3f}", ha="center", va="center", fontsize=fontsize)
    fig.colorbar(image, ax=ax, label="contribution C[s, l]")


def contribution_figure(
    scores: Mapping[str, Sequence[Sequence[float]]], title: str, path: str | Path
) -> Path:
    """One run's contribution heatmaps, token groups side by side.

    Args:
        scores: Token group (`cls`, `patches`) -> C [L + 1, L] (bias row last) or [L, L].
        title: Figure title.
        path: PNG to write.

    Returns:
        The written path.
    """
    plots = _package_plots()
    if plots is not None and hasattr(plots, "contribution_heatmaps"):
        panels = {MODE_TITLES.get(m, m): np.asarray(v, dtype=float) for m, v in scores.items()}
        plots.contribution_heatmaps(panels, path=path, title=title)
        return Path(path)
    return contribution_grid_figure({"": scores}, path, title)


def contribution_grid_figure(
    grid: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: str | Path, title: str
) -> Path:
    """Figures 11-16: rows are token groups ([CLS], patches), columns are sparsifiers.

    Args:
        grid: Column label (sparsifier) -> token group (`cls`, `patches`) -> C [L + 1, L].
        path: PNG to write.
        title: Figure title.

    Returns:
        The written path.
    """
    columns = list(grid)
    modes = [m for m in ("cls", "patches") if any(m in grid[c] for c in columns)]
    fig = Figure(figsize=(7 * len(columns), 6 * len(modes)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(modes), len(columns), squeeze=False))
    for row, mode in enumerate(modes):
        for col, label in enumerate(columns):
            ax = axes[row, col]
            if mode not in grid[label]:
                ax.set_axis_off()
                ax.set_title(_panel_title(label, mode) + ": missing")
                continue
            scores = np.asarray(grid[label][mode], dtype=float)
            _draw_heatmap(fig, ax, scores, _panel_title(label, mode))
    fig.suptitle(title)
    return _save(fig, path)


def _panel_title(label: str, mode: str) -> str:
    return ", ".join(part for part in (label, MODE_TITLES.get(mode, mode)) if part)


def cascade_figure(
    ours: Mapping[str, Mapping[str, Mapping[int, float]]],
    paper: Mapping[str, Mapping[str, Sequence[float]]],
    baselines: tuple[float | None, float | None],
    path: str | Path,
    title: str,
) -> Path:
    """Cascaded replacement top-1 by start layer: ours (solid) against the paper (dashed).

    Args:
        ours: Token mode -> sparsifier label -> {start: top-1 %}.
        paper: Token mode -> sparsifier label -> top-1 % for starts 0..L-1.
        baselines: (paper baseline, our baseline), drawn as horizontal lines when known.
        path: PNG to write.
        title: Figure title.

    Returns:
        The written path.
    """
    modes = ("cls", "patches", "all")
    fig = Figure(figsize=(15, 4), layout="constrained")
    axes = fig.subplots(1, len(modes), sharey=True)
    labels = list(
        dict.fromkeys(label for m in modes for label in [*paper.get(m, {}), *ours.get(m, {})])
    )
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    for ax, mode in zip(axes, modes, strict=True):
        for label, values in paper.get(mode, {}).items():
            ax.plot(range(len(values)), values, "--", color=colours[label], label=f"paper {label}")
        for label, points in ours.get(mode, {}).items():
            starts = sorted(points)
            ax.plot(
                starts,
                [points[s] for s in starts],
                "-o",
                color=colours[label],
                label=f"ours {label}",
            )
        for value, style, name in zip(baselines, (":", "-."), ("paper", "ours"), strict=True):
            if value is not None:
                ax.axhline(value, color="grey", linestyle=style, label=f"{name} baseline")
        ax.set_xlabel("first replaced layer s (s → L-1)")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)
