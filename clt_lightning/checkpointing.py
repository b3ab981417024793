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
- Reading (`--ckpt_path`) is weights-only unless the user asks otherwise: a checkpoint is
  never a way to run code. A missing, truncated or foreign file is a `CLTError` naming it,
  not a traceback from inside torch.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from clt_lightning.errors import (
    CheckpointMismatchError,
    ConfigError,
    DataNotFoundError,
)
from clt_lightning.files import atomic_write_stream, temp_path  # noqa: F401 (temp_path: API)

log = logging.getLogger(__name__)


class UnreadableCheckpointError(CheckpointMismatchError):
    """A checkpoint file that is truncated, not a torch checkpoint, or not weights-only."""


CHECKPOINT_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError)
"""What torch.load raises for a truncated, foreign or not-weights-only file."""


def unreadable_checkpoint(path: str | Path, error: BaseException) -> UnreadableCheckpointError:
    """The error for a checkpoint torch.load cannot read (first line of torch's reason)."""
    reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    return UnreadableCheckpointError(
        f"cannot read the checkpoint {path}: {type(error).__name__}: {reason}. It is truncated "
        "or not a checkpoint written by `clt fit`; point --ckpt_path at another file"
    )


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
        if not _is_local_file_protocol(path):
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
        """Load a checkpoint, weights-only unless `weights_only=False` is asked for.

        Raises:
            DataNotFoundError: No file at `path`.
            UnreadableCheckpointError: Truncated, not a checkpoint, or holding objects a
                weights-only load refuses (never unpickled).
        """
        if _is_local_file_protocol(path) and not Path(path).is_file():
            raise DataNotFoundError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(
                path, map_location, True if weights_only is None else weights_only
            )
        except CHECKPOINT_READ_ERRORS as error:
            raise unreadable_checkpoint(path, error) from error


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
        **kwargs: Passed to ModelCheckpoint.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 1000,
        save_top_k: int = 0,
        save_last: bool = True,
        **kwargs: Any,
    ) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(
                f"checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_last=save_last,
            **kwargs,
        )

    def _save_last_now(self, trainer: L.Trainer) -> None:
        """Write last.ckpt unless this global step is already saved."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

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
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_now(trainer)


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
