"""Tiny `clt` runs for the integration tests, and ways to stop a child process on cue.

- `write_config` writes a run YAML for the tiny open_clip teacher (3 layers, d=32, 17
  tokens) on scikit-learn digits: a `clt fit` of it takes a few seconds on one core.
- `run_cli` runs `clt_lightning.cli.main` in-process and returns its exit status (a
  parsing error exits through SystemExit, which it turns into the status).
- `spawn_clt` starts `python -m tests.integration.tiny_run [--pause SPEC] -- <clt args>`:
  the `clt` command in a child process, optionally with a *pause point*: when the child
  reaches it, it writes a marker file and blocks forever, so the parent can SIGKILL it at
  exactly that point (it polls for the marker; nothing depends on timing).
  Pause points in `fit` are callbacks given on the command line (`PauseAt`); the others
  patch a function of the package (`PAUSES`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_VIT = REPO / "tests" / "fixtures" / "tiny-vit.json"
MARKER_ENV = "CLT_TEST_PAUSE_MARKER"

N_IMAGES, TOKENS, N_LAYERS, D_MODEL = 16, 17, 3, 32
BATCH = 34  # 2 images' tokens; 16 train images -> 8 steps per epoch on one process


def tiny_config(cache_dir: Path, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The tiny run as a dict; `overrides` are dotted keys (`model.lr=...`, `trainer.max_epochs`)."""
    config: dict[str, Any] = {
        "seed_everything": 0,
        "model": {
            "n_latents": 64,
            "lr": 3e-3,
            "warmup_steps": 2,
            "sparsifier": {"name": "relu_topk", "k": 4},
        },
        "data": {
            "teacher": {"model_config": str(TINY_VIT)},
            "dataset": {"name": "digits", "max_images": N_IMAGES},
            "cache_dir": str(cache_dir),
            "batch_size": BATCH,
            "shuffle_buffer_shards": 2,
            "cache_dtype": "fp32",
            "images_per_shard": 2,
            "cache_batch_size": 2,
        },
        "trainer": {
            "default_root_dir": str(run_dir),
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "logger": {
                "class_path": "clt_lightning.loggers.ResumableCSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
            },
        },
        "checkpoint": {"every_n_train_steps": 0},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return config


_DELETE = object()
DELETE = _DELETE
"""Pass as an override value to remove a key."""


def write_config(path: Path, cache_dir: Path, run_dir: Path, **overrides: Any) -> Path:
    """Write `tiny_config(...)` as YAML to `path` and return it."""
    path.write_text(yaml.safe_dump(tiny_config(cache_dir, run_dir, **overrides), sort_keys=False))
    return path


def run_cli(args: list[str]) -> int:
    """`clt_lightning.cli.main(args)` in-process; the exit status also for parse errors."""
    from clt_lightning.cli import main

    try:
        return main(args)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)


def quiet_cli(args: list[str]) -> tuple[int, str]:
    """`run_cli` with stdout and stderr captured: (status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli(args)
    return code, err.getvalue()


_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK",
                     "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")  # fmt: skip


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child `clt`: offline, one thread, and no launcher variables
    left over from an in-process run (a child would take them for its own rank)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def spawn_clt(
    args: list[str], log: Path, pause: str | None = None, marker: Path | None = None
) -> subprocess.Popen:
    """Start `clt <args>` in a child process (stdout and stderr to `log`).

    Args:
        args: The clt arguments (`["fit", "--config", ...]`).
        log: File receiving the child's output.
        pause: Name of a pause point in `PAUSES` (non-fit commands), or None.
        marker: File the pause point creates before blocking.
    """
    command = [sys.executable, "-m", "tests.integration.tiny_run"]
    if pause is not None:
        command += ["--pause", pause]
    env = child_env(**({MARKER_ENV: str(marker)} if marker is not None else {}))
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*command, "--", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(
    condition: Callable[[], bool], child: subprocess.Popen, log: Path, timeout: float = 600
) -> None:
    """Poll `condition` until true; fail if the child ends first (or after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"child ended ({child.returncode}) early:\n{_tail(log)}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"timed out waiting for the child:\n{_tail(log)}")
        time.sleep(0.01)  # polling interval, not a timing assumption


def kill(child: subprocess.Popen) -> int:
    """SIGKILL the child (it is ours) and reap it; returns its status."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGKILL)
    return child.wait()


def finish(child: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    """Wait for the child to end by itself; its status."""
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(child)
        raise AssertionError(f"child did not finish:\n{_tail(log)}") from None


def _tail(log: Path, n: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-n:]
    return ""


def load_state(ckpt: Path) -> dict[str, Any]:
    """The state_dict of a Lightning checkpoint (weights-only load)."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


# ----------------------------------------------------------------------------- pause points
def _block(marker: str | os.PathLike | None = None) -> None:
    """Create the marker file, then wait to be killed."""
    path = Path(marker or os.environ[MARKER_ENV])
    path.write_text(str(os.getpid()))
    while True:
        time.sleep(3600)


try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class PauseAt(Callback):
    """Block a child `clt fit` at a chosen point (add with `--trainer.callbacks+=`).

    Args:
        marker: File created when the point is reached.
        hook: "train_batch" (before a training batch), "validation_batch" (before a
            validation batch) or "checkpoint_write" (half-way through writing the
            n-th checkpoint file, `batch` = n, 0-based).
        epoch: Epoch of the point (train_batch / validation_batch).
        batch: Batch index within the epoch, or the checkpoint number.
        until: "kill" blocks until killed; "sigterm" (train_batch only) waits until
            Lightning has seen a SIGTERM, then lets the batch train.
    """

    def __init__(
        self,
        marker: str,
        hook: str = "train_batch",
        epoch: int = 0,
        batch: int = 0,
        until: str = "kill",
    ):
        self.marker, self.hook, self.epoch, self.batch = marker, hook, epoch, batch
        self.until = until
        self._saves = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.hook == "train_batch" and (trainer.current_epoch, batch_idx) == (
            self.epoch,
            self.batch,
        ):
            if self.until == "sigterm":  # wait for Lightning's SIGTERM handler, then go on
                Path(self.marker).write_text(str(os.getpid()))
                while not trainer.received_sigterm:
                    time.sleep(0.01)  # polling interval, not a timing assumption
                return
            _block(self.marker)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.hook == "validation_batch" and (trainer.current_epoch, batch_idx) == (
            self.epoch,
            self.batch,
        ):
            _block(self.marker)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.hook == "checkpoint_write":
            import clt_lightning.checkpointing as checkpointing

            checkpointing.torch = _HalfWriteTorch(self)


class StopAt(Callback):
    """Raise `KeyboardInterrupt` (Ctrl+C) or a `RuntimeError` (a crash) before a chosen
    training batch (add with `trainer.callbacks`).

    Args:
        epoch: Epoch of the batch.
        batch: Batch index within the epoch.
        error: "interrupt" or "crash".
    """

    def __init__(self, epoch: int, batch: int, error: str = "interrupt") -> None:
        self.epoch, self.batch, self.error = epoch, batch, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            if self.error == "interrupt":
                raise KeyboardInterrupt
            raise RuntimeError(f"crash before batch {batch_idx} of epoch {self.epoch}")


try:
    from lightning.pytorch.callbacks import Timer
except ImportError:  # pragma: no cover
    Timer = object  # type: ignore[assignment,misc]


class BatchClock(Timer):
    """Lightning's `Timer` (what `trainer.max_time` adds) on a clock that advances one
    second per training batch, so `duration` seconds stop fit after exactly that many
    batches (the real clock would make the stop point depend on the machine's speed)."""

    def __init__(self, duration: str) -> None:
        super().__init__(duration=duration, interval="step")
        self._batches = 0

    def time_elapsed(self, stage: str = "train") -> float:
        return float(self._batches)

    def on_train_batch_end(self, trainer, *args: Any, **kwargs: Any) -> None:
        self._batches += 1
        super().on_train_batch_end(trainer, *args, **kwargs)


class _HalfWriteTorch:
    """Stands in for `torch` inside clt_lightning.checkpointing: the n-th `save` writes
    half of the checkpoint's bytes into the (temp) file, flushes them and blocks."""

    def __init__(self, pause: PauseAt) -> None:
        import torch

        self._torch, self._pause = torch, pause

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def save(self, obj: Any, f: Any) -> None:
        if self._pause._saves != self._pause.batch:
            self._pause._saves += 1
            self._torch.save(obj, f)
            return
        buffer = io.BytesIO()
        self._torch.save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _block(self._pause.marker)


def _pause_after_manifest(n_shards: int) -> None:
    """`clt cache`: block once a committed manifest lists `n_shards` shards of `train`."""
    import clt_lightning.data.cache_format as cache

    real = cache.write_manifest

    def write_manifest(out_dir: Path, manifest: dict) -> None:
        real(out_dir, manifest)
        if Path(out_dir).name == "train" and len(manifest["shards"]) >= n_shards:
            _block()

    cache.write_manifest = write_manifest


def _pause_after_atomic_writes(module: str, n_writes: int) -> None:
    """Block after the module's `atomic_write_bytes` committed `n_writes` files."""
    import importlib

    target = importlib.import_module(module)
    real = target.atomic_write_bytes
    count = [0]

    def write(path: Any, data: bytes) -> Any:
        result = real(path, data)
        count[0] += 1
        if count[0] >= n_writes:
            _block()
        return result

    target.atomic_write_bytes = write


def _pause_in_index_write() -> None:
    """`clt retrieve`: block after the first per-layer index file is committed."""
    import clt_lightning.evaluation.retrieval_index as retrieval

    real = retrieval.write_layer_index

    def write(index: Any, path: Path) -> str:
        digest = real(index, path)
        _block()
        return digest

    retrieval.write_layer_index = write


def _pause_between_folder_renames() -> None:
    """`files.commit_folder`: block after the old folder moved aside, before the new one
    takes its place (the one moment the output folder does not exist)."""
    import clt_lightning.files as files

    def install(staging: Path, path: Path) -> None:
        _block()

    files.install_folder = install


PAUSES: dict[str, Callable[[], None]] = {
    "cache_after_2_shards": lambda: _pause_after_manifest(2),
    "evaluate_after_1_file": lambda: _pause_after_atomic_writes(
        "clt_lightning.evaluation.undefined",
        1,  # the suite's JSON files (`write_json`)
    ),
    "retrieve_after_1_index": _pause_in_index_write,
    "export_after_weights": lambda: _pause_after_atomic_writes(
        "clt_lightning.models.clt_export", 1
    ),
    "between_folder_renames": _pause_between_folder_renames,
}


def _main(argv: list[str]) -> int:
    split = argv.index("--")
    options, clt_args = argv[:split], argv[split + 1 :]
    if options[:1] == ["--pause"]:
        PAUSES[options[1]]()
    from clt_lightning.cli import main

    return main(clt_args)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of `<run>/metrics.csv`."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_values(rows: list[dict[str, str]], prefix: str) -> dict[str, float]:
    """The last logged value of every column starting with `prefix`."""
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and value not in ("", None):
                out[key] = float(value)
    return out


def manifest_shards(cache_split: Path) -> int:
    """Shards a cache manifest lists (0 while there is none)."""
    try:
        return len(json.loads((cache_split / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
