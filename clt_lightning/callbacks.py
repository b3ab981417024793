"""Thin Lightning callbacks that run the evaluation suite and the retrieval during `fit`.

They only coordinate: the work is `evaluation.suite.run_suite` and
`evaluation.retrieval.build_and_query`. Both run on global rank zero only (other ranks
wait at a barrier so DDP stays in step), write into the run folder, and log numbers,
tables and figures to every logger that can take them (W&B Tables and images; the CSV
logger gets the scalars).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from clt_lightning import dashboard
from clt_lightning.data.datasets import build_dataset
from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.suite import EvaluationConfig, RunInfo, backbone_tag, run_suite
from clt_lightning.teacher import Teacher

log = logging.getLogger(__name__)


def _datamodule(trainer: L.Trainer) -> Any:
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "teacher_config"):
        raise ConfigError("evaluation callbacks need an ActivationDataModule (data: section)")
    return datamodule


def _teacher(trainer: L.Trainer, pl_module: L.LightningModule) -> Teacher:
    """The datamodule's frozen teacher, on the module's device."""
    return Teacher(_datamodule(trainer).teacher_config).to(pl_module.device)


def _run_info(trainer: L.Trainer) -> RunInfo:
    """The run's identity for `run.json`."""
    datamodule = _datamodule(trainer)
    config = datamodule.teacher_config
    return RunInfo(
        run_name=Path(trainer.default_root_dir).resolve().name,
        dataset=datamodule.dataset_config.name,
        backbone=backbone_tag(None if config.model_config else config.model_name),
    )


def run_on_rank_zero(trainer: L.Trainer, barrier: str, work: Callable[[], None]) -> None:
    """Run `work` on global rank zero while the other ranks wait at `barrier`, so DDP
    stays in step; nothing under `fast_dev_run` (a smoke test of the training loop)."""
    if trainer.fast_dev_run:
        return
    if trainer.is_global_zero:
        work()
    trainer.strategy.barrier(barrier)


class EvaluationCallback(Callback):
    """Evaluate the CLT during `fit`: a fixed subset every few epochs, everything at the end.

    Per evaluated epoch (the end of every `every_n_epochs`-th training epoch) the suite runs
    on a fixed, seeded subset of `epoch_n_images` validation images (the same images every
    epoch) into `<run>/evaluation/epoch_XX` and logs under `eval/...`; at the end of fit it
    runs on `config.n_images` images (default: all) into `<run>/evaluation` (the folder
    `clt evaluate` writes) and logs under `eval_full/...`. Keys: `clt_lightning.dashboard`
    and docs/dashboards.md. Global RNG state is saved and restored around each evaluation,
    so training draws the same random numbers with or without the callback.

    Args:
        config: The fit-end evaluation (images, windows, ...), as `clt evaluate` takes it;
            `output_dir` defaults to `<run folder>/evaluation`.
        every_n_epochs: Evaluate the subset after every n-th training epoch (0 = never).
        at_fit_end: Run the full evaluation when fit ends.
        epoch_n_images: Validation images of the per-epoch subset (seeded by `config.seed`).
    """

    def __init__(
        self,
        config: EvaluationConfig = EvaluationConfig(),
        every_n_epochs: int = 1,
        at_fit_end: bool = True,
        epoch_n_images: int = 512,
    ) -> None:
        if every_n_epochs < 0:
            raise ConfigError(
                f"EvaluationCallback.every_n_epochs must be >= 0, got {every_n_epochs}"
            )
        if epoch_n_images < 1:
            raise ConfigError(
                f"EvaluationCallback.epoch_n_images must be >= 1, got {epoch_n_images}"
            )
        self.config, self.every_n_epochs, self.at_fit_end = config, every_n_epochs, at_fit_end
        self.epoch_n_images = epoch_n_images
        self._teacher_model: Teacher | None = None

    def _run(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        config: EvaluationConfig,
        prefix: str,
    ) -> None:
        """Evaluate on global rank zero and log under `prefix` (the other ranks wait)."""
        work = lambda: self._evaluate_and_log(trainer, pl_module, config, prefix)  # noqa: E731
        run_on_rank_zero(trainer, "clt_evaluation", work)

    def _evaluate_and_log(self, trainer, pl_module, config, prefix) -> None:  # as `_run`
        with torch.random.fork_rng(devices=_cuda_devices(pl_module)):
            payloads = self._evaluate(trainer, pl_module, config)
        folder = Path(config.output_dir)
        scalars = dashboard.scalar_metrics(payloads, prefix)
        scalars[f"{prefix}/epoch"] = float(trainer.current_epoch)
        scalars.update(dashboard.dead_latent_metrics(pl_module.clt.sparsifier.dead_mask(), prefix))
        panels = {}
        if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            panels = dashboard.wandb_panels(payloads, folder, prefix)
        dashboard.log_evaluation(trainer.loggers, scalars, panels, trainer.global_step)

    def _evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, config: EvaluationConfig
    ) -> dict[str, Any]:
        if self._teacher_model is None:  # built once per fit, kept for later epochs
            self._teacher_model = _teacher(trainer, pl_module)
        teacher = self._teacher_model.to(pl_module.device)
        dataset = build_dataset(trainer.datamodule.dataset_config, "val", teacher.preprocess)
        was_training = pl_module.training
        try:
            return run_suite(
                teacher,
                pl_module.clt,
                dataset,
                list(dataset.class_names),
                _run_info(trainer),
                config,
                config.output_dir,
                _probe_train_split(trainer, teacher),
            )
        finally:
            pl_module.train(was_training)

    def _folder(self, trainer: L.Trainer, subdir: str) -> str:
        return str(Path(trainer.default_root_dir) / subdir)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            config = replace(
                self.config,
                n_images=self.epoch_n_images,
                output_dir=self._folder(trainer, f"evaluation/epoch_{epoch:02d}"),
            )
            self._run(trainer, pl_module, config, "eval")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end:
            output_dir = self.config.output_dir or self._folder(trainer, "evaluation")
            self._run(trainer, pl_module, replace(self.config, output_dir=output_dir), "eval_full")


def _cuda_devices(pl_module: L.LightningModule) -> list[int]:
    """The CUDA device whose RNG `fork_rng` must save (none on CPU)."""
    device = pl_module.device
    return [device.index or 0] if device.type == "cuda" else []


class RetrievalCallback(Callback):
    """At fit end, build the per-layer retrieval indexes and log grids for fixed images.

    Args:
        query_indices: Validation images whose grids are written and logged.
        k: Neighbours per layer.
        aggregation: "cls", "patches" or "all" (W&B key `retrieval/grids/<aggregation>`).
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

    @property
    def state_key(self) -> str:
        """One per aggregation, so a config may hold a [CLS] and a patch retrieval."""
        return f"{type(self).__qualname__}[aggregation={self.aggregation}]"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_on_rank_zero(trainer, "clt_retrieval", lambda: self._build_and_log(trainer, pl_module))

    def _build_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from clt_lightning.evaluation.retrieval import build_and_query

        teacher = _teacher(trainer, pl_module)
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
                captions = [f"query {i}" for i in self.query_indices]
                key = f"retrieval/grids/{self.aggregation}"
                logger.log_image(key, grids, step=trainer.global_step, caption=captions)


def _probe_train_split(trainer: L.Trainer, teacher: Any) -> Any:
    """The train split a vision-only teacher's linear probe is fit on (None with text)."""
    if getattr(teacher, "has_text_tower", True):
        return None
    return build_dataset(trainer.datamodule.dataset_config, "train", teacher.preprocess)
