"""Loggers: a CSV log always, and W&B that goes offline by itself without credentials.

W&B must never wait on a network that is not there: `AutoWandbLogger` switches to offline
mode unless credentials exist (`WANDB_API_KEY`, or an api.wandb.ai entry in ~/.netrc) and
the user has not set `WANDB_MODE` themselves. Offline runs can be uploaded later with
`wandb sync <run folder>/wandb/offline-run-*`.

The CSV log is kept across `clt fit --ckpt_path last` (`ResumableCSVLogger`): Lightning's
CSVLogger deletes `metrics.csv` when it starts in a non-empty folder. A resumed run starts
a new W&B run (offline runs are synced one by one); the CSV holds the whole history.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from clt_lightning.errors import DiskSpaceError
from clt_lightning.files import is_disk_full

log = logging.getLogger(__name__)


def wandb_credentials_available() -> bool:
    """Whether W&B could authenticate without asking (env key or a ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.path.expanduser("~/.netrc")).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


class AutoWandbLogger(WandbLogger):
    """WandbLogger that is offline unless credentials exist or WANDB_MODE says otherwise.

    Args:
        name: Run name shown in W&B.
        save_dir: Folder for the local W&B files (the run folder).
        project: W&B project.
        offline: Force offline (True) or online (False); None decides from the credentials.
        **kwargs: Passed to `WandbLogger`.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str = "clt-lightning",
        offline: bool | None = None,
        **kwargs,
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE")
            offline = mode in ("offline", "dryrun", "disabled") or (
                mode is None and not wandb_credentials_available()
            )
            if offline and mode is None:
                log.info("W&B: no credentials found, logging offline into %s", save_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("settings", _quiet_settings())
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, **kwargs)


class _KeepingExperimentWriter(ExperimentWriter):
    """ExperimentWriter that keeps an existing metrics.csv instead of deleting it.

    Lightning's writer deletes `metrics.csv` when it starts in a non-empty folder, so
    `clt fit --ckpt_path last` would lose every number logged before the interruption.
    This one keeps the old rows whose step is below the first step the new run logs (a
    resumed run replaces what it logs again; a fresh run starting at step 0 replaces all)
    and rewrites the file atomically when its header changes.
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._trim_pending = os.path.isfile(self.metrics_file_path)

    def _check_log_dir_exists(self) -> None:  # keep the file (Lightning deletes it)
        pass

    def save(self) -> None:
        try:
            if self._trim_pending and self.metrics:
                self._trim_pending = False
                first_step = min(int(row["step"]) for row in self.metrics)
                fieldnames, rows = self._read_rows()
                kept = [row for row in rows if _step_of(row) < first_step]
                self.metrics_keys = sorted(set(fieldnames) | set(self.metrics_keys))
                self._write_rows(self.metrics_keys, kept)
            super().save()
        except OSError as error:  # name the file (a write's ENOSPC carries no file name)
            if not is_disk_full(error):
                raise
            raise DiskSpaceError(
                f"no space left on the device while writing {self.metrics_file_path}; free "
                "some space and resume with `clt fit --config ... --ckpt_path last`"
            ) from error

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write_rows(fieldnames, self._read_rows()[1])

    def _read_rows(self) -> tuple[list[str], list[dict[str, Any]]]:
        try:
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                return list(reader.fieldnames or []), rows
        except (FileNotFoundError, csv.Error, UnicodeDecodeError) as error:
            log.warning("not keeping %s: %s", self.metrics_file_path, error)
            return [], []

    def _write_rows(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv atomically (temp file in the same folder, os.replace)."""
        tmp = f"{self.metrics_file_path}.tmp"
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.metrics_file_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _step_of(row: dict[str, Any]) -> float:
    """The step of a metrics.csv row (rows without one sort last and are dropped)."""
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives `clt fit --ckpt_path last` (see the writer)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def _quiet_settings():
    import wandb

    return wandb.Settings(silent=True, x_disable_stats=True, init_timeout=30)


def default_loggers(root_dir: str | Path, run_name: str | None = None) -> list[Logger]:
    """The loggers used when the config says `trainer.logger: true`.

    Args:
        root_dir: The run folder (trainer.default_root_dir).
        run_name: Name for W&B; defaults to the run folder's name.

    Returns:
        [ResumableCSVLogger writing `root_dir/metrics.csv`, AutoWandbLogger writing
        `root_dir/wandb`].
    """
    root = Path(root_dir)
    name = run_name or root.resolve().name
    return [
        ResumableCSVLogger(save_dir=str(root), name="", version=""),
        AutoWandbLogger(name=name, save_dir=str(root)),
    ]
