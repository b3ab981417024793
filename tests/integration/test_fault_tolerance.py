"""`clt fit` and `clt cache` survive interruptions: resumes lose nothing and change nothing.

Fast tests drive the CLI in-process (`clt_lightning.cli.main`); the ones marked slow kill a
child `clt` process with SIGKILL at a chosen point (`tiny_run.PauseAt` / `tiny_run.PAUSES`
make the child block there and write a marker file; the test polls for the marker) and
resume in-process. Every comparison with an uninterrupted run is exact (torch.equal): the
runs are single-threaded on the CPU, and resuming at an epoch boundary replays the same
data in the same order (the epoch seeds the order).

Lightning's guarantee for a mid-epoch checkpoint (`checkpoint.every_n_train_steps > 0`)
is weaker: the global step continues, but a dataloader without `state_dict` restarts its
epoch, so the resumed epoch replays its first batches and never sees its last ones (see
docs/reliability.md); `test_mid_epoch_resume_replays_the_exact_batches` pins this down.
"""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import (
    DELETE,
    N_IMAGES,
    kill,
    last_values,
    load_state,
    quiet_cli,
    read_metrics,
    spawn_clt,
    wait_for,
    write_config,
)

STEPS_PER_EPOCH = N_IMAGES * 17 // 34  # 8
KILLS: list[str] = []  # kill points survived in this session (printed for reliability.md)


def fit(config: Path, *extra: str) -> None:
    code, err = quiet_cli(["fit", "--config", str(config), *extra])
    assert code == 0, err[-3000:]


def assert_same_weights(a: dict, b: dict, resumed: bool = False) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (16 steps); its run folder."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(write_config(root / "run.yaml", tiny_cache, root / "run"))
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def last_ckpt(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------ in-process
def test_default_checkpoint_resumes_with_ckpt_path_last(tiny_cache, reference, tmp_path):
    """1 epoch, then `--ckpt_path last` to 2 epochs == the uninterrupted 2-epoch run."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run)
    fit(config, "--trainer.max_epochs", "1")
    assert torch.load(last_ckpt(run), weights_only=True)["global_step"] == STEPS_PER_EPOCH
    fit(config, "--ckpt_path", "last")
    checkpoint = torch.load(last_ckpt(run), weights_only=True)
    assert checkpoint["global_step"] == 2 * STEPS_PER_EPOCH
    rows = read_metrics(run)
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(2 * STEPS_PER_EPOCH))  # nothing lost, nothing twice
    assert_same_weights(checkpoint["state_dict"], load_state(last_ckpt(reference)), resumed=True)
    assert last_values(rows, "val/") == last_values(read_metrics(reference), "val/")


def test_checkpointing_off_or_configured_by_the_user(tiny_cache, tmp_path):
    off = tmp_path / "off"
    config = write_config(tmp_path / "off.yaml", tiny_cache, off)
    fit(config, "--trainer.enable_checkpointing", "false", "--trainer.max_steps", "2")
    assert not (off / "checkpoints").exists()

    own = tmp_path / "own"
    mine = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "mine"), "filename": "mine"}}  # fmt: skip
    config = write_config(tmp_path / "own.yaml", tiny_cache, own, **{"trainer.callbacks": [mine]})
    fit(config, "--trainer.max_steps", "2")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["mine.ckpt"]
    assert not (own / "checkpoints").exists()  # the default one steps aside


def test_disk_full_while_checkpointing_fit(tiny_cache, reference, tmp_path, monkeypatch):
    """ENOSPC in the epoch-1 save: exit 2 with a one-line message, the epoch-0 last.ckpt
    intact and no partial file, then `--ckpt_path last` finishes the uninterrupted run."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run)
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x00" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, err = quiet_cli(["fit", "--config", str(config)])
    monkeypatch.undo()
    assert code == 2
    assert (
        f"clt: error: no space left on the device while writing the checkpoint {last_ckpt(run)}"
        in err
    )
    assert "Traceback" not in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert torch.load(last_ckpt(run), weights_only=True)["global_step"] == STEPS_PER_EPOCH
    KILLS.append("fit: disk full while writing the epoch-1 checkpoint")
    fit(config, "--ckpt_path", "last")
    assert_same_weights(load_state(last_ckpt(run)), load_state(last_ckpt(reference)), resumed=True)


def _cache_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # fmt: skip


def test_disk_full_while_caching_then_resume(tiny_cache, tmp_path, monkeypatch):
    """ENOSPC while writing the 4th train shard: exit 2 naming the shard, the manifest lists
    only whole shards, no temp file; the rerun resumes to the uninterrupted bytes."""
    import clt_lightning.data.cache_format as cache

    cache_dir = tmp_path / "activations"
    config = write_config(tmp_path / "run.yaml", cache_dir, tmp_path / "run")
    real, calls = cache._write_chunks, []

    def write_chunks(f, data, digest):
        calls.append(1)
        if len(calls) == 3 * 6 + 1:  # header + 5 tensors per shard: the 4th shard's header
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data, digest)

    monkeypatch.setattr(cache, "_write_chunks", write_chunks)
    code, err = quiet_cli(["cache", "--config", str(config)])
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err
    assert "clt: error: no space left on the device while writing" in err
    assert "shard_00003.safetensors" in err
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 3
    assert not list((cache_dir / "train").glob(".*.tmp"))
    assert sorted(p.name for p in (cache_dir / "train").glob("shard_*")) == [
        f"shard_{i:05d}.safetensors" for i in range(3)
    ]
    KILLS.append("cache: disk full while writing shard 3")
    code, err = quiet_cli(["cache", "--config", str(config)])
    assert code == 0, err
    assert _cache_files(cache_dir) == _cache_files(tiny_cache)


def test_disk_full_while_writing_a_retrieval_index(tiny_cache, reference, tmp_path, monkeypatch):
    """ENOSPC while FAISS writes the second per-layer index: exit 2 with one line, no
    manifest (the index folder never looks complete), and the rerun rebuilds it and gives
    the neighbours of an unbroken run."""
    import clt_lightning.evaluation.retrieval_index as retrieval

    config = write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run")

    def args(out: Path) -> list[str]:
        return ["retrieve", "--config", str(config), "--ckpt_path", str(last_ckpt(reference)),
                "--retrieval.output_dir", str(out), "--retrieval.query_index", "1"]  # fmt: skip

    real, calls = retrieval.faiss.write_index, []

    def write_index(index, path):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(index, path)

    broken, whole = tmp_path / "broken", tmp_path / "whole"
    monkeypatch.setattr(retrieval.faiss, "write_index", write_index)
    code, err = quiet_cli(args(broken))
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err
    assert "clt: error: no space left on the device" in err and ".faiss.partial" in err
    assert not (broken / "index_cls" / "manifest.json").exists()
    KILLS.append("retrieve: disk full while writing a FAISS index")
    for out in (broken, whole):
        code, err = quiet_cli(args(out))
        assert code == 0, err[-3000:]
    name = "retrieval_val00001_cls.json"
    results = [json.loads((out / name).read_text()) for out in (broken, whole)]
    for result in results:
        result.pop("index_dir")
    assert results[0] == results[1]


def test_same_seed_same_metrics(tiny_cache, tmp_path):
    """`clt fit` twice on the tiny config (default loggers: CSV + W&B offline): identical
    val/* values in metrics.csv and identical weights."""
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", tiny_cache, run,
                              **{"trainer.logger": DELETE})  # fmt: skip
        fit(config)
        runs.append(run)
    values = [last_values(read_metrics(run), "val/") for run in runs]
    assert len(values[0]) == 49 and values[0] == values[1]  # 4 metrics x 3 groups x 4 + loss
    rows = [[{k: v for k, v in r.items() if k.startswith("val/")} for r in read_metrics(run)]
            for run in runs]  # fmt: skip
    assert rows[0] == rows[1]  # every logged validation, not only the last
    assert_same_weights(load_state(last_ckpt(runs[0])), load_state(last_ckpt(runs[1])))
    assert (runs[0] / "wandb").is_dir()


# ------------------------------------------------------------------------ SIGKILL
def _kill_and_resume(tmp_path: Path, tiny_cache: Path, pause: dict | None, **overrides) -> Path:
    """Start `clt fit` in a child, SIGKILL it at the pause point (or as soon as a first
    last.ckpt exists), check what is on disk, resume in-process; the run folder."""
    run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "child.log"
    callbacks = []
    if pause is not None:
        callbacks = [{"class_path": "tests.integration.tiny_run.PauseAt",
                      "init_args": {"marker": str(marker), **pause}}]  # fmt: skip
    child_config = write_config(tmp_path / "child.yaml", tiny_cache, run,
                                **{"trainer.callbacks": callbacks}, **overrides)  # fmt: skip
    child = spawn_clt(["fit", "--config", str(child_config)], log)
    try:
        if pause is not None:
            wait_for(marker.exists, child, log)
        else:
            wait_for(last_ckpt(run).exists, child, log)
    finally:
        status = kill(child)
    if status != -signal.SIGKILL:
        pytest.skip(f"the child finished ({status}) before it could be killed")
    assert torch.load(last_ckpt(run), weights_only=True)["state_dict"]  # loads: never broken
    config = write_config(tmp_path / "resume.yaml", tiny_cache, run, **overrides)
    fit(config, "--ckpt_path", "last")
    return run


KILL_POINTS = {
    "epoch 1, before batch 3": {"hook": "train_batch", "epoch": 1, "batch": 3},
    "epoch 1, during validation": {"hook": "validation_batch", "epoch": 1, "batch": 1},
    "start of epoch 1 (its first batch)": {"hook": "train_batch", "epoch": 1, "batch": 0},
    "writing the epoch-1 checkpoint (half written)": {"hook": "checkpoint_write", "batch": 1},
    "as soon as the first last.ckpt exists": None,
}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_epoch_checkpoints_resumes_exactly(point, tiny_cache, reference, tmp_path):
    run = _kill_and_resume(tmp_path, tiny_cache, KILL_POINTS[point])
    if point.startswith("writing"):
        assert not (run / "checkpoints" / ".last.ckpt.tmp").exists()  # replaced by the resume
    checkpoint = torch.load(last_ckpt(run), weights_only=True)
    assert checkpoint["global_step"] == 2 * STEPS_PER_EPOCH
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(16))
    KILLS.append(f"fit: SIGKILL {point}")
    assert_same_weights(checkpoint["state_dict"], load_state(last_ckpt(reference)), resumed=True)
    assert last_values(rows, "val/") == last_values(read_metrics(reference), "val/")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_checkpoint_write_leaves_the_previous_file(tiny_cache, tmp_path):
    """Killed half-way through writing last.ckpt: the half-written bytes are in the temp
    file, the previous last.ckpt is whole and loads."""
    run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "child.log"
    pause = {
        "class_path": "tests.integration.tiny_run.PauseAt",
        "init_args": {"marker": str(marker), "hook": "checkpoint_write", "batch": 1},
    }
    config = write_config(
        tmp_path / "child.yaml", tiny_cache, run, **{"trainer.callbacks": [pause]}
    )
    child = spawn_clt(["fit", "--config", str(config)], log)
    try:
        wait_for(marker.exists, child, log)
    finally:
        assert kill(child) == -signal.SIGKILL
    partial = run / "checkpoints" / ".last.ckpt.tmp"
    assert partial.stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 (whatever torch says about half a zip)
        torch.load(partial, weights_only=True)
    assert torch.load(last_ckpt(run), weights_only=True)["global_step"] == STEPS_PER_EPOCH
    KILLS.append("fit: SIGKILL half-way through writing last.ckpt (previous file intact)")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_mid_epoch_resume_replays_the_exact_batches(tiny_cache, reference, tmp_path):
    """Step checkpoints every 3 steps, killed before batch 6 of epoch 1 (last.ckpt at step
    12, mid-epoch): the resumed run should equal the uninterrupted one."""
    pause = {"hook": "train_batch", "epoch": 1, "batch": 6}
    run = _kill_and_resume(tmp_path, tiny_cache, pause, **{"checkpoint.every_n_train_steps": 3})
    checkpoint = torch.load(last_ckpt(run), weights_only=True)
    assert checkpoint["global_step"] == 2 * STEPS_PER_EPOCH  # holds with or without the fix
    KILLS.append("fit: SIGKILL mid-epoch after a step checkpoint")
    assert_same_weights(checkpoint["state_dict"], load_state(last_ckpt(reference)), resumed=True)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_clt_cache_then_resume(tiny_cache, tmp_path):
    """`clt cache` killed once the train manifest lists 2 shards: the cache says it is
    incomplete, and rerunning `clt cache` gives the uninterrupted bytes."""
    from clt_lightning.errors import CacheError

    cache_dir, marker, log = tmp_path / "activations", tmp_path / "paused", tmp_path / "child.log"
    config = write_config(tmp_path / "run.yaml", cache_dir, tmp_path / "run")
    child = spawn_clt(["cache", "--config", str(config)], log, pause="cache_after_2_shards",
                      marker=marker)  # fmt: skip
    try:
        wait_for(marker.exists, child, log)
    finally:
        assert kill(child) == -signal.SIGKILL
    manifest = json.loads((cache_dir / "train" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 2 and "incomplete" in err and "clt cache" in err
    with pytest.raises(CacheError, match="incomplete"):
        from clt_lightning.data.cache_reader import open_cache

        open_cache(cache_dir / "train")
    code, err = quiet_cli(["cache", "--config", str(config)])
    assert code == 0, err
    assert _cache_files(cache_dir) == _cache_files(tiny_cache)
    KILLS.append("cache: SIGKILL after 2 of 8 train shards")


def test_report_kills(request):
    """Prints the kill points survived so far in this session (for docs/reliability.md)."""
    print(f"\nkills survived in this session: {len(KILLS)}")
    for kill_point in KILLS:
        print(f"  - {kill_point}")


def _tree(folder: Path, suffixes: tuple[str, ...] = (".json", ".csv", ".md")) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in suffixes
    }


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_clt_evaluate_then_rerun(tiny_cache, reference, tmp_path):
    """`clt evaluate` killed after its first result file: the output folder does not exist
    yet (results are staged in a hidden sibling folder, swapped in when whole); the rerun
    writes exactly what an uninterrupted evaluation writes and leaves no staging folder."""
    config = write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run")
    common = ["--ckpt_path", str(last_ckpt(reference)), "--evaluation.n_images", "4",
              "--evaluation.figures", "false",
              "--evaluation.classifier_cache", str(tmp_path / "classifiers")]  # fmt: skip
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    marker, log = tmp_path / "paused", tmp_path / "child.log"
    args = ["evaluate", "--config", str(config), *common, "--evaluation.output_dir", str(killed)]
    child = spawn_clt(args, log, pause="evaluate_after_1_file", marker=marker)
    try:
        wait_for(marker.exists, child, log)
    finally:
        assert kill(child) == -signal.SIGKILL
    staging = tmp_path / ".killed.partial"
    assert not killed.exists() and list(staging.glob("*.json"))
    code, err = quiet_cli([*args])
    assert code == 0, err[-3000:]
    code, err = quiet_cli([*args[:-1], str(whole)])
    assert code == 0, err[-3000:]
    assert (killed / "run.json").exists() and not staging.exists()
    assert _tree(killed) == _tree(whole)
    KILLS.append("evaluate: SIGKILL after the first result file")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_clt_retrieve_then_rerun(tiny_cache, reference, tmp_path):
    """`clt retrieve` killed after writing its first per-layer index: the index folder does
    not exist yet (built in a hidden sibling folder, swapped in when whole), and the rerun
    rebuilds it and returns the neighbours of an uninterrupted run."""
    config = write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    marker, log = tmp_path / "paused", tmp_path / "child.log"

    def args(out: Path) -> list[str]:
        return ["retrieve", "--config", str(config), "--ckpt_path", str(last_ckpt(reference)),
                "--retrieval.output_dir", str(out), "--retrieval.query_index", "1"]  # fmt: skip

    child = spawn_clt(args(killed), log, pause="retrieve_after_1_index", marker=marker)
    try:
        wait_for(marker.exists, child, log)
    finally:
        assert kill(child) == -signal.SIGKILL
    index_dir = killed / "index_cls"
    staging = killed / ".index_cls.partial"
    assert not index_dir.exists() and any(staging.glob("*.faiss"))
    for out in (killed, whole):
        code, err = quiet_cli(args(out))
        assert code == 0, err[-3000:]
    assert (index_dir / "manifest.json").exists() and not staging.exists()
    name = "retrieval_val00001_cls.json"
    results = [json.loads((out / name).read_text()) for out in (killed, whole)]
    for result in results:
        result.pop("index_dir")  # the only field that names the output folder
    assert results[0] == results[1]
    assert results[0]["layers"]  # neighbours for every layer
    KILLS.append("retrieve: SIGKILL after the first per-layer index file")
