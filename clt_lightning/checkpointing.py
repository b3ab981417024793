"""Checkpoints that survive a kill at any moment, and a `last.ckpt` that is always current.

Design decisions:

- `AtomicCheckpointIO` writes a checkpoint to a temp file *in the checkpoint's own folder*,
  fsyncs it and `os.replace`s it over the target, so a SIGKILL, a crash or a full disk
  during a save leaves the previous file intact. Lightning's default (`_atomic_save`)
  writes through an fsspec transaction whose temp file is made by `tempfile.mkstemp()` in
  the system temp folder: when that is another filesystem than the run folder (local /tmp,
  checkpoints on NFS or Lustre, the usual cluster layout) the commit is a copy into the
  target, which a kill can cut short, and the whole checkpoint is also held in memory
  once more (a ViT-B/16 CLT with AdamW states is ~10 GB). Streaming `torch.save` into the
  temp file avoids both. A full disk raises `DiskSpaceError` naming the file.
- `CLTCheckpoint` is the `ModelCheckpoint` that `clt fit` adds by default (`checkpoint:`
  section of the config): it keeps `last.ckpt` only (no top-k copies, there is no metric
  to rank by), writes it every `every_n_train_steps` optimiser steps, at every epoch end
  (where a resume is exact whatever the dataloader) and when fit ends; and after the
  last batch trained when fit stops mid-epoch (max_steps, max_time, `should_stop`,
  SIGTERM: `stops_mid_epoch`), so that the resume continues that epoch. Lightning's own
  ModelCheckpoint with `every_n_train_steps` writes neither of the last two, so its
  last.ckpt could miss the final steps of a run.
- `last.ckpt` is always the run's latest: a fit that does not resume (`--ckpt_path`) into
  a checkpoint folder that already holds checkpoints is refused in one line (resume with
  `--ckpt_path last`, or start over with `--checkpoint.overwrite true`, which deletes
  them), and the version counter is off, so there is never a `last-v1.ckpt` beside a
  stale `last.ckpt`. The CLI checks before anything is written (`before_fit`), the
  callback again at `on_fit_start` (a Trainer used from Python).
- Reading (`--ckpt_path`) is always weights-only: a checkpoint is never a way to run code,
  and `weights_only=False` is refused on every path. A missing, truncated or foreign file
  is a `CLTError` naming it, not a traceback from inside torch; what the loaded payload
  must hold is checked by `checkpoint_contents` (`read_checkpoint` is the one reader).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from clt_lightning.checkpoint_contents import (
    check_structure,
    refuse_unsafe_loading,
    sniff_checkpoint,
)
from clt_lightning.errors import (
    ConfigError,
    DataNotFoundError,
    UnreadableCheckpointError,
)
from clt_lightning.files import atomic_write_stream

log = logging.getLogger(__name__)


CHECKPOINT_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError)
"""What torch.load raises for a truncated, foreign or not-weights-only file."""


def unreadable_checkpoint(path: str | Path, error: BaseException) -> UnreadableCheckpointError:
    """The error for a checkpoint torch.load cannot read (first line of torch's reason)."""
    reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return UnreadableCheckpointError(
        f"cannot read the checkpoint {path}: {type(error).__name__}: {reason}. It is truncated "
        "or not a checkpoint written by `clt fit`; point --ckpt_path at another file"
    )


def is_local_path(path: str | Path) -> bool:
    """Whether `path` is on the local file system (no `s3://`, `gs://`, ... protocol)."""
    return get_protocol(str(path)) == "file"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes local checkpoints via a same-folder temp file.

    Remote paths (s3://, gs://, ...) keep Lightning's fsspec transaction.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write `checkpoint` to `path` atomically.

        Raises:
            DiskSpaceError: The device filled up; the previous file at `path` is intact.
        """
        if not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_stream(
            path,
            lambda f: torch.save(checkpoint, f),
            disk_full=f"the checkpoint {path}; the previous checkpoint there is intact: free "
            "some space and resume with `clt fit --config ... --ckpt_path last`",
        )

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint weights-only and check what it holds (`read_checkpoint`).

        Raises:
            ConfigError: `weights_only=False` (never unpickled).
            DataNotFoundError: No file at `path`.
            UnreadableCheckpointError: Truncated, not a checkpoint, or holding objects a
                weights-only load refuses (never unpickled).
            CheckpointMismatchError: An export, or a payload that is not a checkpoint dict
                with `state_dict` and `clt_shape`.
        """
        refuse_unsafe_loading(weights_only)
        if not is_local_path(path):
            return check_structure(path, super().load_checkpoint(path, map_location, True))
        return read_checkpoint(path, map_location)


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a local checkpoint weights-only and check its structure.

    Args:
        path: The .ckpt file.
        map_location: As for `torch.load`.
        mmap: Map the tensors instead of reading them (cheap look at a large file; falls
            back to a full read for files torch cannot map).

    Raises:
        DataNotFoundError, UnreadableCheckpointError, CheckpointMismatchError: As
            `AtomicCheckpointIO.load_checkpoint`.
    """
    if not Path(path).is_file():
        raise DataNotFoundError(f"checkpoint not found: {path} (pass --ckpt_path to a .ckpt file)")
    sniff_checkpoint(path)
    try:
        try:
            checkpoint = torch.load(path, map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            checkpoint = torch.load(path, map_location, weights_only=True)
    except CHECKPOINT_READ_ERRORS as error:
        raise unreadable_checkpoint(path, error) from error
    return check_structure(path, checkpoint)


class CLTCheckpoint(ModelCheckpoint):
    """Keep `<run>/checkpoints/last.ckpt` current: every n steps, each epoch end, fit end.

    `clt fit --ckpt_path last` resumes from it. Other arguments are ModelCheckpoint's.

    Args:
        dirpath: Folder (default: `<trainer.default_root_dir>/checkpoints`).
        every_n_train_steps: Also write last.ckpt every this many optimiser steps; 0 writes
            it only at epoch ends and when fit ends. Each write costs one checkpoint
            (weights + AdamW states: ~12 bytes per CLT parameter).
        save_top_k: Extra `epoch=..-step=..` copies to keep (0: last.ckpt only).
        save_last: Write last.ckpt (leave true: resuming needs it).
        overwrite: Start a new (not resumed) fit even though the folder holds checkpoints
            of an earlier run: its `*.ckpt` files are deleted first. Without it such a fit
            is refused (resume with `--ckpt_path last`).
        **kwargs: Passed to ModelCheckpoint (`enable_version_counter` defaults to False).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 1000,
        save_top_k: int = 0,
        save_last: bool = True,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(
                f"checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}"
            )
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_last=save_last,
            **kwargs,
        )
        self.overwrite = overwrite
        self.saved_step = 0  # global step of the last checkpoint written (0: no step yet)

    def checkpoint_dir(self, trainer: L.Trainer) -> Path:
        """The folder the checkpoints go to (before `setup` resolves `dirpath`: the
        trainer's log folder + `checkpoints`, as ModelCheckpoint resolves it)."""
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def check_fresh_start(self, trainer: L.Trainer, ckpt_path: str | Path | None) -> None:
        """Refuse a fit that would leave an earlier run's checkpoints beside its own.

        Args:
            trainer: The Trainer about to fit.
            ckpt_path: The checkpoint the fit resumes from (None: a new run).

        Raises:
            ConfigError: The folder holds `*.ckpt` files, the fit does not resume and
                `overwrite` is off (the message says how to resume or start over).
        """
        if ckpt_path is not None:
            return
        folder = self.checkpoint_dir(trainer)
        previous = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if not previous:
            return
        names = ", ".join(p.name for p in previous[:3]) + (" ..." if len(previous) > 3 else "")
        if not self.overwrite:
            raise ConfigError(
                f"{folder} already holds checkpoints of a run ({names}): resume it with "
                "`--ckpt_path last`, start over with `--checkpoint.overwrite true` (deletes "
                "them), or choose another --trainer.default_root_dir"
            )
        if trainer.is_global_zero:
            for path in previous:
                path.unlink(missing_ok=True)
            log.warning("checkpoint.overwrite: deleted the earlier run's %s in %s", names, folder)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_fresh_start(trainer, trainer.ckpt_path)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.saved_step = trainer.global_step  # every save (ours or ModelCheckpoint's)

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Write last.ckpt during fit unless a checkpoint of this global step was written.

        `trainer.save_checkpoint` calls every callback's `on_save_checkpoint`, which
        records the step: ModelCheckpoint's own saves (every n steps) count too, so a step
        is never written twice. Nothing is written before the first step (as
        ModelCheckpoint), in sanity checking, with `fast_dev_run` or outside `fit`.
        """
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self.saved_step == trainer.global_step
        ):
            return
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if stops_mid_epoch(trainer, batch_idx):
            self.save_last_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.save_last_now(trainer)  # after the epoch's validation: the end-of-epoch state

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_last_now(trainer)  # replaces ModelCheckpoint's (only if none was saved)


def stops_mid_epoch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether fit stops after this training batch with batches of the epoch left.

    Lightning ends the epoch early when `max_steps` is reached or `trainer.should_stop`
    is set (`max_time`, early stopping), and then counts that epoch as processed, so a
    checkpoint written at the epoch's end or at fit end would resume at the *next* epoch
    and never train the rest of this one. Written here instead (after the batch, while
    the epoch is still running), the checkpoint resumes mid-epoch: Lightning restores its
    loops and the train loader's state, which skips the batches already trained. After
    SIGTERM (`trainer.received_sigterm`, Lightning's preemption handling) the loop raises
    before the epoch ends, so this batch is the last chance to save, last batch or not.

    Args:
        trainer: The trainer (public attributes only).
        batch_idx: Index of the batch just trained, within the epoch.
    """
    if trainer.received_sigterm:
        return True
    last_batch = batch_idx + 1 >= trainer.num_training_batches
    max_steps = trainer.max_steps
    steps_done = max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps
    return not last_batch and (steps_done or trainer.should_stop)
