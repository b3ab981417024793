"""`FeaturesCallback`: build the latent store and site when `fit` ends (opt-in).

Off in the paper configs: it costs one more pass over the chosen split (about a teacher
forward plus a CLT encode per image). Add it to a run's `trainer.callbacks`:

    trainer:
      callbacks:
        - class_path: clt_lightning.features.callback.FeaturesCallback
          init_args: {config: {max_images: 2000}}
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from clt_lightning.errors import ConfigError
from clt_lightning.features.collect import FeaturesConfig, build_features

log = logging.getLogger(__name__)


class FeaturesCallback(Callback):
    """At fit end, write `<run folder>/features` (store + `index.html`) on rank zero.

    The folder belongs to the run, so a later fit (a resumed run: another CLT) replaces
    its store instead of being refused (`overwrite` is forced on).

    Args:
        config: What to compute; `output_dir` defaults to `<run folder>/features`.
    """

    def __init__(self, config: FeaturesConfig = FeaturesConfig(max_images=2000)) -> None:
        self.config = config

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            self._build(trainer, pl_module)
        trainer.strategy.barrier("clt_features")

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from clt_lightning.data.datasets import build_dataset
        from clt_lightning.teacher import Teacher

        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "teacher_config"):
            raise ConfigError("FeaturesCallback needs an ActivationDataModule (data: section)")
        teacher = Teacher(datamodule.teacher_config).to(pl_module.device)
        dataset = build_dataset(datamodule.dataset_config, self.config.split, teacher.preprocess)
        folder = Path(self.config.output_dir or Path(trainer.default_root_dir) / "features")
        was_training = pl_module.training
        build_features(
            teacher,
            pl_module.clt,
            dataset,
            datamodule.dataset_config.name,
            dataclasses.replace(self.config, overwrite=True),
            folder,
        )
        pl_module.train(was_training)
        log.info("latent site: %s", folder / "index.html")
