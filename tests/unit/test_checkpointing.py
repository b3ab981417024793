"""Checkpoints survive failures mid-write; last.ckpt is always the newest state; the CSV
log survives a resume."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities import cloud_io
from lightning.pytorch.callbacks import ModelCheckpoint

from clt_lightning.checkpointing import AtomicCheckpointIO, CLTCheckpoint
from clt_lightning.errors import ConfigError, DiskSpaceError
from clt_lightning.files import temp_path
from clt_lightning.loggers import ResumableCSVLogger, default_loggers
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.module import CLTModule
from tests.unit.test_module import PlantedData, make_trainer, read_metrics

STATE = {"weights": torch.arange(10_000, dtype=torch.float32), "step": 3}


def _save_then_fail(after_bytes: int, error: BaseException, real_save=torch.save):
    """A torch.save that writes `after_bytes` of the real bytes into the file, then raises."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:after_bytes])
        raise error

    return save


def _model() -> CLTModule:
    return CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="relu_topk", k=4))


@pytest.mark.parametrize(
    "error", [RuntimeError("killed in torch.save"), OSError(errno.ENOSPC, "No space left")]
)
def test_failure_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint(STATE, path)
    before = path.read_bytes()

    monkeypatch.setattr(torch, "save", _save_then_fail(len(before) // 2, error))
    expected = DiskSpaceError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected) as raised:
        io_plugin.save_checkpoint({**STATE, "step": 4}, path)
    if expected is DiskSpaceError:
        assert str(path) in str(raised.value) and "--ckpt_path last" in str(raised.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp left
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 3
    io_plugin.save_checkpoint({**STATE, "step": 5}, path)  # and it works again afterwards
    assert torch.load(path, weights_only=True)["step"] == 5


def test_temp_file_lives_next_to_the_checkpoint(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or real_replace(a, b))
    path = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(STATE, path)
    assert renames == [(temp_path(path), path)]
    assert Path(renames[0][0]).parent == path.parent  # a rename, never a cross-device copy


def test_lightning_default_commits_from_the_system_temp_folder(tmp_path, monkeypatch):
    """Why AtomicCheckpointIO exists: fsspec's local transaction stages the file in the
    system temp folder, so on a cluster (local /tmp, NFS run folder) the commit is a copy."""
    staged = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        staged.append(Path(name).parent)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    path = tmp_path / "run" / "default.ckpt"
    path.parent.mkdir()
    cloud_io._atomic_save(STATE, path)
    assert staged == [Path(tempfile.gettempdir())]
    assert staged[0] != path.parent


def test_last_ckpt_holds_the_final_step_and_each_epoch_end(tmp_path, monkeypatch):
    saved = []
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[CLTCheckpoint(every_n_train_steps=3)])
    save = trainer.save_checkpoint

    def spy(filepath, *args, **kwargs):  # every checkpoint write goes through it
        saved.append((trainer.global_step, Path(filepath).name))
        save(filepath, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", spy)
    trainer.fit(_model(), PlantedData(n_train=5))
    # steps 3, 6, 9 from the interval, 5 at the first epoch end, 10 at the end of fit
    assert saved == [(s, "last.ckpt") for s in (3, 5, 6, 9, 10)]
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_lightning_model_checkpoint_alone_misses_the_final_steps(tmp_path):
    """The behaviour CLTCheckpoint corrects (if Lightning changes it, CLTCheckpoint can go)."""
    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[ModelCheckpoint(save_last=True, every_n_train_steps=3)]
    )
    trainer.fit(_model(), PlantedData(n_train=5))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_negative_interval_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint.every_n_train_steps"):
        CLTCheckpoint(every_n_train_steps=-1)


def test_disk_full_during_fit_keeps_last_and_resumes(tmp_path, monkeypatch):
    """ENOSPC while saving the second epoch's checkpoint: a DiskSpaceError out of fit, the
    first epoch's last.ckpt intact, and a resume that ends where an unbroken run ends."""
    torch.manual_seed(0)
    whole = _model()
    make_trainer(
        tmp_path / "whole",
        max_epochs=2,
        callbacks=[CLTCheckpoint(every_n_train_steps=0)],
        plugins=[AtomicCheckpointIO()],
    ).fit(whole, PlantedData(n_train=4))

    calls = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _save_then_fail(1000, OSError(errno.ENOSPC, "No space left on device"))(obj, f)
        real_save(obj, f, *args, **kwargs)

    root = tmp_path / "broken"
    monkeypatch.setattr(torch, "save", save)
    torch.manual_seed(0)
    with pytest.raises(DiskSpaceError, match="last.ckpt"):
        make_trainer(
            root,
            max_epochs=2,
            callbacks=[CLTCheckpoint(every_n_train_steps=0)],
            plugins=[AtomicCheckpointIO()],
        ).fit(_model(), PlantedData(n_train=4))
    monkeypatch.undo()
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]

    resumed = _model()
    trainer = make_trainer(
        root,
        max_epochs=2,
        callbacks=[CLTCheckpoint(every_n_train_steps=0)],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(resumed, PlantedData(n_train=4), ckpt_path="last")
    assert trainer.global_step == 8
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


# ----------------------------------------------------------------------------- CSV log
def _csv_trainer(root: Path, **kwargs):
    return make_trainer(root, logger=ResumableCSVLogger(root, name="", version=""), **kwargs)


def test_resumed_run_keeps_the_metrics_logged_before(tmp_path):
    data = PlantedData(n_train=4)
    trainer = _csv_trainer(
        tmp_path,
        max_epochs=1,
        log_every_n_steps=1,
        callbacks=[CLTCheckpoint(every_n_train_steps=0)],
    )
    trainer.fit(_model(), data)
    first = read_metrics(tmp_path)
    trainer = _csv_trainer(
        tmp_path,
        max_epochs=2,
        log_every_n_steps=1,
        callbacks=[CLTCheckpoint(every_n_train_steps=0)],
    )
    trainer.fit(_model(), data, ckpt_path="last")
    rows = read_metrics(tmp_path)
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == list(range(8))  # epoch 0 from the first run, epoch 1 appended
    assert [r for r in rows if int(r["step"]) < 4] == [
        {k: r.get(k, "") for k in rows[0]} for r in first
    ]
    assert sum(1 for r in rows if r.get("val/r2/mean")) == 2


def test_rows_the_resumed_run_logs_again_are_replaced(tmp_path):
    """Killed after logging steps 0..5, resumed from a checkpoint at step 3."""
    old = ResumableCSVLogger(tmp_path, name="", version="")
    for step in range(6):
        old.log_metrics({"train/loss": 10.0 + step}, step=step)
    old.save()
    new = ResumableCSVLogger(tmp_path, name="", version="")
    for step in range(3, 8):
        new.log_metrics({"train/loss": 20.0 + step, "val/r2/mean": 0.5}, step=step)
    new.save()
    rows = read_metrics(tmp_path)
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [
        (0, 10.0), (1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0), (6, 26.0), (7, 27.0)
    ]  # fmt: skip
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_killed_before_its_first_save_loses_no_rows(tmp_path):
    """New behaviour of the public-API logger: the old rows wait in metrics.csv.resume
    until the first save, so a run killed in between leaves them for the next resume."""
    old = ResumableCSVLogger(tmp_path, name="", version="")
    for step in range(6):
        old.log_metrics({"train/loss": 10.0 + step}, step=step)
    old.save()
    killed = ResumableCSVLogger(tmp_path, name="", version="")
    killed.log_metrics({"train/loss": 99.0}, step=4)  # starts the writer; never saved
    assert not (tmp_path / "metrics.csv").exists()
    new = ResumableCSVLogger(tmp_path, name="", version="")
    new.log_metrics({"train/loss": 24.0}, step=4)
    new.save()
    rows = read_metrics(tmp_path)
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [
        (0, 10.0), (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0)
    ]  # fmt: skip
    assert not (tmp_path / "metrics.csv.resume").exists()


def test_a_run_that_logs_nothing_puts_the_log_back(tmp_path):
    old = ResumableCSVLogger(tmp_path, name="", version="")
    old.log_metrics({"train/loss": 1.0}, step=0)
    old.save()
    before = (tmp_path / "metrics.csv").read_text()
    idle = ResumableCSVLogger(tmp_path, name="", version="")
    idle.experiment  # noqa: B018 - starts the writer, as a Trainer does
    idle.finalize("success")
    assert (tmp_path / "metrics.csv").read_text() == before
    assert not (tmp_path / "metrics.csv.resume").exists()


def test_a_fresh_run_in_the_same_folder_replaces_the_log(tmp_path):
    old = ResumableCSVLogger(tmp_path, name="", version="")
    old.log_metrics({"train/old_metric": 1.0}, step=7)
    old.save()
    new = ResumableCSVLogger(tmp_path, name="", version="")
    new.log_metrics({"train/loss": 2.0}, step=0)
    new.save()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "2.0")]


def test_default_loggers_use_the_resumable_csv_logger(tmp_path):
    csv_logger = default_loggers(tmp_path)[0]
    assert isinstance(csv_logger, ResumableCSVLogger)
