"""The quickstart's run report: one Markdown page with the paper's tables and figures.

Reads what `clt fit` wrote into each run folder through its callbacks: the fit-end
evaluation (`evaluation/`, the same files `clt evaluate` writes; read via
`experiments.results`), the retrieval grids (`retrieval/`) and the per-epoch evaluation
logged to `metrics.csv` (`eval/...` keys). Writes `report.md` plus the figures it embeds
into the report folder. Numbers are shown as the paper shows them: accuracies in %, a
baseline row, windows "s→L-1".
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clt_lightning.evaluation import plots
from clt_lightning.files import atomic_write_text
from experiments.logged_figures import eval_history, training_curves
from experiments.results import RunResult, load_runs

NAMES = {
    "jumprelu": "JumpReLU",
    "relu_topk": "ReLU-TopK",
    "abs_topk": "Abs-TopK",
    "batch_topk": "BatchTopK",
}
MODES = {"cls": "[CLS] only", "patches": "patches only", "all": "all tokens"}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A Markdown pipe table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cascade_section(runs: list[RunResult]) -> str:
    """Tables 6-23 layout: one table per token mode, a column per sparsifier."""
    n_layers = runs[0].n_layers()
    parts = []
    for mode, title in MODES.items():
        header = ["window", *(NAMES.get(r.sparsifier, r.sparsifier) for r in runs)]
        rows = [["baseline (frozen ViT)", *(r.baseline_top1() for r in runs)]]
        for start in range(n_layers):
            rows.append([f"{start}→{n_layers - 1}", *(r.top1(mode).get(start) for r in runs)])
        parts.append(f"**Top-1 accuracy (%) replacing {title}**\n\n" + md_table(header, rows))
    return "\n\n".join(parts)


def _layer_mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def reconstruction_section(runs: list[RunResult]) -> str:
    """Per-sparsifier layer means of R², MSE, cosine and L0, per token group."""
    header = ["sparsifier", "tokens", "R² (mean)", "MSE (mean)", "cosine (mean)", "L0 (mean)"]
    rows = []
    for run in runs:
        for group in ("all", "cls", "patches"):
            values = (run.reconstruction or {}).get(group, {})
            means = [_layer_mean(values.get(key)) for key in ("r2", "mse", "cosine", "l0")]
            rows.append([NAMES.get(run.sparsifier, run.sparsifier), group, *means])
    return md_table(header, rows, digits=4)


def faithfulness_section(runs: list[RunResult]) -> str:
    """Table 5 for every run and window."""
    header = [
        "sparsifier",
        "window",
        "tokens",
        "ΔAcc",
        "Flip %",
        "KL",
        "Top-1 %",
        "Top-5 %",
        "Cos",
        "CKA",
        "Spear.",
        "prompt r",
        "prompt KL",
    ]
    rows = []
    for run in runs:
        for r in (run.faithfulness or {}).get("rows", []):
            rows.append(
                [
                    NAMES.get(run.sparsifier, run.sparsifier),
                    r["window"],
                    r["mode"],
                    r["delta_acc"],
                    100 * r["flip_rate"],
                    r["kl"],
                    r["top1_agreement"],
                    r["top5_agreement"],
                    r["cosine"],
                    r["cka"],
                    r["spearman"],
                    r["prompt_r"],
                    r["prompt_kl"],
                ]
            )
    return md_table(header, rows, digits=3)


def ablation_section(runs: list[RunResult]) -> str:
    """Necessity (drop the top-1 source) and sufficiency (keep the top-k) at the last layer."""
    header = [
        "sparsifier",
        "tokens",
        "baseline",
        "all sources",
        "drop top-1",
        "keep top-k",
        "ranking C[s, L-1]",
    ]
    rows = []
    for run in runs:
        for r in (run.ablations or {}).get("rows", []):
            rows.append(
                [
                    NAMES.get(run.sparsifier, run.sparsifier),
                    r["mode"],
                    r["baseline"],
                    r["all_sources"],
                    r["drop_top1"],
                    r["keep_topk"],
                    " ".join(map(str, r["ranking"])),
                ]
            )
    return md_table(header, rows)


def copy_figures(runs: list[RunResult], out: Path) -> dict[str, list[str]]:
    """Copy each run's PNGs into the report folder; returns kind -> relative paths."""
    figures: dict[str, list[str]] = {"cascade": [], "contributions": [], "retrieval": []}
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for run in runs:
        for kind in ("cascade", "contributions"):
            src = run.path / "evaluation" / f"{kind}.png"
            if src.is_file():
                dst = out / "figures" / f"{kind}_{run.sparsifier}.png"
                shutil.copyfile(src, dst)
                figures[kind].append(str(dst.relative_to(out)))
        for src in sorted((run.path / "retrieval").glob("retrieval_*.png")):
            dst = out / "figures" / f"{run.sparsifier}_{src.name}"
            shutil.copyfile(src, dst)
            figures["retrieval"].append(str(dst.relative_to(out)))
    return figures


def reconstruction_figure(runs: list[RunResult], out: Path) -> str:
    """Figures 6-10 layout: cosine, MSE (log) and R² across layers, one line per sparsifier."""
    curves = {
        NAMES.get(r.sparsifier, r.sparsifier): r.reconstruction["all"]
        for r in runs
        if r.reconstruction
    }
    path = out / "figures" / "reconstruction.png"
    plots.reconstruction_curves(curves, path, title="CLT reconstruction across layers (all tokens)")
    return str(path.relative_to(out))


def training_section(runs: list[RunResult], out: Path) -> str:
    """How the per-epoch evaluation moved during training (from each run's metrics.csv)."""
    histories = {NAMES.get(r.sparsifier, r.sparsifier): eval_history(r.path) for r in runs}
    if not any(histories.values()):
        return "No per-epoch evaluation was logged (the evaluation callback was off)."
    path = out / "figures" / "training_curves.png"
    training_curves(histories, path)
    header = ["sparsifier", "epoch", "images", "baseline", "[CLS] 0→L-1", "patches 0→L-1",
              "all 0→L-1", "mean R²", "dead fraction"]  # fmt: skip
    keys = ["eval/n_images", "eval/baseline_top1", "eval/cascade_top1/cls/start_00",
            "eval/cascade_top1/patches/start_00", "eval/cascade_top1/all/start_00",
            "eval/reconstruction/r2/all/mean", "eval/dead_fraction/mean"]  # fmt: skip
    rows = [
        [name, int(r["eval/epoch"]) + 1, *(r.get(k) for k in keys)]
        for name, history in histories.items()
        for r in history
    ]
    for row in rows:
        row[2] = int(row[2]) if row[2] is not None else None
    text = (
        "The evaluation callback ran the whole suite after every epoch on the same seeded "
        "subset of val digits and logged it (`eval/...` in `metrics.csv` and W&B; "
        "docs/dashboards.md). Top-1 (%) with layers 0→L-1 replaced:"
    )
    return f"{text}\n\n![training curves]({path.relative_to(out)})\n\n" + md_table(header, rows, 3)


def write_report(
    runs_dir: Path, out: Path, teacher: dict[str, Any], timings: dict[str, float]
) -> Path:
    """Write `out/report.md` from the runs under `runs_dir`; returns its path."""
    loaded = load_runs(runs_dir)
    order = {name: i for i, name in enumerate(NAMES)}
    runs = sorted((r for r in loaded.runs if r.cascade), key=lambda r: order.get(r.sparsifier, 99))
    if not runs:
        raise FileNotFoundError(f"no evaluated runs under {runs_dir}")
    out.mkdir(parents=True, exist_ok=True)
    figures = copy_figures(runs, out)
    recon = reconstruction_figure(runs, out)
    image = lambda path, alt: f"![{alt}]({path})"  # noqa: E731
    accuracy = 100 * teacher.get("val_zero_shot_accuracy", float("nan"))
    sections = [
        "# clt-lightning quickstart report",
        "Everything below ran offline on this machine's CPU: a tiny CLIP trained by the project on "
        "scikit-learn's 1,797 real handwritten digits, its activation cache, one Cross-Layer "
        "Transcoder per sparsifier of the paper, the evaluation suite and layer-wise retrieval. "
        "Every number and figure was written by `clt fit`'s callbacks (`configs/quickstart.yaml`): "
        "the evaluation after each epoch and at the end of fit (on all val digits, what `clt "
        "evaluate` computes) and the retrieval index at the end of fit.",
        "## Teacher\n\n"
        + md_table(
            ["model", "zero-shot top-1 on held-out digits", "chance", "train images", "val images"],
            [
                [
                    "open_clip CLIP, 4 layers, width 64, 17 tokens",
                    f"{accuracy:.1f}%",
                    "10%",
                    1437,
                    360,
                ]
            ],
        ),
        "## Time\n\n"
        + md_table(["step", "seconds"], [[k, v] for k, v in timings.items()], digits=0),
        "## Reconstruction (paper: Figures 6-10)\n\n"
        + image(recon, "reconstruction curves")
        + "\n\n"
        + reconstruction_section(runs),
        "## During training (evaluation callback, every epoch)\n\n" + training_section(runs, out),
        "## Cascaded replacement (paper: Tables 6-23)\n\n"
        "Layers s→L-1 have their MLP output replaced by the CLT's for the given tokens; "
        "inputs are read from the modified run (docs/metrics.md, Cascaded replacement).\n\n"
        + cascade_section(runs)
        + "\n\n"
        + "\n".join(image(p, "cascade") for p in figures["cascade"]),
        "## Faithfulness (paper: Table 5)\n\n" + faithfulness_section(runs),
        "## Contribution scores C[s, l] (paper: Figures 11-16)\n\n"
        "Rows: source layer s; columns: target layer l; the bias row is separate; columns sum to 1.\n\n"
        + "\n\n".join(image(p, "contributions") for p in figures["contributions"]),
        "## Necessity and sufficiency (paper: poster)\n\n" + ablation_section(runs),
        "## Layer-wise retrieval (paper: Figures 4-5)\n\n"
        + "\n\n".join(image(p, "retrieval") for p in figures["retrieval"]),
    ]
    sections.append(features_section(runs_dir, out))
    if loaded.problems:
        sections.append("## Problems\n\n" + "\n".join(f"- {p}" for p in loaded.problems))
    return atomic_write_text(out / "report.md", "\n\n".join(sections) + "\n")


def features_section(runs_dir: Path, out: Path) -> str:
    """A link to the latent site `clt features` wrote for the ReLU-TopK CLT (docs/features.md)."""
    sites = [runs_dir / s / "features" / "index.html" for s in ("relu_topk", *NAMES)]
    site = next((p for p in sites if p.is_file()), None)
    if site is None:
        return "## Latent dashboards\n\nNo latent site was built (`clt features`)."
    name = NAMES.get(site.parent.parent.name, site.parent.parent.name)
    link = os.path.relpath(site.resolve(), out.resolve())
    return (
        "## Latent dashboards\n\n"
        f"[Browse the {name} CLT's latents]({link}): top digits with patch heatmaps, "
        "activation histograms, cross-layer write profiles and the direct effect on the "
        "digit classes (opens from disk; docs/features.md)."
    )
