"""The `clt` command: LightningCLI for fit/validate/test plus cache, evaluate, retrieve, export.

One YAML describes a run (`model:`, `data:`, `trainer:`) and every subcommand reads the same
file, so the teacher and dataset are written down once:

    clt cache    --config configs/cifar100_b32_relu_topk.yaml      # write activation caches
    clt fit      --config configs/cifar100_b32_relu_topk.yaml      # train the CLT
    clt evaluate --config configs/cifar100_b32_relu_topk.yaml --ckpt_path runs/.../last.ckpt
    clt retrieve --config ... --ckpt_path ... --retrieval.query_index 3
    clt export   --config ... --ckpt_path ... --output_dir exported/
    clt features --config ... --ckpt_path ...              # latent store + static site

The extra subcommands are methods of `CLTTrainer`, which is how LightningCLI builds a
subcommand parser from a signature; they only coordinate, the work lives in the package.
Errors caused by the user (`CLTError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402
from lightning.pytorch.utilities.exceptions import (  # noqa: E402
    MisconfigurationException,
    SIGTERMException,
)

from clt_lightning import commands  # noqa: E402
from clt_lightning.checkpoint_contents import refuse_unsafe_loading  # noqa: E402
from clt_lightning.checkpointing import (  # noqa: E402
    AtomicCheckpointIO,
    CLTCheckpoint,
    read_checkpoint,
)
from clt_lightning.data.datamodule import ActivationDataModule  # noqa: E402
from clt_lightning.errors import CLTError, ConfigError  # noqa: E402
from clt_lightning.evaluation.suite import EvaluationConfig  # noqa: E402
from clt_lightning.features.collect import FeaturesConfig  # noqa: E402
from clt_lightning.files import (  # noqa: E402
    is_disk_full,
    require_folder,
    require_writable_folder,
)
from clt_lightning.loggers import default_loggers  # noqa: E402
from clt_lightning.messages import user_message  # noqa: E402
from clt_lightning.module import CLTModule, check_training_precision  # noqa: E402

log = logging.getLogger(__name__)


class CLTTrainer(Trainer):
    """Lightning Trainer with the project's extra subcommands as methods."""

    def cache(self, model: CLTModule, datamodule: ActivationDataModule) -> None:
        """Write the train and val activation caches described by the `data:` section.

        Resumes an interrupted cache; refuses a cache made by another teacher or dataset.
        """
        datamodule.prepare_cache()

    def evaluate(
        self,
        model: CLTModule,
        datamodule: ActivationDataModule,
        ckpt_path: str,
        evaluation: EvaluationConfig = EvaluationConfig(),
    ) -> None:
        """Cascaded replacement, faithfulness, contributions, ablations and reconstruction.

        Args:
            ckpt_path: Checkpoint written by `clt fit`.
            evaluation: What to compute and where to write it.
        """
        commands.evaluate(
            datamodule.teacher_config, datamodule.dataset_config, ckpt_path, evaluation
        )

    def retrieve(
        self,
        model: CLTModule,
        datamodule: ActivationDataModule,
        ckpt_path: str,
        retrieval: commands.RetrievalConfig = commands.RetrievalConfig(),
    ) -> None:
        """Layer-wise retrieval: per-layer FAISS indexes of sparse codes, and a query grid.

        Args:
            ckpt_path: Checkpoint written by `clt fit`.
            retrieval: Index and query settings.
        """
        commands.retrieve(
            datamodule.teacher_config, datamodule.dataset_config, ckpt_path, retrieval
        )

    def export(
        self,
        model: CLTModule,
        datamodule: ActivationDataModule,
        ckpt_path: str,
        output_dir: str,
        format: Literal["clt-lightning", "circuit-tracer"] = "clt-lightning",  # noqa: A002
    ) -> None:
        """Write a standalone CLT that works on raw activations.

        Args:
            ckpt_path: Checkpoint written by `clt fit`.
            output_dir: Output folder.
            format: "clt-lightning" (config.json + clt.safetensors) or "circuit-tracer"
                (its per-layer W_enc_{i}/W_dec_{i} files + config.yaml; jumprelu and
                batch_topk CLTs only).
        """
        require_folder(output_dir, "output_dir")
        commands.export(datamodule.teacher_config, ckpt_path, output_dir, format)
        log.info("exported %s to %s (%s)", ckpt_path, output_dir, format)

    def features(
        self,
        model: CLTModule,
        datamodule: ActivationDataModule,
        ckpt_path: str,
        latents: FeaturesConfig = FeaturesConfig(),
    ) -> None:
        """Latent dashboards: top images, frequencies, write profiles, a static site.

        Args:
            ckpt_path: Checkpoint written by `clt fit`.
            latents: What to compute and where to write it (docs/features.md).
        """
        from clt_lightning.features.collect import run_command

        folder = run_command(
            datamodule.teacher_config, datamodule.dataset_config, ckpt_path, latents
        )
        print(f"latent site: {folder / 'index.html'}")


class CLTLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults and subcommands."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # The extra subcommands are Trainer methods taking `model` and `datamodule`, unused
        # by most, because LightningCLI builds the model, the datamodule and the Trainer for
        # every subcommand and passes `model=` and `datamodule=` to every subcommand method
        # (2.6: `LightningCLI._prepare_subcommand_kwargs`); a plain function cannot be a
        # subcommand. Each set names the arguments the subcommand's parser skips.
        commands = LightningCLI.subcommands()
        commands.update(
            cache={"model", "datamodule"},
            evaluate={"model", "datamodule"},
            retrieve={"model", "datamodule"},
            export={"model", "datamodule"},
            features={"model", "datamodule"},
        )
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """`checkpoint:` configures the default last.ckpt writer (`--ckpt_path last` resumes).

        Parsed, not instantiated: `instantiate_trainer` builds the callback only when the
        run checkpoints and brings no ModelCheckpoint of its own.
        """
        parser.add_class_arguments(
            CLTCheckpoint, "checkpoint", fail_untyped=False, instantiate=False, sub_configs=True
        )

    def section(self, key: str) -> Any:
        """The running subcommand's instantiated `key` section (`config_init`), or None."""
        config = self.config_init
        if self.subcommand is not None:
            config = config.get(self.subcommand, config)
        return config.get(key)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """A config file that is not text is a parse error (usage + exit 2), not a traceback."""
        try:
            super().parse_arguments(parser, args)
        except UnicodeDecodeError as error:
            parser.error(f"a config file is not UTF-8 text ({error})")
        check_ckpt_path(self.config)

    def before_fit(self) -> None:
        """Refuse a new fit over an earlier run's checkpoints before anything is written
        (the saved config.yaml included); see `CLTCheckpoint.check_fresh_start`."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        for callback in self.trainer.callbacks:
            if isinstance(callback, CLTCheckpoint):
                callback.check_fresh_start(self.trainer, ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer with the project's defaults, refusing bad settings first.

        A training precision with 16-bit weights is refused before Lightning builds it;
        `trainer.logger: true` becomes the run folder's CSV and W&B loggers; the default
        `checkpoint:` callback is added unless checkpointing is off or the config brings
        its own ModelCheckpoint; checkpoints are written atomically unless a CheckpointIO
        is configured.

        Raises:
            ConfigError: Settings the Trainer or `check_trainer_settings` refuse.
        """
        config = self.section("trainer") or {}
        if self.subcommand == "fit":  # before Lightning builds (or imports) the precision
            check_training_precision(config.get("precision"))
        if config.get("logger") in (None, True) and self.subcommand in ("fit", "validate", "test"):
            root = config.get("default_root_dir") or "runs/default"
            kwargs["logger"] = default_loggers(root)
        callbacks = as_list(config.get("callbacks"))
        checkpoint = self.section("checkpoint")
        if checkpoint is not None and default_checkpoint_wanted(config, callbacks):
            callbacks.append(CLTCheckpoint(**checkpoint.as_dict()))
        kwargs["callbacks"] = callbacks
        check_trainer_settings(config, run_folder=self.subcommand == "fit")
        plugins = as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as error:  # Trainer(...) checks
            raise ConfigError(f"invalid trainer settings: {error}") from error


def as_list(value: Any) -> list[Any]:
    """A trainer setting that takes one object or a list of them, as a new list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def default_checkpoint_wanted(config: Any, callbacks: list[Callback]) -> bool:
    """Whether the default `checkpoint:` callback joins the Trainer: checkpointing is on
    and the configured callbacks hold no ModelCheckpoint of their own."""
    if config.get("enable_checkpointing") is False:
        return False
    return not any(isinstance(c, ModelCheckpoint) for c in callbacks)


def check_ckpt_path(config: Any) -> None:
    """Before LightningCLI reads `--ckpt_path`'s hyperparameters: refuse unsafe loading and
    any file that is not a `clt fit` checkpoint (a cheap, memory-mapped look), naming it.
    A missing file is left to the subcommand, which names it after the settings are checked
    (settings errors come first: they need no file)."""
    subcommand = config.get("subcommand")
    if not subcommand:
        return
    settings = config[subcommand]
    refuse_unsafe_loading(settings.get("weights_only"))
    ckpt_path = settings.get("ckpt_path")
    special = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
    if ckpt_path and not special and "://" not in str(ckpt_path) and Path(ckpt_path).exists():
        read_checkpoint(ckpt_path, mmap=True)


def check_trainer_settings(config: dict[str, Any], run_folder: bool = False) -> None:
    """Refuse trainer values Lightning would silently reinterpret, before any work.

    Args:
        config: The trainer's init arguments.
        run_folder: Also check that `default_root_dir` can be written (`clt fit`).

    Raises:
        ConfigError: `gradient_clip_val` <= 0 (Lightning turns clipping off), or a
            `default_root_dir` that is a file (or, with run_folder, cannot be written).
    """
    clip = config.get("gradient_clip_val")
    if clip is not None and not clip > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val must be > 0 (the largest gradient norm or value) or "
            f"null for no clipping, got {clip}"
        )
    root = config.get("default_root_dir")
    if root and "://" in str(root):  # a remote folder (s3://, gs://): Lightning's fsspec
        return
    if root and run_folder:
        require_writable_folder(root, "trainer.default_root_dir")
    elif root:
        require_folder(root, "trainer.default_root_dir")


def build_cli(args: list[str] | None = None, run: bool = True) -> CLTLightningCLI:
    """Build (and by default run) the CLI; `args` replaces sys.argv[1:] (for tests)."""
    return CLTLightningCLI(
        CLTModule,
        ActivationDataModule,
        trainer_class=CLTTrainer,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,  # reproducible by default; the saved config.yaml records it
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": False},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> int:
    """Entry point of the `clt` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build_cli(args)
    except (CLTError, OSError) as error:  # ours, or any file-system error: one line, no trace
        print(f"clt: error: {user_message(error)}", file=sys.stderr)
        return 2
    except SIGTERMException:  # Lightning stopped fit after the batch running at SIGTERM
        print(
            "clt: stopped by SIGTERM; the checkpoint holds every batch trained: resume with "
            "`clt fit --config ... --ckpt_path last`",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except RuntimeError as error:  # a full disk seen by a C++ writer (torch zip, FAISS)
        if not is_disk_full(error):
            raise
        print(f"clt: error: {user_message(error)}", file=sys.stderr)
        return 2
    finally:
        finish_wandb_run()
    return 0


def finish_wandb_run() -> None:
    """Close the W&B run a command opened, so the next in-process command gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


if __name__ == "__main__":
    sys.exit(main())
