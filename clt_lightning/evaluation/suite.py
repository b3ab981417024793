"""The whole evaluation suite for one trained CLT, written into a run folder.

`run_suite` is what `clt evaluate` and `EvaluationCallback` both call. It composes the pure
functions of this package (cascade, faithfulness, contributions, ablations, reconstruction)
and writes, into `output_dir`:

    run.json              identity: run name, dataset, backbone, sparsifier, images, checkpoint
    cascade.json/.md/.csv Tables 6-23 layout: top-1/top-5 per start s -> L-1 and token mode
    faithfulness.json/.md Table 5 for the chosen windows
    contributions.json    C[s, l] per token group ((L+1) x L, last row = bias)
    ablations.json/.md    necessity / sufficiency at the last layer
    reconstruction.json   per-layer MSE, R^2, cosine, L0 for all / cls / patch tokens
    *.png                 cascade curves, contribution heatmaps, reconstruction curves

The folder is committed as a unit (`files.commit_folder`): every file is written into a
hidden sibling folder that then replaces `output_dir`, so a kill leaves the previous
evaluation or the new one, never a mix. `run.json` still marks a complete evaluation
(`experiments/tables.py` relies on that). An existing `output_dir` holding anything but
these files (e.g. the run folder itself) is refused before any work.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation import (
    ablations,
    cascade,
    clean_pass,
    contributions,
    faithfulness,
    zeroshot,
)
from clt_lightning.evaluation.linear_probe import build_probe
from clt_lightning.evaluation.replacement import check_compatible
from clt_lightning.evaluation.tables import write_csv, write_markdown
from clt_lightning.evaluation.token_modes import GROUP_ORDER
from clt_lightning.evaluation.undefined import nan_to_undefined, write_json
from clt_lightning.files import check_replaceable, commit_folder
from clt_lightning.tokens import TOKEN_GROUPS, layout_of

log = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    """What `clt evaluate` (and the evaluation callback) computes.

    Args:
        output_dir: Folder for the results (default: `<run folder>/evaluation`).
        n_images: Validation images to evaluate (a fixed seeded subset; None = all).
        batch_size: Images per teacher forward.
        num_workers: DataLoader workers decoding images.
        starts: Start layers s of the cascade s -> L-1 (None = every layer).
        modes: Token modes replaced: token groups the teacher has ("cls", "registers",
            "patches", "all"); default: every group it has (SigLIP has no "cls").
        faithfulness_starts: Windows s -> L-1 for the faithfulness table, each in every
            mode (None = the paper's Table 5 rows: 0-11, 7-11, 10-11, 11 for [CLS] and
            0-11, 7-11, 10-11 for patches, mapped to other depths by offset from the last
            layer).
        ablation_k: Sources kept by the sufficiency ablation (paper: 4).
        classifier_cache: Folder caching zero-shot classifiers per (teacher, dataset).
        figures: Write PNG figures.
        seed: Seed of the image subset.
    """

    output_dir: str | None = None
    n_images: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    starts: list[int] | None = None
    modes: list[str] | None = None
    faithfulness_starts: list[int] | None = None
    ablation_k: int = 4
    classifier_cache: str | None = ".cache/classifiers"
    figures: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.modes or [] if m not in TOKEN_GROUPS]
        if bad or self.modes == []:
            raise ConfigError(f"evaluation.modes {self.modes} invalid; choose from {TOKEN_GROUPS}")
        for key in ("batch_size", "ablation_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"evaluation.{key} must be >= 1, got {getattr(self, key)}")
        if self.n_images is not None and self.n_images < 1:
            raise ConfigError(f"evaluation.n_images must be >= 1 or null, got {self.n_images}")
        if self.num_workers < 0:
            raise ConfigError(f"evaluation.num_workers must be >= 0, got {self.num_workers}")


def backbone_tag(model_name: str | None) -> str:
    """Short backbone name for tables: "ViT-B-32" -> "b32", "ViT-B-16-quickgelu" -> "b16"."""
    name = (model_name or "custom").lower().replace("-quickgelu", "")
    if name.startswith("vit-b-"):
        return "b" + name.split("-")[2]
    return name


def evaluation_images(dataset: Dataset, n_images: int | None, seed: int) -> Dataset:
    """A fixed seeded subset of `n_images` images (all when None or larger)."""
    if len(dataset) == 0:
        raise ConfigError("the validation split is empty: nothing to evaluate")
    if n_images is None or n_images >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:n_images].tolist()))


CONTRIBUTION_UNDEFINED = "no image of this token group has a nonzero reconstruction of the target"


def reconstruction_metrics(teacher: Any, clt: Any, loader: DataLoader) -> dict[str, dict]:
    """Per-layer MSE, R^2, cosine and L0 of the CLT on teacher-forced activations.

    A stand-alone teacher pass (`run_suite` gets the same numbers from its shared pass).

    Returns:
        group (every token group the teacher has) -> metric -> per-layer list.
    """
    metrics = clean_pass.ReconstructionAccumulator(clt.n_layers, clt.d_model, layout_of(teacher))
    for images, *_ in tqdm(loader, desc="reconstruction", leave=False):
        x, y = teacher.capture(images.to(teacher.device))
        clean_pass.update_reconstruction(metrics, clt, x, y)
    return metrics.payload()


def _cascade_payload(result: cascade.CascadeResult) -> dict[str, Any]:
    return {
        "n_layers": result.n_layers,
        "n_images": result.n_images,
        "baseline": result.baseline,
        "modes": {
            mode: {"starts": list(result.starts), **result.accuracy[mode]} for mode in result.modes
        },
    }


def _faithfulness_rows(
    reports: dict[str, Any], windows: list[tuple[int, str]], n_layers: int
) -> list[dict[str, Any]]:
    """Table 5 rows in the run-folder schema (ΔAcc in points, agreements in %)."""
    rows = []
    for (start, mode), report in zip(windows, reports.values(), strict=True):
        row = {"window": f"{start}-{n_layers - 1}", "start": start, "mode": mode}
        row["delta_acc"] = 100 * report.delta_accuracy
        for name in _FAITHFULNESS_FIELDS:
            value = getattr(report, name)
            row[name] = 100 * value if name in _PERCENT_FIELDS else value
        rows.append(row)
    return rows


_FAITHFULNESS_FIELDS = ("flip_rate", "kl", "top1_agreement", "top5_agreement", "cosine", "cka",
                        "spearman", "spearman_logits", "prompt_r", "prompt_kl", "n_images")  # fmt: skip
"""`FaithfulnessReport` fields of a run-folder row after its ΔAcc, in order."""
_PERCENT_FIELDS = ("top1_agreement", "top5_agreement")


@dataclass
class RunInfo:
    """Identity of the evaluated run (written to run.json).

    Args:
        run_name: Name of the run (its folder name).
        dataset: Dataset name (cifar100, coco, imagenet100, digits, ...).
        backbone: Backbone tag (b32, b16, or the model name).
        checkpoint: Checkpoint evaluated, if any.
    """

    run_name: str
    dataset: str
    backbone: str
    checkpoint: str | None = None


def default_windows(
    n_layers: int, starts: list[int] | None, modes: list[str]
) -> list[tuple[int, str]]:
    """(start, mode) windows for Table 5.

    Args:
        n_layers: L.
        starts: Explicit starts, each evaluated in every mode; None = the paper's rows
            (`faithfulness.table5_windows`: 0-11, 7-11, 10-11, 11 for [CLS] and 0-11, 7-11,
            10-11 for patches at L = 12, by offset from the last layer elsewhere; the
            paper has no all-token rows).
        modes: The token modes evaluated.

    Raises:
        ConfigError: A start outside 0..L-1.
    """
    if starts is None:
        return faithfulness.table5_windows(n_layers, modes)
    bad = [s for s in starts if not 0 <= s < n_layers]
    if bad:
        raise ConfigError(f"evaluation.faithfulness_starts {bad} outside 0..{n_layers - 1}")
    return [(s, m) for m in modes for s in starts]


def _accuracy_head(
    teacher: Any,
    class_names: list[str],
    info: RunInfo,
    config: EvaluationConfig,
    train_dataset: Dataset | None,
) -> AccuracyHead:
    """The teacher's accuracy head: zero-shot with a text tower, else a linear probe."""
    if getattr(teacher, "has_text_tower", True):
        templates = zeroshot.templates_for(info.dataset)
        cache = config.classifier_cache
        classifier = zeroshot.build_classifier(teacher, class_names, templates, cache)
        per_template = zeroshot.build_per_template_classifiers(
            teacher, class_names, templates, cache
        )
        return AccuracyHead(classifier, per_template, zeroshot.logit_scale_of(teacher))
    if train_dataset is None:
        raise ConfigError(
            "the teacher has no text tower: its accuracy is a linear probe, which needs the "
            "train split (pass train_dataset)"
        )
    classifier = build_probe(
        teacher,
        train_dataset,
        class_names,
        config.classifier_cache,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
    )
    return AccuracyHead(classifier, classifier[None], torch.zeros(()))


def run_suite(
    teacher: Any,
    clt: Any,
    dataset: Dataset,
    class_names: list[str],
    info: RunInfo,
    config: EvaluationConfig,
    output_dir: str | Path,
    train_dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Run every evaluation on `dataset` (the validation split) and write the results.

    Accuracy is zero-shot when the teacher has a text tower, else a linear probe fit on
    `train_dataset` (see `linear_probe.py`; prompt sensitivity is then undefined).

    Args:
        teacher: The frozen `Teacher` the CLT was trained on.
        clt: The trained `CrossLayerTranscoder` (eval mode is set here).
        dataset: Validation images, transformed with `teacher.preprocess`.
        class_names: Class names for the zero-shot head.
        info: Identity of the run (dataset, backbone, sparsifier...).
        config: What to compute.
        output_dir: Folder for the JSON, tables and figures.
        train_dataset: Train split (same transform), needed for a vision-only teacher.

    Returns:
        The JSON payloads by file stem ("cascade", "faithfulness", ...).
    """
    check_compatible(teacher, clt)
    if not class_names:
        raise ConfigError(
            f"dataset {info.dataset!r} has no class names: cannot build a zero-shot head"
        )
    out = Path(output_dir)
    check_replaceable(out, evaluation_owned, EVALUATION_WHAT)  # before the work, not after
    clt.eval()
    images = evaluation_images(dataset, config.n_images, config.seed)
    loader = DataLoader(images, batch_size=config.batch_size, num_workers=config.num_workers)
    head = _accuracy_head(teacher, class_names, info, config, train_dataset)
    modes = _evaluated_modes(teacher, config)
    log.info("evaluating %s on %d images: one clean teacher pass", info.run_name, len(images))
    payloads, result, reports, scores = _clean_pass_payloads(
        teacher, clt, loader, head, config, modes
    )
    log.info("necessity / sufficiency ablations (second teacher pass)")
    ablation = ablations.ablate(teacher, clt, loader, head.classifier, head.scale, scores,
                                modes=modes, k=config.ablation_k, progress=True)  # fmt: skip
    payloads["ablations"] = _ablation_payload(ablation, scores, clt.n_layers)
    run = {**asdict(info), "sparsifier": clt.sparsifier.name, "n_images": len(images),
           "n_layers": clt.n_layers}  # fmt: skip
    with commit_folder(
        out, evaluation_owned, EVALUATION_WHAT, keep=evaluation_subfolder
    ) as staging:
        _write_outputs(staging, payloads, result, reports, ablation, scores, info, config)
        write_json(staging / "run.json", run)
    payloads["run"] = run
    return payloads


def _evaluated_modes(teacher: Any, config: EvaluationConfig) -> list[str]:
    """`config.modes` (checked against the teacher's token groups), else every group the
    teacher has, in `GROUP_ORDER`."""
    layout = layout_of(teacher)
    modes = [layout.check(m, "evaluation.modes") for m in config.modes or []]
    return modes or [m for m in GROUP_ORDER if m in layout.groups]


EVALUATION_WHAT = "evaluation results"
EVALUATION_SUFFIXES = (".json", ".md", ".csv", ".png")


def evaluation_subfolder(entry: Path) -> bool:
    """A per-epoch evaluation (`EvaluationCallback`: `evaluation/epoch_XX`), kept when the
    folder above it is rewritten."""
    return entry.is_dir() and re.fullmatch(r"epoch_\d+", entry.name) is not None


def evaluation_owned(entry: Path) -> bool:
    """Entries an evaluation folder may hold: the suite's files, temp files and per-epoch
    subfolders."""
    if evaluation_subfolder(entry) or re.fullmatch(r"\.epoch_\d+\.(partial|previous)", entry.name):
        return True  # (the second: left by a killed per-epoch evaluation)
    return entry.is_file() and (entry.suffix in EVALUATION_SUFFIXES or entry.name.endswith(".tmp"))


@dataclass
class AccuracyHead:
    """The accuracy head of one evaluation: zero-shot, or a linear probe for a teacher
    without a text tower (`evaluation.linear_probe`, logit scale 0).

    Args:
        classifier: [E, C] template-averaged classifier (or the probe's weights).
        per_template: [n_templates, E, C] one classifier per prompt template ([1, E, C]
            for a probe).
        scale: The model's log temperature.
    """

    classifier: torch.Tensor
    per_template: torch.Tensor
    scale: torch.Tensor


def _clean_pass_payloads(
    teacher: Any,
    clt: Any,
    loader: DataLoader,
    head: AccuracyHead,
    config: EvaluationConfig,
    modes: list[str],
) -> tuple[dict[str, Any], Any, dict[str, Any], Any]:
    """Cascade, faithfulness, contributions and reconstruction from one clean teacher pass.

    Returns:
        (payloads by file stem, the cascade result, faithfulness reports, contribution scores).
    """
    n_layers = clt.n_layers
    layout = layout_of(teacher)
    windows = default_windows(n_layers, config.faithfulness_starts, modes)
    accuracy = cascade.CascadeAccumulator(
        teacher, clt, head.classifier, head.scale, config.starts, modes, keep=windows
    )
    contribution = contributions.ContributionAccumulator(n_layers, layout=layout)
    reconstruction = clean_pass.ReconstructionAccumulator(n_layers, clt.d_model, layout)
    clean_pass.shared_clean_pass(
        teacher, clt, loader, accuracy, contribution, reconstruction, progress=True
    )
    result = accuracy.compute()
    reports = {}
    if windows:  # the paper has no all-token rows: modes=["all"] has no default window
        reports = faithfulness.faithfulness_from_cascade(
            result, head.classifier, head.scale, head.per_template, windows
        )
    scores = contribution.compute()
    payloads: dict[str, Any] = {
        "cascade": _cascade_payload(result),
        "faithfulness": {"rows": _faithfulness_rows(reports, windows, n_layers)},
        "contributions": {
            g: nan_to_undefined(s.tolist(), CONTRIBUTION_UNDEFINED)
            for g, s in scores.scores.items()
        },
        "reconstruction": reconstruction.payload(),
    }
    return payloads, result, reports, scores


def _ablation_payload(ablation: Any, scores: Any, n_layers: int) -> dict[str, Any]:
    rows = []
    for mode, acc in ablation.accuracy.items():
        rows.append(
            {
                "mode": mode,
                "baseline": ablation.baseline,
                "all_sources": acc["full"],
                "drop_top1": acc["drop_top1"],
                "keep_topk": acc["keep_topk"],
                "ranking": ablations.rank_sources(scores, mode, ablation.target),
                "kept_sources": ablation.kept_sources[mode]["keep_topk"],
            }
        )
    return {"k": ablation.k, "target": ablation.target, "n_images": ablation.n_images, "rows": rows}


def _write_outputs(out: Path, payloads, result, reports, ablation, scores, info, config) -> None:
    """JSON for every payload, Markdown/CSV tables, and the figures."""
    for stem, payload in payloads.items():
        write_json(out / f"{stem}.json", payload)
    cascade.write_cascade_tables(result, out)
    table5 = faithfulness.faithfulness_table(reports)
    write_markdown(table5, out / "faithfulness.md", digits=3)
    write_csv(table5, out / "faithfulness.csv")
    write_markdown(ablation.rows(), out / "ablations.md")
    write_csv(ablation.rows(), out / "ablations.csv")
    if config.figures:
        _write_figures(out, payloads, result, scores, info)


def _write_figures(out: Path, payloads, result, scores, info: RunInfo) -> None:
    from clt_lightning.evaluation import plots

    name = f"{info.run_name} ({info.dataset}, {info.backbone})"
    plots.cascade_plot(result, out / "cascade.png", title=f"Cascaded replacement: {name}")
    titles = {"cls": "[CLS]", "registers": "Registers", "patches": "Patches"}
    panels = {titles[g]: scores.scores[g] for g in titles if g in scores.scores}
    plots.contribution_heatmaps(
        panels, out / "contributions.png", title=f"Contributions C[s, l]: {name}"
    )
    runs = {
        g: payloads["reconstruction"][g] for g in GROUP_ORDER if g in payloads["reconstruction"]
    }
    plots.reconstruction_curves(runs, out / "reconstruction.png", title=f"Reconstruction: {name}")
