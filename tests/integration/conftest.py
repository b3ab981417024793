"""Fixtures shared by the integration tests: one tiny activation cache per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import quiet_cli, write_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit-reproducible CPU runs: the same thread count in every run that is compared (and a
    test that changes it cannot leak its setting into the next)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """train/ and val/ caches of the tiny teacher on 16 digits each (8 shards of 2 images),
    written by `clt cache` in-process."""
    root = tmp_path_factory.mktemp("tiny_cache")
    config = write_config(root / "cache.yaml", root / "activations", root / "unused_run")
    code, err = quiet_cli(["cache", "--config", str(config)])
    assert code == 0, err
    return root / "activations"


@pytest.fixture(scope="module")
def two_runs(tiny_cache, tmp_path_factory) -> tuple[Path, Path]:
    """Two short tiny runs with different learning rates (2 steps each); their last.ckpt."""
    root = tmp_path_factory.mktemp("two_runs")
    paths = []
    for name, lr in (("a", "3e-3"), ("b", "1e-2")):
        config = write_config(root / f"{name}.yaml", tiny_cache, root / name)
        code, err = quiet_cli(["fit", "--config", str(config), "--trainer.max_steps", "2",
                               "--model.lr", lr])  # fmt: skip
        assert code == 0, err[-3000:]
        paths.append(root / name / "checkpoints" / "last.ckpt")
    return paths[0], paths[1]
