"""Cache manifests are validated before use (issue 12, kind 4).

Each case edits a real cache's manifest.json and runs the real CLI: `clt fit` (the reader)
and `clt cache` (the resuming writer) answer with exit 2 and one line naming the manifest
and the field, never a KeyError/TypeError when the shard is reached, and never train on
altered statistics. A `clt cache` child process is SIGKILLed after 2 shards and a listed
shard is bit-flipped: the resume refuses it instead of marking the cache complete.

`CASES` collects what ran (printed by `test_report_cache_manifests` with `-s`).
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from clt_lightning.data.cache_manifest import stats_digest
from clt_lightning.data.cache_reader import open_cache
from clt_lightning.errors import CacheError
from tests.integration.tiny_run import kill, quiet_cli, spawn_clt, wait_for, write_config

CASES: list[str] = []


def _scale_stats(m: dict) -> None:
    """The issue's example: E||x||^2 and m2 multiplied by 1e6 (hash left as it was)."""
    x = m["stats"]["x"]
    x["mean_sq_norm"] = [v * 1e6 for v in x["mean_sq_norm"]]
    x["m2"] = [[v * 1e6 for v in row] for row in x["m2"]]


EDITS: dict[str, tuple[Callable[[dict], None], str, str]] = {
    # name: (edit, field named, problem)
    "shard record without sha256": (lambda m: m["shards"][3].pop("sha256"), "shards[3].sha256", "is missing"),
    "shard record without file": (lambda m: m["shards"][3].pop("file"), "shards[3].file", "is missing"),
    "shards is a string": (lambda m: m.update(shards="all"), "shards", "not a list of shards"),
    "shard file outside the cache": (lambda m: m["shards"][0].update(file="../../x.safetensors"),
                                     "shards[0].file", "not a shard name"),
    "sha256 not hex": (lambda m: m["shards"][1].update(sha256="abc"), "shards[1].sha256", "not a hex sha256"),
    "n_layers a string": (lambda m: m.update(n_layers="3"), "n_layers", "not a positive integer"),
    "complete a string": (lambda m: m.update(complete="yes"), "complete", "not true or false"),
    "n_images not the shards' sum": (lambda m: m.update(n_images=99), "n_images", "the shards hold 16"),
    "stats scaled by 1e6": (_scale_stats, "stats", "does not match stats_sha256"),
    "stats_sha256 removed": (lambda m: m.pop("stats_sha256"), "stats_sha256", "is missing"),
    "stats without m2": (lambda m: m["stats"]["y"].pop("m2"), "stats.y.m2", "missing"),
}  # fmt: skip


def edit_manifest(cache: Path, edit: Callable[[dict], None], complete: bool = True) -> Path:
    path = cache / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["complete"] = complete
    if not complete:  # a consistent incomplete manifest, then the edit
        manifest["stats_sha256"] = stats_digest(manifest["stats"])
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("name", list(EDITS))
def test_damaged_manifest_is_one_line_naming_the_field(name, tiny_cache, tmp_path):
    edit, field, problem = EDITS[name]
    for command, complete in (("fit", True), ("cache", False)):
        cache = tmp_path / f"activations_{command}"
        shutil.copytree(tiny_cache, cache)
        path = edit_manifest(cache, edit, complete)
        config = write_config(tmp_path / "run.yaml", cache, tmp_path / f"run_{command}")
        code, err = quiet_cli([command, "--config", str(config)])
        assert code == 2, f"{command}: exit {code}\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        assert f"cache manifest {path}: field {field!r}" in err and problem in err, err[-2000:]
        CASES.append(f"{'clt fit' if complete else 'clt cache (resume)'}: {name}")
    with pytest.raises(CacheError, match="delete .* and rerun `clt cache"):
        open_cache(tmp_path / "activations_fit" / "train", verify=False)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_verifies_the_listed_shards(tmp_path):
    """`clt cache` killed after 2 train shards; shard 1 then loses a bit (same size). Old
    code: resumed and marked the cache complete. Now: refused, naming the shard."""
    cache_dir, marker, log = tmp_path / "activations", tmp_path / "paused", tmp_path / "child.log"
    config = write_config(tmp_path / "run.yaml", cache_dir, tmp_path / "run")
    child = spawn_clt(["cache", "--config", str(config)], log, pause="cache_after_2_shards",
                      marker=marker)  # fmt: skip
    try:
        wait_for(marker.exists, child, log)
    finally:
        assert kill(child) == -signal.SIGKILL
    shard = cache_dir / "train" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    code, err = quiet_cli(["cache", "--config", str(config)])
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert f"{shard} does not match its sha256" in err, err[-2000:]
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    CASES.append("clt cache (resume): a listed shard bit-flipped after a SIGKILL")


def test_report_cache_manifests():
    print(f"\ndamaged manifests handled: {len(CASES)}")
    for case in CASES:
        print(f"  - {case}")
