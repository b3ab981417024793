"""Figures: written as valid PNGs, masked triangle, colour scale, panels, curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.cascade import CascadeResult
from clt_lightning.evaluation.plots import (
    BIAS_AXES_LABEL,
    HEATMAP_AXES_LABEL,
    cascade_plot,
    contribution_heatmaps,
    masked_triangle,
    reconstruction_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores_table(n_layers: int) -> torch.Tensor:
    table = torch.rand(n_layers + 1, n_layers, dtype=torch.float64)
    table[:n_layers] = torch.triu(table[:n_layers])
    return table / table.sum(dim=0)  # columns sum to 1 with the bias row


def check_png(path, min_side: int = 300) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_side <= width <= 6000 and min_side <= height <= 6000
    return width, height


def axes_by_label(fig, label):
    return [ax for ax in fig.axes if ax.get_label() == label]


@pytest.mark.parametrize("n_layers", [3, 12])
def test_heatmap_masks_lower_triangle_and_writes_png(tmp_path, n_layers):
    table = scores_table(n_layers)
    path = tmp_path / "heat.png"
    fig = contribution_heatmaps({"CLS": table}, path)
    check_png(path)
    (ax,) = axes_by_label(fig, HEATMAP_AXES_LABEL)
    data = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    below = np.tril(np.ones((n_layers, n_layers), dtype=bool), k=-1)
    assert np.isnan(data[below]).all()
    np.testing.assert_allclose(data[~below], table[:n_layers].numpy()[~below])
    assert ax.images[0].get_clim() == (-1.0, 1.0)
    assert ax.images[0].get_cmap().name.startswith("RdBu")
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == n_layers * (n_layers + 1) // 2
    assert f"{table[0, 0].item():.3f}" in texts
    assert ax.get_xlabel() == "target layer ℓ" and ax.get_ylabel() == "source layer s"
    (bias_ax,) = axes_by_label(fig, BIAS_AXES_LABEL)
    np.testing.assert_allclose(bias_ax.images[0].get_array()[0], table[n_layers].numpy())
    assert any("contribution" in ax.get_ylabel() for ax in fig.axes)  # the colour bar


def test_heatmap_without_bias_and_two_panels(tmp_path):
    fig = contribution_heatmaps({"no bias": scores_table(4)[:4]})
    assert not axes_by_label(fig, BIAS_AXES_LABEL)
    fig = contribution_heatmaps({"hidden bias": scores_table(4)}, show_bias=False)
    assert not axes_by_label(fig, BIAS_AXES_LABEL)
    path = tmp_path / "two.png"
    fig = contribution_heatmaps(
        {"CLS": scores_table(4), "Patches": scores_table(4)}, path, title="JumpReLU"
    )
    width, height = check_png(path)
    assert width > height  # panels side by side
    panels = axes_by_label(fig, HEATMAP_AXES_LABEL)
    assert [ax.get_title() for ax in panels] == ["CLS", "Patches"]
    assert len(axes_by_label(fig, BIAS_AXES_LABEL)) == 2


def test_masked_triangle_rejects_bad_shapes():
    with pytest.raises(ConfigError, match=r"\[L, L\]"):
        masked_triangle(np.zeros((5, 3)))
    assert np.isnan(masked_triangle(np.zeros((3, 3)))[2, 0])


def test_reconstruction_curves(tmp_path):
    runs = {
        name: {
            "cosine": torch.linspace(0.9, 0.97, 12),
            "mse": torch.logspace(-3, -2, 12),
            "r2": np.linspace(0.8, 0.95, 12),
            "l0": torch.full((12,), 128.0),
        }
        for name in ("JumpReLU", "ReLU-TopK", "Abs-TopK")
    }
    path = tmp_path / "curves.png"
    fig = reconstruction_curves(runs, path, "CIFAR-100, ViT-B/32")
    check_png(path)
    cosine_ax, mse_ax, r2_ax = fig.axes
    assert mse_ax.get_yscale() == "log" and cosine_ax.get_yscale() == "linear"
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3]
    np.testing.assert_allclose(r2_ax.lines[0].get_ydata(), runs["JumpReLU"]["r2"])
    assert all(ax.get_xlabel() == "layer" for ax in fig.axes)
    legend = [t.get_text() for t in cosine_ax.get_legend().get_texts()]
    assert legend == ["JumpReLU", "ReLU-TopK", "Abs-TopK"]
    with pytest.raises(ConfigError, match="lacks metric 'mse'"):
        reconstruction_curves({"x": {"cosine": [1.0], "r2": [1.0]}})


def test_cascade_plot(tmp_path):
    result = CascadeResult(
        n_layers=4,
        starts=[0, 1, 2, 3],
        modes=["cls", "patches", "all"],
        n_images=10,
        baseline={"top1": 60.0, "top5": 80.0},
        accuracy={
            m: {"top1": [50.0 + i, 55.0, 58.0, 60.0], "top5": [70.0, 75.0, 78.0, 80.0]}
            for i, m in enumerate(["cls", "patches", "all"])
        },
    )
    path = tmp_path / "cascade.png"
    fig = cascade_plot(result, path)
    check_png(path)
    (ax,) = fig.axes
    assert len(ax.lines) == 4  # three modes + baseline
    assert list(ax.lines[1].get_ydata()) == result.accuracy["patches"]["top1"]
    assert list(ax.lines[-1].get_ydata()) == [60.0, 60.0]
    assert "accuracy" in ax.get_ylabel()
