"""A writer killed with SIGKILL mid-run resumes to the bytes of an uninterrupted run.

The child process is this module run as a script (`python -m tests.integration.test_cache_resume
OUT`). Its fake teacher waits a little per batch (`CLT_TEST_CAPTURE_DELAY`) so the parent can
kill it after the first committed shard and before the last; nothing is asserted on timing:
the parent polls the manifest until it lists a shard, then kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.data.cache_writer import write_cache
from tests.unit.test_cache import WRITE_OPTIONS, FakeDataset, FakeTeacher, cache_files

REPO = Path(__file__).resolve().parents[2]
OPTIONS = {**WRITE_OPTIONS, "images_per_shard": 4, "batch_size": 2}  # 8 shards of 4 images


def _committed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0  # not written yet (every write is atomic, so never half a manifest)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_gives_the_uninterrupted_bytes(tmp_path: Path) -> None:
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "CLT_TEST_CAPTURE_DELAY": "0.15"}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_cache_resume", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while _committed_shards(killed) < 1 and child.poll() is None:
            assert time.monotonic() < deadline, "the child never committed a shard"
            time.sleep(0.005)  # polling interval, not a timing assumption
        assert child.poll() is None, f"child ended early: {child.stderr.read().decode()}"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(manifest["shards"]) < 8
    for record in manifest["shards"]:  # what the manifest lists is sound
        assert (killed / record["file"]).stat().st_size == record["bytes"]

    teacher = FakeTeacher()
    write_cache(teacher, FakeDataset(), killed, **OPTIONS)
    assert teacher.images_seen <= FakeDataset().n - 4 * len(manifest["shards"])
    write_cache(FakeTeacher(), FakeDataset(), whole, **OPTIONS)
    assert cache_files(killed) == cache_files(whole)
    open_cache(killed).load_shard(0)


if __name__ == "__main__":
    write_cache(FakeTeacher(), FakeDataset(), sys.argv[1], **OPTIONS)
