"""Every way `clt fit` can stop is followed by a resume that equals the uninterrupted run.

Issue 11.1: a run stopped by `--trainer.max_steps 3` wrote a checkpoint that Lightning
counted as the end of epoch 0, so `--ckpt_path last` started epoch 1 and the other
batches of epoch 0 were never trained. Each way to stop is tried here mid-epoch against an
uninterrupted 2-epoch run (16 steps of 8 batches), bit for bit on one CPU thread:
max_steps, max_time, SIGTERM (Lightning's preemption handling), KeyboardInterrupt, an
exception, and SIGKILL (the last three resume from the last step checkpoint).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import (
    kill,
    load_state,
    quiet_cli,
    read_metrics,
    spawn_clt,
    wait_for,
    write_config,
)

STEPS_PER_EPOCH = 8


def fit(config: Path, *extra: str) -> None:
    code, err = quiet_cli(["fit", "--config", str(config), *extra])
    assert code == 0, err[-3000:]


def last(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory) -> Path:
    """Uninterrupted 2-epoch run; its run folder."""
    root = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(write_config(root / "run.yaml", tiny_cache, root / "run"))
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def assert_resumed_equals(run: Path, reference: Path) -> None:
    """Same weights and buffers bit for bit, every step trained once."""
    checkpoint = torch.load(last(run), weights_only=True)
    assert checkpoint["global_step"] == 2 * STEPS_PER_EPOCH
    expected = load_state(last(reference))
    assert checkpoint["state_dict"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(checkpoint["state_dict"][name], value), f"{name} differs"
    steps = sorted({int(r["step"]) for r in read_metrics(run) if r.get("train/loss")})
    assert steps == list(range(2 * STEPS_PER_EPOCH))


def test_max_steps_then_resume(tiny_cache, reference, tmp_path):
    """The issue's input: max_steps 3, then `--ckpt_path last` continues epoch 0 at batch 3."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run)
    fit(config, "--trainer.max_steps", "3")
    loader_state = torch.load(last(run), weights_only=True)["loops"]["fit_loop"]
    assert loader_state["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    fit(config, "--trainer.max_steps", "6", "--ckpt_path", "last")
    fit(config, "--ckpt_path", "last")
    assert_resumed_equals(run, reference)


def test_max_steps_then_resume_with_max_epochs_1(tiny_cache, tmp_path):
    """With max_epochs 1 the resumed run trains the rest of epoch 0 (it trained nothing)."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run, **{"trainer.max_epochs": 1})
    fit(config, "--trainer.max_steps", "3")
    fit(config, "--ckpt_path", "last")
    fit(write_config(tmp_path / "whole.yaml", tiny_cache, whole, **{"trainer.max_epochs": 1}))
    resumed, expected = torch.load(last(run), weights_only=True), load_state(last(whole))
    assert resumed["global_step"] == STEPS_PER_EPOCH
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in expected.items())


def test_max_time_then_resume(tiny_cache, reference, tmp_path):
    """Lightning's Timer (`trainer.max_time`) stops fit after batch 2 of epoch 1 (a clock
    of one second per batch makes the point exact): the resume continues at batch 3."""
    run = tmp_path / "run"
    timer = {"class_path": "tests.integration.tiny_run.BatchClock",
             "init_args": {"duration": f"00:00:00:{STEPS_PER_EPOCH + 3:02d}"}}  # fmt: skip
    config = write_config(
        tmp_path / "timed.yaml", tiny_cache, run, **{"trainer.callbacks": [timer]}
    )
    fit(config)
    assert torch.load(last(run), weights_only=True)["global_step"] == STEPS_PER_EPOCH + 3
    fit(write_config(tmp_path / "resume.yaml", tiny_cache, run), "--ckpt_path", "last")
    assert_resumed_equals(run, reference)


@pytest.mark.parametrize("error", ["interrupt", "crash"])
def test_keyboard_interrupt_or_exception_then_resume(error, tiny_cache, reference, tmp_path):
    """Ctrl+C or a crash before batch 3 of epoch 1; step checkpoints every 2 steps (the
    last at step 10, mid-epoch); the resume replays steps 11-16 exactly."""
    run = tmp_path / "run"
    stop = {"class_path": "tests.integration.tiny_run.StopAt",
            "init_args": {"epoch": 1, "batch": 3, "error": error}}  # fmt: skip
    every_2 = {"checkpoint.every_n_train_steps": 2}
    config = write_config(tmp_path / "stop.yaml", tiny_cache, run,
                          **{"trainer.callbacks": [stop]}, **every_2)  # fmt: skip
    sigint = signal.getsignal(signal.SIGINT)
    try:
        if error == "interrupt":  # Lightning exits with status 1 after Ctrl+C
            assert quiet_cli(["fit", "--config", str(config)])[0] == 1
        else:
            with pytest.raises(RuntimeError, match="crash before batch 3"):
                quiet_cli(["fit", "--config", str(config)])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl+C after the first
    assert torch.load(last(run), weights_only=True)["global_step"] == STEPS_PER_EPOCH + 2
    fit(write_config(tmp_path / "resume.yaml", tiny_cache, run, **every_2), "--ckpt_path", "last")
    assert_resumed_equals(run, reference)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGTERM and SIGKILL")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_signal_in_a_child_then_resume(how, tiny_cache, reference, tmp_path):
    """A child `clt fit` gets SIGTERM before batch 2 of epoch 1 (Lightning finishes the
    batch, the checkpoint is written after it) or SIGKILL there (resumes from the step-3
    checkpoint at step 9)."""
    run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "child.log"
    until = "sigterm" if how == "SIGTERM" else "kill"
    pause = {"class_path": "tests.integration.tiny_run.PauseAt",
             "init_args": {"marker": str(marker), "epoch": 1, "batch": 2, "until": until}}  # fmt: skip
    every_3 = {"checkpoint.every_n_train_steps": 3}
    config = write_config(tmp_path / "child.yaml", tiny_cache, run,
                          **{"trainer.callbacks": [pause]}, **every_3)  # fmt: skip
    child = spawn_clt(["fit", "--config", str(config)], log)
    try:
        wait_for(marker.exists, child, log)
        if how == "SIGTERM":
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=300) == 128 + signal.SIGTERM
            assert "clt: stopped by SIGTERM" in log.read_text()
    finally:
        status = kill(child)
    saved = torch.load(last(run), weights_only=True)["global_step"]
    if how == "SIGTERM":
        assert saved == STEPS_PER_EPOCH + 3, log.read_text()[-3000:]  # batch 2 trained
    else:
        assert status == -signal.SIGKILL and saved == STEPS_PER_EPOCH + 1
    fit(write_config(tmp_path / "resume.yaml", tiny_cache, run, **every_3), "--ckpt_path", "last")
    assert_resumed_equals(run, reference)
