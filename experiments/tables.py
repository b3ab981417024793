"""Gather finished runs into the paper's tables and figures, beside the published numbers.

    python -m experiments.tables --runs runs/sweep --out reports/paper_tables

writes into `--out`:

- `paper_tables.md`: a summary of where we stand per run, then baselines, Tables 6-23
  (cascaded replacement, one per dataset x backbone x token mode), Table 5 (faithfulness),
  the poster's necessity/sufficiency ablation, layer-averaged reconstruction and the
  poster's contribution values, each as "paper | ours | Δ" (Δ = ours - paper, in the
  table's unit; |Δ| > 1 point of accuracy in bold). Blank cells: no run / no number.
- `csv/*.csv`: the same tables, one file each, raw numbers, plus `cascade_long.csv`
  (one row per dataset, backbone, mode, sparsifier and start: easiest to analyse).
- `figures/*.png`: cascaded top-1 (ours against the paper), reconstruction across layers
  (Figures 6-10) and contribution heatmaps (Figures 11-16, and one per run and token group).

Runs are read with `experiments.results` (folder contract in its docstring); the paper's
numbers come from `experiments.paper_numbers`. Runs outside the paper's grid (say a
`digits` quickstart run or a `batch_topk` sparsifier) get tables of their own, ours only.
The tables themselves are built in `experiments.paper_tables` (each a
`experiments.comparison_table.Table`); this module draws the figures, writes the files and
is the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clt_lightning.files import atomic_write_text
from experiments import figures
from experiments import paper_numbers as pn
from experiments.comparison_table import BOLD_ABOVE_POINTS, Table
from experiments.paper_tables import (
    all_tables,
    cascade_long_table,
    pairs,
    setting_title,
    sparsifier_label,
)
from experiments.results import LoadedRuns, RunResult, load_runs

log = logging.getLogger(__name__)

REPORT_NAME = "paper_tables.md"


def write_figures(loaded: LoadedRuns, out_dir: Path) -> list[Path]:
    """Cascade, reconstruction and contribution figures for every pair / run that has data."""
    written: list[Path] = []
    folder = out_dir / "figures"
    for dataset, backbone in pairs(loaded):
        runs = [r for r in loaded.runs if (r.dataset, r.backbone) == (dataset, backbone)]
        if not runs:
            continue
        setting, stem = setting_title(dataset, backbone), f"{dataset}_{backbone}"
        written += _cascade_figure(runs, folder / f"cascade_{stem}.png", setting)
        curves = {
            sparsifier_label(r.sparsifier): r.reconstruction["all"]
            for r in runs
            if {"cosine", "mse", "r2"} <= set((r.reconstruction or {}).get("all") or {})
        }
        if curves:
            path, title = folder / f"reconstruction_{stem}.png", f"Reconstruction: {setting}"
            written.append(figures.reconstruction_figure(curves, path, title))
        written += _contribution_figures(runs, folder, setting, stem)
    return written


def _cascade_figure(runs: list[RunResult], path: Path, setting: str) -> list[Path]:
    """Ours against the paper for one (dataset, backbone); nothing when no run has a cascade."""
    dataset, backbone = runs[0].dataset, runs[0].backbone
    ours = {
        m: {sparsifier_label(r.sparsifier): r.top1(m) for r in runs if r.top1(m)} for m in pn.MODES
    }
    if not any(ours.values()):
        return []
    paper: dict[str, dict[str, list[float]]] = {m: {} for m in pn.MODES}
    for mode in pn.MODES:
        for name in pn.SPARSIFIERS:
            column = pn.paper_top1(dataset, backbone, mode, name)
            if column:
                paper[mode][sparsifier_label(name)] = list(column)
    our_baselines = [b for b in (r.baseline_top1() for r in runs) if b is not None]
    baselines = (
        pn.BASELINE_TOP1.get((dataset, backbone)),
        float(np.mean(our_baselines)) if our_baselines else None,
    )
    title = f"Cascaded replacement: {setting}"
    return [figures.cascade_figure(ours, paper, baselines, path, title)]


def _contribution_figures(
    runs: list[RunResult], folder: Path, setting: str, stem: str
) -> list[Path]:
    grid = {
        sparsifier_label(r.sparsifier): {
            m: r.contributions[m] for m in ("cls", "patches") if r.contributions.get(m)
        }
        for r in runs
        if r.contributions
    }
    if not grid:
        return []
    written = [
        figures.contribution_grid_figure(
            grid, folder / f"contributions_{stem}.png", f"Contribution scores C[s, l]: {setting}"
        )
    ]
    for run in runs:
        scores = {
            m: run.contributions[m] for m in ("cls", "patches") if (run.contributions or {}).get(m)
        }
        if scores:
            path = folder / f"contributions_{run.name}.png"
            written.append(figures.contribution_figure(scores, f"{run.name}: C[s, l]", path))
    return written


def render_report(
    loaded: LoadedRuns,
    runs_dir: Path,
    sections: list[tuple[str, list[Table]]],
    figure_paths: Sequence[Path],
    out_dir: Path,
) -> str:
    """The Markdown report: header, every section, figures, and any problems found."""
    lines = [
        "# clt-lightning against the paper",
        "",
        f"Runs read from `{runs_dir}`: {len(loaded.runs)} "
        f"({', '.join(r.name for r in loaded.runs) or 'none'}).",
        "",
        f"Δ = ours - paper; |Δ| > {BOLD_ABOVE_POINTS:g} point of top-1 in **bold**; "
        "blank cells: no run (ours) or no published number (paper). CSV files: `csv/`.",
        "",
    ]
    for heading, tables in sections:
        lines += [f"## {heading}", ""]
        lines += [table.to_markdown() for table in tables]
    if figure_paths:
        lines += ["## Figures", ""]
        for path in figure_paths:
            lines += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})", ""]
    if loaded.problems:
        lines += ["## Problems", "", *(f"- {p}" for p in loaded.problems), ""]
    return "\n".join(lines)


def build_report(runs_dir: str | Path, out_dir: str | Path, with_figures: bool = True) -> Path:
    """Read the runs, write the report, the CSVs and the figures; return the report's path.

    Args:
        runs_dir: Folder of run folders.
        out_dir: Output folder (created).
        with_figures: Also draw the PNG figures.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    loaded = load_runs(runs_dir)
    sections = all_tables(loaded)
    for _, tables in sections:
        for table in tables:
            atomic_write_text(out_dir / "csv" / f"{table.slug}.csv", table.to_csv())
    atomic_write_text(out_dir / "csv" / "cascade_long.csv", cascade_long_table(loaded).to_csv())
    figure_paths = write_figures(loaded, out_dir) if with_figures else []
    report = render_report(loaded, runs_dir, sections, figure_paths, out_dir)
    return atomic_write_text(out_dir / REPORT_NAME, report)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m experiments.tables --runs DIR --out DIR [--no-figures]`."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tables", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", default="runs/sweep", help="folder of run folders")
    parser.add_argument("--out", default="reports/paper_tables", help="output folder")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = build_report(args.runs, args.out, with_figures=not args.no_figures)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
