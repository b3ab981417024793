"""Figures drawn from what the evaluation callbacks logged during `clt fit`.

- `training_curves`: for the quickstart report, how cascaded top-1 (window 0→L-1) and the
  mean R² moved over the epochs, one line per run, from each run's `metrics.csv`.
- `dashboard_figure`: a picture of the W&B dashboard of one run (docs/dashboards.md),
  drawn from the run's logged data: the scalars of `metrics.csv` (`eval/...` keys, the
  same numbers W&B gets) and the last Tables and figure images of its offline W&B run
  (`wandb/offline-run-*/files/media`).

Usage: `python -m experiments.logged_figures --run runs/quickstart/relu_topk --out
docs/figures/dashboard.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.ticker import MaxNLocator

from clt_lightning.evaluation.plots import save_figure

MODES = ("cls", "patches", "all")
MODE_NAMES = {"cls": "[CLS] only", "patches": "patches only", "all": "all tokens"}


def eval_history(run_dir: Path, prefix: str = "eval") -> list[dict[str, float]]:
    """The rows of `<run>/metrics.csv` written by the per-epoch evaluation, by epoch.

    Args:
        run_dir: The run folder.
        prefix: "eval" (per epoch) or "eval_full" (fit end).

    Returns:
        One {key: value} per evaluation, keys under `prefix/`, sorted by epoch; [] when
        the run has no log or no evaluation.
    """
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        if row.get(f"{prefix}/epoch") not in (None, ""):
            out.append(
                {
                    k: float(v)
                    for k, v in row.items()
                    if k.startswith(f"{prefix}/") and v not in ("", None)
                }
            )
    return sorted(out, key=lambda r: r[f"{prefix}/epoch"])


def _series(rows: Sequence[Mapping[str, float]], key: str) -> list[float]:
    return [r.get(key, float("nan")) for r in rows]


def _n_layers(row: Mapping[str, float]) -> int:
    layers = [int(m.group(1)) for k in row if (m := re.search(r"/start_(\d+)$", k))]
    return max(layers) + 1


def training_curves(histories: Mapping[str, list[dict[str, float]]], path: Path | None) -> Figure:
    """Cascaded top-1 of the full window per token mode, and mean R², against the epoch.

    Args:
        histories: Run label -> `eval_history(...)`.
        path: PNG to write, or None.

    Returns:
        The figure (four panels; one line per run, the teacher's baseline dashed).
    """
    fig = Figure(figsize=(16, 3.8), layout="constrained")
    axes = fig.subplots(1, 4)
    for name, rows in histories.items():
        if not rows:
            continue
        epochs = [int(r["eval/epoch"]) + 1 for r in rows]
        (line,) = axes[0].plot(epochs, _series(rows, "eval/cascade_top1/cls/start_00"), "o-")
        line.set_label(name)
        for ax, mode in zip(axes[1:3], ("patches", "all"), strict=True):
            ax.plot(epochs, _series(rows, f"eval/cascade_top1/{mode}/start_00"), "o-", label=name)
        baseline = _series(rows, "eval/baseline_top1")
        for ax in axes[:3]:
            ax.plot(epochs, baseline, "--", color=line.get_color(), alpha=0.5)
        axes[3].plot(epochs, _series(rows, "eval/reconstruction/r2/all/mean"), "o-", label=name)
    for ax, mode in zip(axes[:3], MODES, strict=True):
        ax.set(title=f"Top-1, {MODE_NAMES[mode]} replaced 0→L-1", ylabel="top-1 (%)")
    axes[3].set(title="Mean R² over layers (all tokens)", ylabel="R²")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="dashed: baseline", title_fontsize=8)
    fig.suptitle("During training: evaluation callback on a fixed subset of val images")
    return save_figure(fig, path)


def _latest_media(run_dir: Path, pattern: str) -> Path | None:
    """The file of the highest step among `wandb/offline-run-*/files/media/<pattern>`."""
    step = re.compile(r"_(\d+)_[0-9a-f]+\.")
    files = sorted(run_dir.glob(f"wandb/offline-run-*/files/media/{pattern}"))
    files = [f for f in files if step.search(f.name)]
    return max(files, key=lambda f: int(step.search(f.name).group(1))) if files else None


def _line_panel(
    ax, xs, series: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str
):
    for name, values in series.items():
        ax.plot(xs, values, "o-" if name != "baseline" else "--", label=name, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _table_panel(ax, table_file: Path | None) -> None:
    ax.axis("off")
    ax.set_title("eval/table/faithfulness (W&B Table, last epoch)")
    if table_file is None:
        return
    table = json.loads(table_file.read_text())
    columns = ["window", "mode", "delta_acc", "flip_rate", "kl", "cosine", "cka"]
    index = [table["columns"].index(c) for c in columns]
    cells = [[_cell(row[i]) for i in index] for row in table["data"]]
    drawn = ax.table(cellText=cells, colLabels=columns, loc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(7)
    drawn.scale(1.0, 1.3)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else str(value)


def dashboard_figure(run_dir: Path, path: Path | None) -> Figure:
    """A picture of one run's W&B dashboard, drawn from its logged data.

    Args:
        run_dir: A run folder written by `clt fit` with the evaluation callback.
        path: PNG to write, or None.

    Returns:
        The figure: six panels named by their W&B keys.

    Raises:
        FileNotFoundError: The run has no per-epoch evaluation in its metrics.csv.
    """
    rows = eval_history(run_dir)
    if not rows:
        raise FileNotFoundError(f"no eval/ rows in {run_dir / 'metrics.csv'}")
    last, n_layers = rows[-1], _n_layers(rows[-1])
    epochs = [int(r["eval/epoch"]) + 1 for r in rows]
    fig = Figure(figsize=(18, 10), layout="constrained")
    axes = fig.subplots(2, 3)
    starts = list(range(n_layers))
    series = {m: [last[f"eval/cascade_top1/{m}/start_{s:02d}"] for s in starts] for m in MODES}
    series["baseline"] = [last["eval/baseline_top1"]] * n_layers
    _line_panel(
        axes[0, 0],
        starts,
        series,
        "eval/chart/cascade_top1 (last epoch)",
        "start layer s (layers s→L-1 replaced)",
        "top-1 (%)",
    )
    over_time = {MODE_NAMES[m]: _series(rows, f"eval/cascade_top1/{m}/start_00") for m in MODES}
    over_time["baseline"] = _series(rows, "eval/baseline_top1")
    _line_panel(
        axes[0, 1],
        epochs,
        over_time,
        "eval/cascade_top1/<mode>/start_00 over training",
        "epoch",
        "top-1 (%)",
    )
    layers = list(range(n_layers))
    r2 = {
        e: [rows[i][f"eval/reconstruction/r2/all/layer_{n:02d}"] for n in layers]
        for i, e in enumerate(epochs)
    }
    _line_panel(
        axes[0, 2],
        layers,
        {f"epoch {e}": v for e, v in r2.items()},
        "eval/chart/r2: R² per layer, all tokens, each epoch",
        "layer",
        "R²",
    )
    sparsity = {
        "L0 (all tokens)": [last[f"eval/reconstruction/l0/all/layer_{n:02d}"] for n in layers],
    }
    _line_panel(
        axes[1, 0],
        layers,
        sparsity,
        "eval/reconstruction/l0/all/layer_XX (last epoch)",
        "layer",
        "active latents per token",
    )
    dead = axes[1, 0].twinx()
    dead.bar(layers, [last[f"eval/dead_fraction/layer_{n:02d}"] for n in layers], alpha=0.25)
    dead.set_ylabel("dead fraction (bars, eval/dead_fraction/layer_XX)")
    image = _latest_media(run_dir, "images/eval/figure/contributions_*.png")
    axes[1, 1].axis("off")
    axes[1, 1].set_title("eval/figure/contributions (W&B image, last epoch)")
    if image is not None:
        axes[1, 1].imshow(np.asarray(imread(image)))
    _table_panel(axes[1, 2], _latest_media(run_dir, "table/eval/table/faithfulness_*.table.json"))
    fig.suptitle(f"W&B dashboard of {run_dir.name}: the eval/ panels (docs/dashboards.md)")
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder written by clt fit")
    parser.add_argument("--out", required=True, help="PNG to write")
    opts = parser.parse_args(argv)
    dashboard_figure(Path(opts.run), Path(opts.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
