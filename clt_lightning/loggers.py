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

import csv
import io
import logging
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from clt_lightning.errors import DiskSpaceError
from clt_lightning.files import atomic_write_stream, is_disk_full

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


def read_metrics_csv(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The header and rows of a metrics.csv; ([], []) when it is missing or unreadable."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (FileNotFoundError, csv.Error, UnicodeDecodeError) as error:
        log.warning("not keeping %s: %s", path, error)
        return [], []


def write_metrics_csv(path: str | Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    """Replace metrics.csv atomically (temp file in the same folder, fsync, os.replace).

    Raises:
        DiskSpaceError: The device filled up (names the file; the old file is intact).
    """
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_stream(
        Path(path),
        lambda f: f.write(text.getvalue().encode()),
        disk_full=f"{path}; free some space and resume with `clt fit --config ... "
        "--ckpt_path last`",
    )


def step_of(row: dict[str, Any]) -> float:
    """The step of a metrics.csv row (rows without one sort last and are dropped)."""
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives `clt fit --ckpt_path last`.

    Lightning's CSV writer deletes `metrics.csv` when it starts in a non-empty folder, so
    a resumed run would lose every number logged before the interruption. Before the
    writer starts, this logger renames the file to `metrics.csv.resume` (atomic; a run
    killed before its first save finds it there next time); the first save writes back
    the old rows whose step is below the first step the new run logs (a resumed run
    replaces what it logs again; a fresh run starting at step 0 replaces all), then
    appends. A header change rewrites the file atomically. A file that never got new
    rows is put back when the logger finalizes.
    """

    kept_path: Path | bool | None = None
    """`metrics.csv.resume` while the previous rows wait for the first save; None before
    the writer is first used; False once there is nothing (more) to keep."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self.kept_path is None:  # first use: before Lightning's writer deletes the file
            self.kept_path = set_aside(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE)
        with warnings.catch_warnings():  # "previous log files ... will be deleted": not here
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            return super().experiment

    @rank_zero_only
    def save(self) -> None:
        writer = self.experiment
        try:  # DiskSpaceError (an OSError) from our own writes passes through unchanged
            if writer.metrics:
                self.write_back_kept_rows(writer)
                self.widen_header(writer)
            super().save()
        except OSError as error:  # name the file (a write's ENOSPC carries no file name)
            if isinstance(error, DiskSpaceError) or not is_disk_full(error):
                raise
            raise DiskSpaceError(
                f"no space left on the device while writing {writer.metrics_file_path}; free "
                "some space and resume with `clt fit --config ... --ckpt_path last`"
            ) from error

    def write_back_kept_rows(self, writer: ExperimentWriter) -> None:
        """First save: metrics.csv = the kept rows below the first new step, old header
        and new keys; the set-aside file is then removed."""
        kept_path = self.kept_path
        if not kept_path:
            return
        fieldnames, rows = read_metrics_csv(kept_path) if kept_path.is_file() else ([], [])
        first_step = min(int(row["step"]) for row in writer.metrics)
        kept = [row for row in rows if step_of(row) < first_step]
        new_keys = set().union(*writer.metrics)
        writer.metrics_keys = sorted(set(fieldnames) | set(writer.metrics_keys) | new_keys)
        write_metrics_csv(writer.metrics_file_path, writer.metrics_keys, kept)
        kept_path.unlink(missing_ok=True)
        self.kept_path = False

    def widen_header(self, writer: ExperimentWriter) -> None:
        """Rewrite metrics.csv atomically when the pending rows bring new keys (Lightning's
        writer would rewrite it in place, which a kill can cut short)."""
        new_keys = set().union(*writer.metrics) - set(writer.metrics_keys)
        if not new_keys or not os.path.isfile(writer.metrics_file_path):
            return
        writer.metrics_keys = sorted(set(writer.metrics_keys) | new_keys)
        rows = read_metrics_csv(writer.metrics_file_path)[1]
        write_metrics_csv(writer.metrics_file_path, writer.metrics_keys, rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        kept_path = self.kept_path
        if kept_path and kept_path.is_file():  # no new rows: the old file goes back
            os.replace(kept_path, kept_path.with_suffix(""))
            self.kept_path = False


def set_aside(path: Path) -> Path | bool:
    """Rename metrics.csv to `metrics.csv.resume` (kept for the first save); returns that
    path, or False when there is nothing to keep. A `.resume` file left by a run killed
    before its first save is used as is; one beside a newer metrics.csv is stale."""
    kept = path.with_name(path.name + ".resume")
    if path.is_file():
        os.replace(path, kept)
    return kept if kept.is_file() else False


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
