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
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clt_lightning.files import atomic_write_text
from experiments import figures
from experiments import paper_numbers as pn
from experiments.results import LoadedRuns, RunResult, load_runs

log = logging.getLogger(__name__)

Cell = float | int | str | None
DELTA = "Δ"
BOLD_ABOVE_POINTS = 1.0
REPORT_NAME = "paper_tables.md"


@dataclass
class Table:
    """A table to write as Markdown and CSV.

    Attributes:
        title: Heading in the Markdown report.
        slug: CSV file name (without `.csv`).
        columns: Column names; a name ending in "Δ" is a signed difference (ours - paper).
        rows: Cells; None is blank.
        digits: Decimals for float cells in Markdown (CSV keeps the raw numbers).
        column_digits: Per-column exceptions to `digits`.
        bold_above: |Δ| above which a Δ cell is bold (None: never).
        note: A line under the table.
    """

    title: str
    slug: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    digits: int = 2
    column_digits: dict[str, int] = field(default_factory=dict)
    bold_above: float | None = BOLD_ABOVE_POINTS
    note: str = ""

    def to_markdown(self) -> str:
        """The table as a Markdown section (heading, table, note)."""
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(_escape(c) for c in self.columns) + " |")
        lines.append("|" + "|".join(["---"] + ["--:"] * (len(self.columns) - 1)) + "|")
        for row in self.rows:
            cells = [self._format(col, value) for col, value in zip(self.columns, row, strict=True)]
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def _format(self, column: str, value: Cell) -> str:
        if value is None:
            return ""
        if not isinstance(value, float):
            return str(value)
        digits = self.column_digits.get(column, self.digits)
        if not column.endswith(DELTA):
            return f"{value:.{digits}f}"
        text = f"{value:+.{digits}f}"
        bold = self.bold_above is not None and abs(value) > self.bold_above
        return f"**{text}**" if bold else text

    def to_csv(self) -> str:
        """The table as CSV text, raw numbers (floats rounded to 6 decimals), blanks for None."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(
                ["" if v is None else round(v, 6) if isinstance(v, float) else v for v in row]
            )
        return buffer.getvalue()


def _escape(text: str) -> str:
    """A Markdown table cell: a literal "|" would end the cell."""
    return text.replace("|", "\\|")


def _delta(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _label(sparsifier: str) -> str:
    return pn.SPARSIFIER_ABBREVIATIONS.get(sparsifier, sparsifier)


def _setting(dataset: str, backbone: str) -> str:
    return f"{pn.DATASET_NAMES.get(dataset, dataset)}, {pn.BACKBONE_NAMES.get(backbone, backbone)}"


def pairs(loaded: LoadedRuns) -> list[tuple[str, str]]:
    """(dataset, backbone) pairs: the paper's six in table order, then any others we ran."""
    paper = [(d, b) for d in pn.DATASETS for b in pn.BACKBONES]
    extra = sorted({(r.dataset, r.backbone) for r in loaded.runs} - set(paper))
    return paper + extra


def sparsifiers_of(loaded: LoadedRuns, dataset: str, backbone: str) -> list[str]:
    """Columns of a pair's tables: the paper's three sparsifiers (for the paper's pairs) and
    every other one we ran, in the order JR, RTK, ATK, then by name."""
    ran = {r.sparsifier for r in loaded.runs if (r.dataset, r.backbone) == (dataset, backbone)}
    if (dataset, backbone) in pn.BASELINE_TOP1:
        ran |= set(pn.SPARSIFIERS)
    return sorted(ran, key=lambda name: (_sparsifier_order(name), name))


def _n_rows(dataset: str, backbone: str, runs: Sequence[RunResult | None]) -> int:
    """Rows of a cascade table: the paper's 12, or the most layers any of our runs has."""
    sizes = [pn.N_LAYERS] if pn.cascade_table(dataset, backbone, "cls") else []
    for run in runs:
        if run is not None:
            starts = [s for mode in pn.MODES for s in run.top1(mode)]
            sizes.append(max([run.n_layers() or 0, *(s + 1 for s in starts)]))
    return max(sizes, default=0)


def cascade_table(loaded: LoadedRuns, dataset: str, backbone: str, mode: str) -> Table:
    """One of Tables 6-23: rows "s→L-1" and a baseline row; paper | ours | Δ per sparsifier.

    Args:
        loaded: Our runs.
        dataset: Dataset name.
        backbone: Backbone name.
        mode: Token mode (`cls`, `patches`, `all`).
    """
    paper_table = pn.cascade_table(dataset, backbone, mode)
    names = sparsifiers_of(loaded, dataset, backbone)
    runs = [loaded.get(dataset, backbone, name) for name in names]
    papers = [pn.paper_top1(dataset, backbone, mode, name) for name in names]
    n_rows = _n_rows(dataset, backbone, runs)
    columns = ["range"]
    for name, paper in zip(names, papers, strict=True):
        label = _label(name)
        columns += (
            [f"{label} paper", f"{label} ours", f"{label} {DELTA}"] if paper else [f"{label} ours"]
        )
    paper_baseline = pn.BASELINE_TOP1.get((dataset, backbone))
    rows: list[list[Cell]] = []
    for start in [*range(n_rows), None]:  # None: the baseline row
        row: list[Cell] = ["baseline" if start is None else f"{start}→{n_rows - 1}"]
        for paper_column, run in zip(papers, runs, strict=True):
            if start is None:
                ours, paper = (run.baseline_top1() if run else None), paper_baseline
            else:
                ours = run.top1(mode).get(start) if run else None
                paper = _at(paper_column or (), start)
            row += [paper, ours, _delta(ours, paper)] if paper_column else [ours]
        rows.append(row)
    number = f"Table {paper_table.number}. " if paper_table else ""
    return Table(
        title=f"{number}{_setting(dataset, backbone)}, {pn.MODE_NAMES.get(mode, mode)}",
        slug=f"cascade_{dataset}_{backbone}_{mode}",
        columns=columns,
        rows=rows,
        note="Top-1 (%) after replacing layers s..L-1 by the CLT; Δ = ours - paper.",
    )


def cascade_long_table(loaded: LoadedRuns) -> Table:
    """Every cascade cell as one row (dataset, backbone, mode, sparsifier, start): for analysis."""
    table = Table(
        title="Cascaded replacement, long format",
        slug="cascade_long",
        columns=["dataset", "backbone", "mode", "sparsifier", "start", "paper", "ours", DELTA],
    )
    for dataset, backbone in pairs(loaded):
        for name in sparsifiers_of(loaded, dataset, backbone):
            run = loaded.get(dataset, backbone, name)
            for mode in pn.MODES:
                paper = pn.paper_top1(dataset, backbone, mode, name) or ()
                ours = run.top1(mode) if run else {}
                for start in sorted(set(range(len(paper))) | set(ours)):
                    p = paper[start] if start < len(paper) else None
                    o = ours.get(start)
                    table.rows.append([dataset, backbone, mode, name, start, p, o, _delta(o, p)])
    return table


def baseline_table(loaded: LoadedRuns) -> Table:
    """Frozen CLIP zero-shot top-1 per (dataset, backbone): paper vs ours (mean over runs)."""
    table = Table(
        title="Baselines (frozen CLIP zero-shot top-1, %)",
        slug="baselines",
        columns=["dataset", "backbone", "paper", "ours", DELTA, "ours min-max", "runs"],
        note="Ours: mean over the runs of the pair (they share the teacher and images).",
    )
    for dataset, backbone in pairs(loaded):
        runs = [r for r in loaded.runs if (r.dataset, r.backbone) == (dataset, backbone)]
        values = [v for v in (r.baseline_top1() for r in runs) if v is not None]
        ours = float(np.mean(values)) if values else None
        paper = pn.BASELINE_TOP1.get((dataset, backbone))
        spread = f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else None
        table.rows.append([dataset, backbone, paper, ours, _delta(ours, paper), spread, len(runs)])
    return table


def _run_deltas(run: RunResult, mode: str) -> list[tuple[int, float]]:
    paper = pn.paper_top1(run.dataset, run.backbone, mode, run.sparsifier) or ()
    return [(s, v - paper[s]) for s, v in sorted(run.top1(mode).items()) if s < len(paper)]


def summary_table(loaded: LoadedRuns) -> Table:
    """Where we stand: one row per run, mean |Δ| per token mode, the worst cell, what is missing."""
    table = Table(
        title="Per run: difference from Tables 6-23 (points of top-1)",
        slug="summary",
        columns=[
            "run",
            "images",
            f"baseline {DELTA}",
            "cls: mean abs diff",
            "patches: mean abs diff",
            "all: mean abs diff",
            f"worst {DELTA}",
            "worst at",
            f"cells off by >{BOLD_ABOVE_POINTS:g}",
            "missing",
        ],
        note="Mean abs diff: mean over the 12 starts of |ours - paper|. Blank: no paper numbers "
        "(setting outside the paper's grid) or no cascade.json. Missing: evaluation files absent.",
    )
    for run in loaded.runs:
        row: list[Cell] = [run.name, run.n_images]
        row.append(_delta(run.baseline_top1(), pn.BASELINE_TOP1.get((run.dataset, run.backbone))))
        every: list[tuple[str, int, float]] = []
        for mode in pn.MODES:
            deltas = _run_deltas(run, mode)
            every += [(mode, s, d) for s, d in deltas]
            row.append(float(np.mean([abs(d) for _, d in deltas])) if deltas else None)
        worst = max(every, key=lambda item: abs(item[2]), default=None)
        if worst is None:
            row += [None, None]
        else:
            row += [worst[2], f"{worst[0]} {worst[1]}→{pn.N_LAYERS - 1}"]
        row.append(sum(abs(d) > BOLD_ABOVE_POINTS for _, _, d in every) if every else None)
        missing = [
            name
            for name in ("cascade", "faithfulness", "contributions", "reconstruction", "ablations")
            if getattr(run, name) is None
        ]
        row.append(", ".join(missing) or "-")
        table.rows.append(row)
    return table


def faithfulness_table(loaded: LoadedRuns) -> Table:
    """Table 5: the paper's rows (CIFAR-100, ViT-B/32), each followed by our matching rows."""
    metrics = list(pn.FAITHFULNESS_METRICS)
    table = Table(
        title="Table 5. Faithfulness of the CLT surrogate",
        slug="faithfulness",
        columns=["window", "tokens", "source", *metrics],
        digits=3,
        column_digits={"delta_acc": 2, "flip_pct": 1, "top1_agreement": 1, "top5_agreement": 1},
        bold_above=None,
        note="Paper: CIFAR-100, ViT-B/32 (sparsifier not stated). flip_pct in %, delta_acc in "
        "points, agreements in %. Our rows for other settings follow, ours only.",
    )
    ours = [(run, row) for run in loaded.runs for row in (run.faithfulness or {}).get("rows", [])]
    used: set[int] = set()
    for paper in pn.FAITHFULNESS:
        table.rows.append([paper["window"], paper["mode"], "paper", *(paper[m] for m in metrics)])
        for i, (run, row) in enumerate(ours):
            same_setting = (run.dataset, run.backbone) == pn.FAITHFULNESS_SETTING
            same_window = (row.get("start"), row.get("mode")) == (paper["start"], paper["mode"])
            if same_setting and same_window:
                table.rows.append(_our_faithfulness_row(run, row, metrics))
                used.add(i)
    for i, (run, row) in enumerate(ours):
        if i not in used:
            table.rows.append(_our_faithfulness_row(run, row, metrics))
    return table


def _our_faithfulness_row(run: RunResult, row: dict, metrics: list[str]) -> list[Cell]:
    values = dict(row)
    if values.get("flip_rate") is not None:
        values["flip_pct"] = 100.0 * float(values["flip_rate"])
    cells = [None if values.get(m) is None else float(values[m]) for m in metrics]
    return [row.get("window"), row.get("mode"), f"ours {run.name}", *cells]


def ablation_table(loaded: LoadedRuns) -> Table:
    """Poster necessity / sufficiency: drop the top-1 source layer, keep the top-k."""
    table = Table(
        title="Necessity and sufficiency (poster, ViT-B/32)",
        slug="ablations",
        columns=[
            "dataset",
            "backbone",
            "tokens",
            "run",
            "baseline paper",
            "baseline ours",
            "drop top-1 paper",
            "drop top-1 ours",
            f"drop {DELTA}",
            "keep top-k paper",
            "keep top-k ours",
            f"keep {DELTA}",
            "k ours",
            "all sources ours",
            "ranking ours",
        ],
        note=f"Paper keeps the top-{pn.ABLATION_K} source layers; `k ours` is ours. "
        "Ranking: source layers by C[s, L-1], descending.",
    )
    ours = [(run, row) for run in loaded.runs for row in (run.ablations or {}).get("rows", [])]
    done: set[int] = set()
    for paper in pn.ABLATIONS:
        matches = [
            (i, run, row)
            for i, (run, row) in enumerate(ours)
            if (run.dataset, run.backbone, row.get("mode"))
            == (paper.dataset, paper.backbone, paper.mode)
        ]
        for i, run, row in matches or [(-1, None, None)]:
            table.rows.append(_ablation_row(paper, run, row))
            done.add(i)
    for i, (run, row) in enumerate(ours):
        if i not in done:
            table.rows.append(_ablation_row(None, run, row))
    return table


def _ablation_row(
    paper: pn.AblationRow | None, run: RunResult | None, row: dict | None
) -> list[Cell]:
    ours = row or {}

    def value(key: str) -> float | None:
        return None if ours.get(key) is None else float(ours[key])

    source = paper or run
    k = (run.ablations or {}).get("k") if run else None
    ranking = " ".join(str(s) for s in ours.get("ranking", [])) or None
    return [
        source.dataset,
        source.backbone,
        paper.mode if paper else ours.get("mode"),
        run.name if run else None,
        paper.baseline if paper else None,
        value("baseline"),
        paper.drop_top1 if paper else None,
        value("drop_top1"),
        _delta(value("drop_top1"), paper.drop_top1 if paper else None),
        paper.keep_topk if paper else None,
        value("keep_topk"),
        _delta(value("keep_topk"), paper.keep_topk if paper else None),
        k,
        value("all_sources"),
        ranking,
    ]


def reconstruction_table(loaded: LoadedRuns) -> Table:
    """Reconstruction averaged over layers (all tokens): poster values vs ours."""
    table = Table(
        title="Reconstruction averaged over layers (all tokens)",
        slug="reconstruction",
        columns=[
            "dataset",
            "backbone",
            "sparsifier",
            "MSE paper",
            "MSE ours",
            "R² paper",
            "R² ours",
            f"R² {DELTA}",
            "cos paper",
            "cos ours",
            f"cos {DELTA}",
        ],
        digits=4,
        bold_above=0.05,
        note="Paper values were read off a plot (~2 significant digits). MSE depends on the "
        "activation scale, so compare it within a setting. |Δ| > 0.05 in bold.",
    )
    keys = set(pn.RECONSTRUCTION_AVERAGES) | {r.key for r in loaded.runs if r.reconstruction}
    order = {pair: i for i, pair in enumerate(pairs(loaded))}
    for key in sorted(keys, key=lambda k: (order.get(k[:2], 99), _sparsifier_order(k[2]))):
        paper = pn.RECONSTRUCTION_AVERAGES.get(key, (None, None, None))
        run = loaded.get(*key)
        curves = ((run.reconstruction or {}).get("all") or {}) if run else {}
        ours = [
            float(np.mean(curves[m])) if curves.get(m) else None for m in ("mse", "r2", "cosine")
        ]
        table.rows.append(
            [
                *key,
                paper[0],
                ours[0],
                paper[1],
                ours[1],
                _delta(ours[1], paper[1]),
                paper[2],
                ours[2],
                _delta(ours[2], paper[2]),
            ]
        )
    return table


def _sparsifier_order(name: str) -> int:
    return pn.SPARSIFIERS.index(name) if name in pn.SPARSIFIERS else len(pn.SPARSIFIERS)


def _last_target(scores: np.ndarray) -> tuple[list[float], float | None]:
    """C[s, L-1] for sources s = 0..L-1, and the bias row's value (None without a bias row)."""
    if scores.ndim != 2 or scores.size == 0:
        return [], None
    n_layers = scores.shape[1]
    bias = float(scores[n_layers, -1]) if scores.shape[0] > n_layers else None
    return [float(v) for v in scores[:n_layers, -1]], bias


def _diagonal(scores: np.ndarray) -> list[float]:
    if scores.ndim != 2 or scores.size == 0:
        return []
    return [float(scores[layer, layer]) for layer in range(scores.shape[1])]


def _at(values: Sequence[float], index: int) -> float | None:
    return values[index] if index < len(values) else None


def contribution_tables(loaded: LoadedRuns) -> list[Table]:
    """The poster's [CLS] last-target column and patch diagonal, beside ours for every run."""
    runs = [r for r in loaded.runs if r.contributions]
    last = [_last_target(np.asarray(r.contributions.get("cls", []), float)) for r in runs]
    diagonals = [_diagonal(np.asarray(r.contributions.get("patches", []), float)) for r in runs]
    n_layers = max([pn.N_LAYERS, *(len(s) for s, _ in last), *(len(d) for d in diagonals)])
    cls_rows: list[list[Cell]] = [
        [str(s), _at(pn.CLS_LAST_TARGET_CONTRIBUTIONS, s), *(_at(c, s) for c, _ in last)]
        for s in range(n_layers)
    ]
    cls_rows.append(["bias", None, *(bias for _, bias in last)])
    diagonal_rows: list[list[Cell]] = [
        [layer, _at(pn.PATCHES_DIAGONAL_CONTRIBUTIONS, layer), *(_at(d, layer) for d in diagonals)]
        for layer in range(n_layers)
    ]
    names = [r.name for r in runs]
    return [
        Table(
            title="[CLS]: contribution of each source layer to the last target layer",
            slug="contributions_cls_last_target",
            columns=["source", "poster", *names],
            rows=cls_rows,
            digits=3,
            bold_above=None,
            note="Poster: setting not stated (its baselines are ViT-B/32); its column sums to 1 "
            "without a bias row. Ours: C[s, L-1], the bias as its own row.",
        ),
        Table(
            title="Patches: diagonal C[l, l]",
            slug="contributions_patches_diagonal",
            columns=["layer", "poster", *names],
            rows=diagonal_rows,
            digits=3,
            bold_above=None,
            note="Poster: 11 values printed for 12 layers, listed in order from layer 0 "
            "(which cells they are is not stated).",
        ),
    ]


def all_tables(loaded: LoadedRuns) -> list[tuple[str, list[Table]]]:
    """Every table of the report, in sections."""
    cascade = [cascade_table(loaded, d, b, m) for d, b in pairs(loaded) for m in pn.MODES]
    return [
        ("Where we stand", [summary_table(loaded)]),
        ("Baselines", [baseline_table(loaded)]),
        ("Cascaded replacement (Tables 6-23)", cascade),
        ("Faithfulness (Table 5)", [faithfulness_table(loaded)]),
        ("Necessity and sufficiency", [ablation_table(loaded)]),
        ("Reconstruction", [reconstruction_table(loaded)]),
        ("Contributions", contribution_tables(loaded)),
    ]


def write_figures(loaded: LoadedRuns, out_dir: Path) -> list[Path]:
    """Cascade, reconstruction and contribution figures for every pair / run that has data."""
    written: list[Path] = []
    folder = out_dir / "figures"
    for dataset, backbone in pairs(loaded):
        runs = [r for r in loaded.runs if (r.dataset, r.backbone) == (dataset, backbone)]
        if not runs:
            continue
        setting, stem = _setting(dataset, backbone), f"{dataset}_{backbone}"
        written += _cascade_figure(runs, folder / f"cascade_{stem}.png", setting)
        curves = {
            _label(r.sparsifier): r.reconstruction["all"]
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
    ours = {m: {_label(r.sparsifier): r.top1(m) for r in runs if r.top1(m)} for m in pn.MODES}
    if not any(ours.values()):
        return []
    paper: dict[str, dict[str, list[float]]] = {m: {} for m in pn.MODES}
    for mode in pn.MODES:
        for name in pn.SPARSIFIERS:
            column = pn.paper_top1(dataset, backbone, mode, name)
            if column:
                paper[mode][_label(name)] = list(column)
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
        _label(r.sparsifier): {
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
