"""What the evaluation callbacks log: stable, namespaced keys for the CSV log and W&B.

Every key starts with a prefix: `eval` for the per-epoch evaluation on a fixed subset of
the validation split, `eval_full` for the full evaluation at the end of fit (so a curve
never mixes the two). Scalars go to every logger; W&B also gets custom line charts (built
from W&B Tables), Tables and the figures. `docs/dashboards.md` lists every key and panel;
the key scheme is a contract (dashboards and `experiments/` read it), so change both
together.

Scalars (`<p>` = the prefix, `<mode>` cls | patches | all, `<group>` all | cls | patches,
two-digit layer numbers):

    <p>/epoch, <p>/n_images
    <p>/baseline_top1, <p>/baseline_top5
    <p>/cascade_top1/<mode>/start_<s>, <p>/cascade_top5/<mode>/start_<s>
    <p>/faithfulness/<mode>/start_<s>/<column>       (Table 5 columns, docs/metrics.md)
    <p>/ablation/<mode>/{all_sources,drop_top1,keep_topk}
    <p>/reconstruction/{r2,mse,cosine,l0}/<group>/{layer_<l>,mean}
    <p>/dead_fraction/{layer_<l>,mean}, <p>/dead_latents/layer_<l>

W&B only: `<p>/chart/cascade_top1`, `<p>/chart/{r2,mse,cosine,l0}` (line charts against
the start layer / layer), `<p>/table/{cascade,faithfulness,contributions}` (Tables),
`<p>/figure/{cascade,contributions,reconstruction}` (images); at the end of fit
`retrieval/grids/<aggregation>` (images, `RetrievalCallback`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from clt_lightning.evaluation.undefined import is_defined

log = logging.getLogger(__name__)

RECONSTRUCTION_METRICS: tuple[str, ...] = ("r2", "mse", "cosine", "l0")
"""Per-layer reconstruction metrics logged (docs/metrics.md, "Reconstruction")."""

FAITHFULNESS_COLUMNS: tuple[str, ...] = (
    "delta_acc",
    "flip_rate",
    "kl",
    "top1_agreement",
    "top5_agreement",
    "cosine",
    "cka",
    "spearman",
    "spearman_logits",
    "prompt_r",
    "prompt_kl",
)
"""Table 5 columns logged as scalars per window."""

FIGURES: tuple[str, ...] = ("cascade", "contributions", "reconstruction")
"""The suite's figures (`<stem>.png` in its output folder) logged as W&B images."""


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(float(value))


def _cell(value: Any) -> Any:
    """A table cell: an undefined value (`evaluation.undefined.Undefined`) is an empty cell."""
    return value if is_defined(value) else None


def _put(metrics: dict[str, float], key: str, value: Any) -> None:
    """Add a number; undefined values (None, NaN) are left out rather than logged."""
    if _finite(value):
        metrics[key] = float(value)


def cascade_metrics(cascade: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """`<p>/baseline_top{1,5}` and `<p>/cascade_top{1,5}/<mode>/start_<s>` from cascade.json."""
    metrics: dict[str, float] = {}
    for metric in ("top1", "top5"):
        _put(metrics, f"{prefix}/baseline_{metric}", cascade["baseline"][metric])
        for mode, values in cascade["modes"].items():
            for start, value in zip(values["starts"], values[metric], strict=True):
                _put(metrics, f"{prefix}/cascade_{metric}/{mode}/start_{start:02d}", value)
    return metrics


def scalar_metrics(payloads: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Every scalar of an evaluation (the suite's payloads) under `prefix`.

    Args:
        payloads: `run_suite`'s return value (cascade, faithfulness, ablations,
            reconstruction, run).
        prefix: "eval" (per epoch) or "eval_full" (end of fit).

    Returns:
        Flat {key: float}; undefined values are left out.
    """
    metrics = cascade_metrics(payloads["cascade"], prefix)
    _put(metrics, f"{prefix}/n_images", payloads["cascade"]["n_images"])
    for row in payloads["faithfulness"]["rows"]:
        base = f"{prefix}/faithfulness/{row['mode']}/start_{row['start']:02d}"
        for column in FAITHFULNESS_COLUMNS:
            _put(metrics, f"{base}/{column}", row.get(column))
    for row in payloads["ablations"]["rows"]:
        for key in ("all_sources", "drop_top1", "keep_topk"):
            _put(metrics, f"{prefix}/ablation/{row['mode']}/{key}", row[key])
    for group, values in payloads["reconstruction"].items():
        for name in RECONSTRUCTION_METRICS:
            per_layer = values.get(name) or []
            for layer, value in enumerate(per_layer):
                _put(metrics, f"{prefix}/reconstruction/{name}/{group}/layer_{layer:02d}", value)
            defined = [float(v) for v in per_layer if _finite(v)]
            if defined:
                metrics[f"{prefix}/reconstruction/{name}/{group}/mean"] = sum(defined) / len(
                    defined
                )
    return metrics


def dead_latent_metrics(dead_mask: torch.Tensor, prefix: str) -> dict[str, float]:
    """`<p>/dead_fraction/layer_<l>` (and mean) and `<p>/dead_latents/layer_<l>` (counts).

    Args:
        dead_mask: [L, F] bool, latents that did not fire in the sparsifier's window
            (`Sparsifier.dead_mask`).
        prefix: Key prefix.
    """
    dead = dead_mask.detach().cpu()
    fraction = dead.float().mean(dim=1)
    metrics = {f"{prefix}/dead_fraction/mean": fraction.mean().item()}
    for layer, (part, count) in enumerate(
        zip(fraction.tolist(), dead.sum(dim=1).tolist(), strict=True)
    ):
        metrics[f"{prefix}/dead_fraction/layer_{layer:02d}"] = part
        metrics[f"{prefix}/dead_latents/layer_{layer:02d}"] = float(count)
    return metrics


def _line_chart(wandb: Any, xs: list[int], series: dict[str, list], title: str, xname: str):
    ys = [[v if _finite(v) else None for v in values] for values in series.values()]
    return wandb.plot.line_series(xs=xs, ys=ys, keys=list(series), title=title, xname=xname)


def wandb_panels(payloads: Mapping[str, Any], folder: Path, prefix: str) -> dict[str, Any]:
    """The W&B objects of one evaluation: line charts, Tables and figure images.

    Args:
        payloads: `run_suite`'s return value.
        folder: The folder `run_suite` wrote (its PNG figures are logged).
        prefix: Key prefix.

    Returns:
        {key: wandb.Table | custom chart | wandb.Image} for one `log_metrics` call.
    """
    import wandb

    cascade = payloads["cascade"]
    modes = cascade["modes"]
    starts = next(iter(modes.values()))["starts"]
    series = {mode: values["top1"] for mode, values in modes.items()}
    series["baseline"] = [cascade["baseline"]["top1"]] * len(starts)
    panels: dict[str, Any] = {
        f"{prefix}/chart/cascade_top1": _line_chart(
            wandb, starts, series, "Cascaded top-1 (%) vs start layer s (s→L-1)", "start layer s"
        ),
        f"{prefix}/table/cascade": wandb.Table(
            columns=["start", *series],
            data=[[s, *(v[i] for v in series.values())] for i, s in enumerate(starts)],
        ),
    }
    recon = payloads["reconstruction"]
    n_layers = len(next(iter(recon.values()))["r2"])
    for name in RECONSTRUCTION_METRICS:
        curves = {group: values[name] for group, values in recon.items()}
        title = f"Reconstruction {name} per layer"
        panels[f"{prefix}/chart/{name}"] = _line_chart(
            wandb, list(range(n_layers)), curves, title, "layer"
        )
    rows = payloads["faithfulness"]["rows"]
    if rows:
        columns = list(rows[0])
        panels[f"{prefix}/table/faithfulness"] = wandb.Table(
            columns=columns, data=[[_cell(r[c]) for c in columns] for r in rows]
        )
    panels[f"{prefix}/table/contributions"] = wandb.Table(
        columns=["group", "source", "target", "score"],
        data=list(contribution_rows(payloads["contributions"])),
    )
    for stem in FIGURES:
        path = folder / f"{stem}.png"
        if path.is_file():
            panels[f"{prefix}/figure/{stem}"] = wandb.Image(str(path), caption=stem)
    return panels


def contribution_rows(scores: Mapping[str, list[list[float]]]) -> Iterable[list[Any]]:
    """(group, source, target, C[s, l]) rows; source "bias" is the bias row, s > l left out."""
    for group, matrix in scores.items():
        n_layers = len(matrix) - 1
        for source, row in enumerate(matrix):
            for target, value in enumerate(row):
                if source == n_layers or source <= target:
                    name = "bias" if source == n_layers else f"{source:02d}"
                    yield [group, name, target, _cell(value)]


def log_evaluation(
    loggers: Iterable[Logger], scalars: dict[str, float], panels: dict[str, Any], step: int
) -> None:
    """Scalars to every logger, W&B objects to W&B loggers; flushes the CSV log.

    Args:
        loggers: The trainer's loggers.
        scalars: `scalar_metrics(...)` and any others.
        panels: `wandb_panels(...)` (ignored by loggers other than W&B).
        step: The trainer's global step.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_metrics({**scalars, **panels}, step=step)
        else:
            logger.log_metrics(scalars, step=step)
        logger.save()
