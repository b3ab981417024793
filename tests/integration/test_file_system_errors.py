"""File-system errors and real full disks end in one line and exit 2, never a traceback.

Issue 12 kinds 2 and 5: read-only folders, files where folders are expected, errors
raised inside DataLoader workers, and real full disks (small tmpfs mounts, filled up to a
chosen number of bytes with a filler file) under `clt cache`, `clt fit`, `clt evaluate`,
`clt export` and `clt retrieve`. Every case checks exit status 2, no traceback, a
one-line message naming the path, that nothing half-written is left, and (for the full
disks) that the rerun after freeing space resumes or starts over to the right result.

Mounting needs root (CAP_SYS_ADMIN); where a mount cannot be made the test is skipped and
says why. `FS_CASES` collects every case that ran (printed by `test_report_fs_cases`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import REPO, child_env, load_state, quiet_cli, write_config

FS_CASES: list[str] = []
N_LATENTS = 600  # last.ckpt ~2.1 MB (weights + AdamW): two do not fit on a 4 MB tmpfs


def _mount(args: list[str]) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a test file system ({' '.join(args)}): {result.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m", read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of `size` at `path` (read-only if asked); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_copy(source: Path, path: Path) -> Iterator[Path]:
    """`source` bind-mounted read-only at `path`."""
    if os.geteuid() != 0:
        pytest.skip("bind-mounting read-only needs root")
    path.mkdir(parents=True, exist_ok=True)
    _mount(["--bind", str(source), str(path)])
    try:
        _mount(["-o", "remount,bind,ro", str(path)])
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def leave_free(folder: Path, n_bytes: int) -> Path:
    """Fill the file system of `folder` until about `n_bytes` stay free (page-rounded)."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - n_bytes))
    return filler


def expect_one_line(args: list[str], *needles: str, name: str) -> str:
    """Run the CLI in-process: exit 2, no traceback, one `clt: error:` line with needles."""
    code, err = quiet_cli(args)
    assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    message = err.split("clt: error: ", 1)[1].rstrip("\n")
    assert "\n" not in message, f"{name}: not one line:\n{message}"
    for needle in needles:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"
    FS_CASES.append(name)
    return message


@pytest.fixture(scope="module")
def trained(tiny_cache, tmp_path_factory) -> Path:
    """A finished 2-epoch tiny run with N_LATENTS latents; its last.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(
        root / "run.yaml", tiny_cache, root / "run", **{"model.n_latents": N_LATENTS}
    )
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 0, err[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def config(tiny_cache, tmp_path):
    made = []

    def make(run: Path | None = None, cache_dir: Path | None = None, **overrides) -> str:
        overrides.setdefault("model.n_latents", N_LATENTS)
        made.append(1)
        path = write_config(tmp_path / f"run{len(made)}.yaml", cache_dir or tiny_cache,
                            run or tmp_path / "run", **overrides)  # fmt: skip
        return str(path)

    return make


# ----------------------------------------------------------------- files where folders go
def test_files_where_folders_are_expected(config, trained, tmp_path):
    """Each folder setting given an existing file: a ConfigError naming the key, before
    any model is built (the old code raised NotADirectoryError / FileExistsError)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    ckpt = str(trained)
    cases = {
        "data.cache_dir is a file (clt cache)": (
            ["cache", "--config", config(), "--data.cache_dir", str(a_file)], "data.cache_dir"),
        "data.cache_dir under a file (clt cache)": (
            ["cache", "--config", config(), "--data.cache_dir", str(a_file / "sub")],
            "data.cache_dir"),
        "trainer.default_root_dir is a file (clt fit)": (
            ["fit", "--config", config(run=a_file)], "trainer.default_root_dir"),
        "evaluation.output_dir is a file": (
            ["evaluate", "--config", config(), "--ckpt_path", ckpt,
             "--evaluation.output_dir", str(a_file)], "evaluation.output_dir"),
        "retrieval.output_dir is a file": (
            ["retrieve", "--config", config(), "--ckpt_path", ckpt,
             "--retrieval.output_dir", str(a_file)], "retrieval.output_dir"),
        "export output_dir is a file": (
            ["export", "--config", config(), "--ckpt_path", ckpt, "--output_dir", str(a_file)],
            "output_dir"),
    }  # fmt: skip
    for name, (args, key) in cases.items():
        expect_one_line(args, key, str(a_file), "is a file", name=name)
    assert a_file.read_text() == "not a folder"


# ----------------------------------------------------------------- read-only storage
def test_read_only_folders(config, trained, tmp_path):
    """A read-only cache, run, evaluation, export or retrieval folder: one line with the
    path, the setting (or the operation) and "Read-only file system" (EROFS tracebacks
    before); output folders are checked before the work."""
    ckpt = str(trained)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cases = {
            "read-only cache folder (clt cache)": (
                ["cache", "--config", config(cache_dir=ro / "act")], ro / "act",
                "cannot create the folder"),
            "read-only run folder (clt fit)": (
                ["fit", "--config", config(run=ro / "run"), "--trainer.max_steps", "1"],
                ro / "run", "trainer.default_root_dir"),
            "read-only evaluation folder": (
                ["evaluate", "--config", config(), "--ckpt_path", ckpt,
                 "--evaluation.output_dir", str(ro / "eval"), "--evaluation.figures", "false"],
                ro / "eval", "evaluation.output_dir"),
            "read-only export folder": (
                ["export", "--config", config(), "--ckpt_path", ckpt,
                 "--output_dir", str(ro / "export")], ro / "export", "output_dir"),
            "read-only retrieval folder": (
                ["retrieve", "--config", config(), "--ckpt_path", ckpt,
                 "--retrieval.output_dir", str(ro / "retrieval")], ro / "retrieval",
                "retrieval.output_dir"),
        }  # fmt: skip
        for name, (args, path, what) in cases.items():
            expect_one_line(args, str(path), what, "Read-only file system", name=name)


def test_complete_cache_on_read_only_storage(tiny_cache, config, tmp_path):
    """Rerunning `clt cache` over a complete cache needs no writing: exit 0 (it used to
    crash opening `.lock`); `clt fit` trains from it."""
    with read_only_copy(tiny_cache, tmp_path / "ro_cache") as cache:
        code, err = quiet_cli(["cache", "--config", config(cache_dir=cache)])
        assert code == 0, err[-3000:]
        code, err = quiet_cli(
            ["fit", "--config", config(cache_dir=cache), "--trainer.max_steps", "2"]
        )
        assert code == 0, err[-3000:]
    FS_CASES.append("complete cache on read-only storage (clt cache, clt fit)")


# ----------------------------------------------------------------- DataLoader workers
def test_error_inside_a_dataloader_worker_is_one_line(tiny_cache, config, tmp_path):
    """A bit-flipped shard read by worker 0 or 1 of `--data.num_workers 2`: the shard's
    one-line CorruptShardError, not "Caught CorruptShardError in DataLoader worker"."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    shard = cache / "train" / "shard_00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = expect_one_line(
        ["fit", "--config", config(cache_dir=cache), "--data.num_workers", "2"],
        str(shard), name="corrupt shard read inside a DataLoader worker",
    )  # fmt: skip
    assert "DataLoader worker" not in message and "Caught" not in message


# ----------------------------------------------------------------- real full disks
def _cache_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".lock", "filler.bin")}  # fmt: skip


def test_full_disk_while_caching_then_resume(tiny_cache, config, tmp_path):
    """A real full tmpfs under `clt cache` after the up-front space check passed (the shard
    files' headers and pages are not in the estimate): exit 2 naming the shard, only whole
    shards listed, no temp file; after freeing space the rerun resumes to the bytes of an
    uninterrupted cache."""
    train = json.loads((tiny_cache / "train" / "manifest.json").read_text())
    data_bytes = sum(2 * s["n_images"] * 17 * 3 * 32 * 4 for s in train["shards"])
    with tmpfs(tmp_path / "disk", "1m") as disk:
        filler = leave_free(disk, data_bytes + 12 * 1024)  # passes the estimate, not the writes
        message = expect_one_line(["cache", "--config", config(cache_dir=disk / "act")],
                                  "no space left on the device while writing",
                                  str(disk / "act" / "train"),
                                  name="real full disk while writing a cache shard")  # fmt: skip
        assert message.split(";")[0].endswith((".safetensors", "manifest.json")), message
        manifest = json.loads((disk / "act" / "train" / "manifest.json").read_text())
        listed = [s["file"] for s in manifest["shards"]]
        assert not manifest["complete"] and 0 < len(listed) < len(train["shards"])
        files = sorted(p.name for p in (disk / "act" / "train").glob("shard_*"))
        # a shard renamed into place whose manifest commit hit the full disk is not listed
        # (the resume overwrites it); every listed one is whole
        assert files[: len(listed)] == listed and len(files) - len(listed) <= 1
        for record in manifest["shards"]:  # every listed shard whole
            assert (disk / "act" / "train" / record["file"]).stat().st_size == record["bytes"]
        assert not list(disk.rglob("*.tmp"))
        filler.unlink()
        code, err = quiet_cli(["cache", "--config", config(cache_dir=disk / "act")])
        assert code == 0, err[-3000:]
        assert _cache_files(disk / "act") == _cache_files(tiny_cache)


def test_full_disk_while_checkpointing_then_resume(tiny_cache, config, trained, tmp_path):
    """The issue's input: a 4 MB tmpfs as the run folder of `clt fit` (torch's zip writer
    raised "RuntimeError: [enforce fail at inline_container.cc:672]"). The epoch-0
    last.ckpt fits, the epoch-1 one does not beside it: exit 2 naming last.ckpt, the
    epoch-0 file intact, no temp file; after freeing space `--ckpt_path last` finishes with
    the weights of the uninterrupted run."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        run = disk / "run"
        last = run / "checkpoints" / "last.ckpt"
        message = expect_one_line(["fit", "--config", config(run=run)],
                                  "no space left on the device while writing the checkpoint",
                                  str(last), name="real full disk while writing a checkpoint")  # fmt: skip
        assert "inline_container" not in message
        assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
        assert torch.load(last, weights_only=True)["global_step"] == 8
        bigger = subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=False)
        assert bigger.returncode == 0
        code, err = quiet_cli(["fit", "--config", config(run=run), "--ckpt_path", "last"])
        assert code == 0, err[-3000:]
        resumed, whole = load_state(last), load_state(trained)
        assert resumed.keys() == whole.keys()
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def _clt_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clt_lightning.cli", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=600)  # fmt: skip


def test_full_disk_under_retrieval_memory_maps(config, trained, tmp_path):
    """The issue's input: `clt retrieve` writing its descriptor memory maps to a nearly
    full tmpfs died of SIGBUS (exit 135, no message). The blocks are now reserved up
    front: exit 2 naming the descriptors file, no partial file left; the rerun with space
    succeeds. Run as a real process (a SIGBUS would kill pytest)."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "retrieval"
        args = ["retrieve", "--config", config(), "--ckpt_path", str(trained),
                "--retrieval.output_dir", str(out), "--retrieval.query_index", "1"]  # fmt: skip
        filler = leave_free(disk, 32 * 1024)  # the 3 maps are created sparse, not filled
        result = _clt_process(args)
        assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
        line = result.stderr.split("clt: error: ", 1)[1].strip()
        assert "\n" not in line and "no space left on the device" in line
        assert "descriptors_layer_00.npy.partial" in line
        assert (
            not list(out.rglob("*.partial")) and not (out / "index_cls" / "manifest.json").exists()
        )
        FS_CASES.append("real full disk under the retrieval memory maps (real process)")
        filler.unlink()
        result = _clt_process(args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "index_cls" / "manifest.json").is_file()


def test_full_disk_in_evaluate_and_export_names_the_file(config, trained, tmp_path):
    """`clt evaluate` and `clt export` on a full tmpfs: one line naming the file being
    written, no file under its final name; both succeed once there is space."""
    ckpt = str(trained)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        filler = leave_free(disk, 0)
        export = [
            "export",
            "--config",
            config(),
            "--ckpt_path",
            ckpt,
            "--output_dir",
            str(disk / "export"),
        ]
        evaluate = ["evaluate", "--config", config(), "--ckpt_path", ckpt,
                    "--evaluation.output_dir", str(disk / "eval"), "--evaluation.figures", "false"]  # fmt: skip
        expect_one_line(export, "no space left on the device while writing", "clt.safetensors",
                        name="real full disk in clt export")  # fmt: skip
        assert not list(disk.rglob("clt.safetensors")) and not list(disk.rglob("*.tmp"))
        expect_one_line(evaluate, "no space left on the device while writing", str(disk / "eval"),
                        name="real full disk in clt evaluate")  # fmt: skip
        assert not (disk / "eval" / "run.json").exists() and not list(disk.rglob("*.tmp"))
        filler.unlink()
        for args in (export, evaluate):
            code, err = quiet_cli(args)
            assert code == 0, err[-3000:]
        assert (disk / "export" / "clt.safetensors").is_file() and (
            disk / "eval" / "run.json"
        ).is_file()


def test_full_disk_under_metrics_csv_names_the_file(tmp_path):
    """The run's metrics.csv writer on a real full tmpfs: a DiskSpaceError naming the file
    (a write's ENOSPC carries no file name) that says how to resume."""
    from clt_lightning.errors import DiskSpaceError
    from clt_lightning.loggers import ResumableCSVLogger

    with tmpfs(tmp_path / "disk", "1m") as disk:
        logger = ResumableCSVLogger(str(disk), name="", version="")
        logger.log_metrics({"train/loss": 1.0}, step=0)
        logger.save()
        leave_free(disk, 0)
        with pytest.raises(DiskSpaceError, match=r"while writing .*metrics\.csv.*--ckpt_path last"):
            for step in range(1, 2000):  # flushed every 100 steps; more than a page of rows
                logger.log_metrics({"train/loss": 1.0 / step, "val/r2": 0.5}, step=step)
            logger.save()
    FS_CASES.append("real full disk under metrics.csv")


def test_report_fs_cases():
    """Print the cases that ran (for docs/reliability.md; run with -s)."""
    print(f"\n{len(FS_CASES)} file-system cases handled:")
    for name in FS_CASES:
        print(f"  - {name}")
