"""The paper's tables, built from our runs: each published number beside ours.

One function per table of the report (`all_tables` lists them in report order): the
cascaded replacement (Tables 6-23, and in long format), the baselines, the per-run summary,
faithfulness (Table 5), the poster's necessity / sufficiency ablation, layer-averaged
reconstruction and the poster's contribution values. Runs come from `experiments.results`,
published numbers from `experiments.paper_numbers`; settings outside the paper's grid get
columns or rows of their own, ours only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments import paper_numbers as pn
from experiments.comparison_table import BOLD_ABOVE_POINTS, DELTA, Cell, Table
from experiments.results import LoadedRuns, RunResult


def delta(ours: float | None, paper: float | None) -> float | None:
    """ours - paper; None when either is missing."""
    return None if ours is None or paper is None else ours - paper


def sparsifier_label(sparsifier: str) -> str:
    """The paper's abbreviation of a sparsifier (JR, RTK, ATK), else its name."""
    return pn.SPARSIFIER_ABBREVIATIONS.get(sparsifier, sparsifier)


def setting_title(dataset: str, backbone: str) -> str:
    """A (dataset, backbone) pair as the paper names them, e.g. "CIFAR-100, ViT-B/32"."""
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
        label = sparsifier_label(name)
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
            row += [paper, ours, delta(ours, paper)] if paper_column else [ours]
        rows.append(row)
    number = f"Table {paper_table.number}. " if paper_table else ""
    return Table(
        title=f"{number}{setting_title(dataset, backbone)}, {pn.MODE_NAMES.get(mode, mode)}",
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
                    table.rows.append([dataset, backbone, mode, name, start, p, o, delta(o, p)])
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
        table.rows.append([dataset, backbone, paper, ours, delta(ours, paper), spread, len(runs)])
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
        row.append(delta(run.baseline_top1(), pn.BASELINE_TOP1.get((run.dataset, run.backbone))))
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
        delta(value("drop_top1"), paper.drop_top1 if paper else None),
        paper.keep_topk if paper else None,
        value("keep_topk"),
        delta(value("keep_topk"), paper.keep_topk if paper else None),
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
                delta(ours[1], paper[1]),
                paper[2],
                ours[2],
                delta(ours[2], paper[2]),
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
