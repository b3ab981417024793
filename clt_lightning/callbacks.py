"""Thin Lightning callbacks that run the evaluation suite and the retrieval during `fit`.

They only coordinate: the work is `evaluation.suite.run_suite` and
`evaluation.retrieval.build_and_query`. Both run on global rank zero only (other ranks
wait at a barrier so DDP stays in step), write into the run folder, and log numbers,
tables and figures to every logger that can take them (W&B Tables and images; the CSV
logger gets the scalars).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from clt_lightning.data.datasets import build_dataset
from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.suite import EvaluationConfig, RunInfo, backbone_tag, run_suite
from clt_lightning.evaluation.undefined import is_defined
from clt_lightning.teacher import Teacher

log = logging.getLogger(__name__)


def _teacher_and_info(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Teacher, RunInfo]:
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "teacher_config"):
        raise ConfigError("evaluation callbacks need an ActivationDataModule (data: section)")
    teacher = Teacher(datamodule.teacher_config).to(pl_module.device)
    config = datamodule.teacher_config
    info = RunInfo(
        run_name=Path(trainer.default_root_dir).resolve().name,
        dataset=datamodule.dataset_config.name,
        backbone=backbone_tag(None if config.model_config else config.model_name),
    )
    return teacher, info


def scalar_summary(payloads: dict[str, Any]) -> dict[str, float]:
    """The evaluation's headline numbers as flat `eval/...` metrics for the loggers."""
    cascade = payloads["cascade"]
    metrics = {"eval/baseline_top1": cascade["baseline"]["top1"]}
    for mode, values in cascade["modes"].items():
        for start, top1 in zip(values["starts"], values["top1"], strict=True):
            metrics[f"eval/cascade_top1/{mode}/start_{start:02d}"] = top1
    for row in payloads["ablations"]["rows"]:
        for key in ("all_sources", "drop_top1", "keep_topk"):
            if is_defined(row[key]):  # an undefined value is not logged as a number
                metrics[f"eval/ablation/{row['mode']}/{key}"] = row[key]
    return metrics


def log_to_loggers(trainer: L.Trainer, payloads: dict[str, Any], folder: Path) -> None:
    """Scalars to every logger; tables and figures to W&B when it is one of them."""
    step = trainer.global_step
    for logger in trainer.loggers:
        logger.log_metrics(scalar_summary(payloads), step=step)
        if isinstance(logger, WandbLogger):
            rows = payloads["faithfulness"]["rows"]
            if rows:
                columns = list(rows[0])
                logger.log_table(
                    "eval/faithfulness",
                    columns=columns,
                    data=[[r[c] if is_defined(r[c]) else None for c in columns] for r in rows],
                    step=step,
                )
            images = sorted(folder.glob("*.png"))
            if images:
                logger.log_image(
                    "eval/figures",
                    [str(p) for p in images],
                    caption=[p.stem for p in images],
                    step=step,
                )


class EvaluationCallback(Callback):
    """Run the evaluation suite at fit end and/or every few validation epochs.

    Args:
        config: What to evaluate (images, windows, ...); `output_dir` defaults to
            `<run folder>/evaluation` (per epoch: `evaluation/epoch_XX`).
        every_n_epochs: Also evaluate after every n-th validation epoch (0 = never).
        at_fit_end: Evaluate when fit ends.
    """

    def __init__(
        self,
        config: EvaluationConfig = EvaluationConfig(n_images=1000),
        every_n_epochs: int = 0,
        at_fit_end: bool = True,
    ) -> None:
        if every_n_epochs < 0:
            raise ConfigError(
                f"EvaluationCallback.every_n_epochs must be >= 0, got {every_n_epochs}"
            )
        self.config, self.every_n_epochs, self.at_fit_end = config, every_n_epochs, at_fit_end

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, subdir: str) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            teacher, info = _teacher_and_info(trainer, pl_module)
            dataset = build_dataset(trainer.datamodule.dataset_config, "val", teacher.preprocess)
            folder = Path(self.config.output_dir or Path(trainer.default_root_dir) / subdir)
            was_training = pl_module.training
            payloads = run_suite(
                teacher,
                pl_module.clt,
                dataset,
                list(dataset.class_names),
                info,
                replace(self.config, output_dir=str(folder)),
                folder,
                _probe_train_split(trainer, teacher),
            )
            pl_module.train(was_training)
            log_to_loggers(trainer, payloads, folder)
        trainer.strategy.barrier("clt_evaluation")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, f"evaluation/epoch_{epoch:02d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end:
            self._run(trainer, pl_module, "evaluation")


class RetrievalCallback(Callback):
    """At fit end, build the per-layer retrieval indexes and log grids for fixed images.

    Args:
        query_indices: Validation images whose grids are written and logged.
        k: Neighbours per layer.
        aggregation: "cls", "patches" or "all".
        max_corpus_images: Index at most this many training images (None = all).
    """

    def __init__(
        self,
        query_indices: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse needs a literal)
        k: int = 3,
        aggregation: str = "cls",
        max_corpus_images: int | None = None,
    ) -> None:
        self.query_indices, self.k = list(query_indices), k
        self.aggregation, self.max_corpus_images = aggregation, max_corpus_images

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            self._build_and_log(trainer, pl_module)
        trainer.strategy.barrier("clt_retrieval")

    def _build_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from clt_lightning.evaluation.retrieval import build_and_query

        teacher, _ = _teacher_and_info(trainer, pl_module)
        config = trainer.datamodule.dataset_config
        corpus_config = replace(config, max_images=self.max_corpus_images or config.max_images)
        corpus = build_dataset(corpus_config, "train", teacher.preprocess)
        queries = build_dataset(config, "val", teacher.preprocess)
        folder = Path(trainer.default_root_dir) / "retrieval"
        grids = []
        for i, index in enumerate(self.query_indices):
            result = build_and_query(
                teacher,
                pl_module.clt,
                corpus,
                folder / f"index_{self.aggregation}",
                folder,
                query_index=index,
                query_dataset=queries,
                k=self.k,
                aggregation=self.aggregation,
                rebuild=i == 0,
                progress=True,
            )
            grids.append(str(result.grid_path))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("eval/retrieval", grids, step=trainer.global_step)


def _probe_train_split(trainer: L.Trainer, teacher: Any) -> Any:
    """The train split a vision-only teacher's linear probe is fit on (None with text)."""
    if getattr(teacher, "has_text_tower", True):
        return None
    return build_dataset(trainer.datamodule.dataset_config, "train", teacher.preprocess)
