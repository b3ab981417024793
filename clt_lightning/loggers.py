"""Loggers: a CSV log always, and W&B that goes offline by itself without credentials.

W&B must never wait on a network that is not there: `AutoWandbLogger` switches to offline
mode unless credentials exist (`WANDB_API_KEY`, or an api.wandb.ai entry in ~/.netrc) and
the user has not set `WANDB_MODE` themselves. Offline runs can be uploaded later with
`wandb sync <run folder>/wandb/offline-run-*`.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

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


def _quiet_settings():
    import wandb

    return wandb.Settings(silent=True, x_disable_stats=True, init_timeout=30)


def default_loggers(root_dir: str | Path, run_name: str | None = None) -> list[Logger]:
    """The loggers used when the config says `trainer.logger: true`.

    Args:
        root_dir: The run folder (trainer.default_root_dir).
        run_name: Name for W&B; defaults to the run folder's name.

    Returns:
        [CSVLogger writing `root_dir/metrics.csv`, AutoWandbLogger writing `root_dir/wandb`].
    """
    root = Path(root_dir)
    name = run_name or root.resolve().name
    return [
        CSVLogger(save_dir=str(root), name="", version=""),
        AutoWandbLogger(name=name, save_dir=str(root)),
    ]
