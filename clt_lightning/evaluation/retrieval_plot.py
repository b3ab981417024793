"""The layer-wise retrieval grid (paper supplementary, Figures 4-5).

Rows are layers; the first column repeats the query on every row (with twelve layers the
last row is far from the first, and each row should read on its own), then the top-k
neighbours of that layer, each captioned with its rank, class and score. When the query's class is known, a
neighbour of the same class gets a green frame and any other class a red one, so the
depth-wise sharpening of the paper's figures reads at a glance.

Drawn with matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global state,
safe inside a training process.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from clt_lightning.files import atomic_write_bytes

if TYPE_CHECKING:  # only a type here: drawing needs no FAISS
    from clt_lightning.evaluation.retrieval_search import LayerNeighbours

log = logging.getLogger(__name__)

SCORE_NAMES = {"cosine": "cos", "ip": "ip", "l2": "L2²"}
SAME_CLASS, OTHER_CLASS, QUERY_FRAME = "#1a9850", "#d73027", "#2166ac"
CELL_INCHES = 1.7
TITLE_INCHES = 1.0


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 from a PIL image or an array (gray, RGB or RGBA; uint8 or [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array[..., :3]


def _show(ax: Axes, image: Image.Image | np.ndarray, frame: str | None) -> None:
    rgb = _as_rgb(image)
    # small images (digits are 8x8, CIFAR 32x32) stay crisp instead of turning to mush
    ax.imshow(rgb, interpolation="nearest" if max(rgb.shape[:2]) < 96 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(3)


def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _draw_neighbour(
    ax: Axes,
    dataset: Any,
    rank: int,
    image_id: int,
    label: int,
    score: float,
    query_label: str | None,
    score_name: str,
) -> None:
    if image_id < 0:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "—", ha="center", va="center", fontsize=14, transform=ax.transAxes)
        return
    names = list(getattr(dataset, "class_names", []))
    name = names[label] if 0 <= label < len(names) else str(label)
    frame = None if query_label is None else (SAME_CLASS if name == query_label else OTHER_CLASS)
    _show(ax, dataset.raw_image(image_id), frame)
    ax.set_title(
        f"#{rank} {_short(name)}\n{score_name} {score:.3f}",
        fontsize=8.5,
        color=frame or "black",
        pad=3,
    )


def _draw_query(ax: Axes, query_image: Image.Image | np.ndarray, query_label: str | None) -> None:
    _show(ax, query_image, QUERY_FRAME)
    caption = "query" if query_label is None else f"query\n{_short(query_label)}"
    ax.set_title(caption, fontsize=8.5, fontweight="bold", color=QUERY_FRAME, pad=3)


def _draw_row_label(ax: Axes, layer: int) -> None:
    ax.set_axis_off()
    ax.text(1.0, 0.5, f"layer {layer}", rotation=90, ha="right", va="center", fontsize=10.5,
            fontweight="bold", transform=ax.transAxes)  # fmt: skip


def retrieval_grid(
    query_image: Image.Image | np.ndarray,
    neighbours_per_layer: Sequence[LayerNeighbours],
    dataset: Any,
    path: str | Path,
    title: str,
    *,
    query_label: str | None = None,
    similarity: str = "cosine",
    query_row: int = 0,
    dpi: int = 150,
) -> Path:
    """Draw rows = layers, first column the query, then its top-k neighbours; write a PNG.

    Args:
        query_image: The untransformed query (PIL image or [H, W(, C)] array).
        neighbours_per_layer: From `RetrievalIndex.search` / `query_image`, one per layer,
            ids/scores/labels [Q, k].
        dataset: The indexed corpus: ``raw_image(id) -> PIL`` and ``class_names``.
        path: Where to write the PNG (written to a temp name, then renamed).
        title: Figure title (may hold a newline).
        query_label: The query's class name when known: neighbours of the same class get a
            green frame, others red.
        similarity: How scores read ("cosine", "ip": larger is closer; "l2": smaller).
        query_row: Which query of the batch to draw.
        dpi: Resolution of the PNG.

    Returns:
        ``path``.
    """
    n_rows = len(neighbours_per_layer)
    k = neighbours_per_layer[0].ids.shape[1]
    height = CELL_INCHES * 1.15 * n_rows + TITLE_INCHES
    figure = Figure(figsize=(CELL_INCHES * (k + 1.25) + 0.6, height))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        n_rows, k + 2, width_ratios=[1, 0.25] + [1] * k, hspace=0.42, wspace=0.08,
        top=1 - TITLE_INCHES / height, bottom=0.01, left=0.01, right=0.99,
    )  # fmt: skip
    score_name = SCORE_NAMES.get(similarity, similarity)
    for row, result in enumerate(neighbours_per_layer):
        _draw_query(figure.add_subplot(grid[row, 0]), query_image, query_label)
        _draw_row_label(figure.add_subplot(grid[row, 1]), result.layer)
        for rank in range(k):
            _draw_neighbour(
                figure.add_subplot(grid[row, rank + 2]), dataset, rank + 1,
                int(result.ids[query_row, rank]), int(result.labels[query_row, rank]),
                float(result.scores[query_row, rank]), query_label, score_name,
            )  # fmt: skip
    figure.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    path = atomic_write_bytes(path, buffer.getvalue())  # a full disk names the file
    log.info("wrote retrieval grid %s", path)
    return path
