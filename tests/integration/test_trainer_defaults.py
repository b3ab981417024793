"""Subcommands with the Trainer's defaults (issue 11.8) and training precisions refused
in one line before any work (issue 11.3), through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.tiny_run import quiet_cli, read_metrics, write_config


def test_validate_and_test_with_max_epochs_null(tiny_cache, tmp_path: Path) -> None:
    """`clt validate --trainer.max_epochs null` failed with an AssertionError in
    CLTModule.progress(); every Trainer subcommand now runs with Lightning's defaults."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run, **{"trainer.max_epochs": 1})
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 0, err[-3000:]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    for command, key in (("validate", "val/loss"), ("test", "test/loss")):
        code, err = quiet_cli([command, "--config", str(config), "--ckpt_path", ckpt,
                               "--trainer.max_epochs", "null"])  # fmt: skip
        assert code == 0, err[-3000:]
        assert any(row.get(key) for row in read_metrics(run)), command


@pytest.mark.parametrize(
    "precision", ["bf16-true", "16-true", "transformer-engine", "transformer-engine-float16"]
)
def test_sixteen_bit_weights_refused_in_one_line(precision, tmp_path: Path) -> None:
    """Refused before the Trainer (or transformer_engine) is even built, naming bf16-mixed."""
    config = write_config(tmp_path / "run.yaml", tmp_path / "no_cache", tmp_path / "run")
    code, err = quiet_cli(["fit", "--config", str(config), "--trainer.precision", precision])
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("clt: error:")]
    assert precision in line and "trainer.precision=bf16-mixed" in line
    assert "Traceback" not in err
