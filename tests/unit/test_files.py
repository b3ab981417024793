"""`files.commit_folder`: a multi-file output is the old folder or the new one, never a mix."""

from __future__ import annotations

from pathlib import Path

import pytest

from clt_lightning.errors import ConfigError
from clt_lightning.files import (
    commit_folder,
    previous_folder,
    recover_folder,
    retire_folder,
    staging_folder,
)


def owned(entry: Path) -> bool:
    return entry.suffix == ".txt" or entry.name == "sub"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def write(folder: Path, version: str, names=("a.txt", "b.txt")) -> None:
    for name in names:
        (folder / name).write_text(f"{name} {version}")


def test_new_folder_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "out"
    with commit_folder(out, owned, "test output") as staging:
        assert staging == staging_folder(out) and not out.exists()
        write(staging, "old", ("a.txt", "b.txt", "c.txt"))
    with commit_folder(out, owned, "test output") as staging:
        write(staging, "new")
    assert tree(out) == {"a.txt": b"a.txt new", "b.txt": b"b.txt new"}  # no stale c.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no previous


def test_an_error_while_writing_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with commit_folder(out, owned, "test output") as staging:
        write(staging, "old")
    before = tree(out)
    with pytest.raises(RuntimeError), commit_folder(out, owned, "test output") as staging:
        (staging / "a.txt").write_text("a.txt new")
        raise RuntimeError("killed half-way")
    assert tree(out) == before
    assert not staging_folder(out).exists()


def test_kill_between_the_renames_is_recovered(tmp_path):
    """The old folder moved aside, the new one not yet in place: readers and the next
    commit put the old one back; after the second rename, the leftover is dropped."""
    out = tmp_path / "out"
    with commit_folder(out, owned, "test output") as staging:
        write(staging, "old")
    before = tree(out)
    retire_folder(out)  # what a kill between the two renames leaves
    assert not out.exists() and previous_folder(out).is_dir()
    recover_folder(out)
    assert tree(out) == before and not previous_folder(out).exists()
    (previous_folder(out)).mkdir()  # a kill after the second rename, before the cleanup
    recover_folder(out)
    assert tree(out) == before and not previous_folder(out).exists()


def test_foreign_entries_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    refused = pytest.raises(ConfigError, match=r"out holds files that are not test output")
    with refused, commit_folder(out, owned, "test output"):
        raise AssertionError("not reached")
    assert (out / "notes.md").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"), commit_folder(a_file, owned, "x"):
        raise AssertionError("not reached")


def test_kept_entries_are_carried_over(tmp_path):
    out = tmp_path / "out"
    with commit_folder(out, owned, "test output") as staging:
        write(staging, "old")
        (staging / "sub").mkdir()
        (staging / "sub" / "x.txt").write_text("kept")
    with commit_folder(out, owned, "test output", keep=lambda p: p.name == "sub") as staging:
        write(staging, "new", ("a.txt",))
    assert tree(out) == {"a.txt": b"a.txt new", "sub/x.txt": b"kept"}


def test_evaluation_folders_keep_per_epoch_results(tmp_path):
    """`evaluation/epoch_XX` (EvaluationCallback) survives the fit-end rewrite of
    `evaluation/`; a leftover of a killed per-epoch evaluation does not block it."""
    from clt_lightning.evaluation.suite import (
        EVALUATION_WHAT,
        evaluation_owned,
        evaluation_subfolder,
    )

    out = tmp_path / "evaluation"
    (out / "epoch_00").mkdir(parents=True)
    (out / "epoch_00" / "run.json").write_text("{}")
    (out / ".epoch_01.partial").mkdir()
    (out / "cascade.json").write_text("old")
    with commit_folder(out, evaluation_owned, EVALUATION_WHAT, keep=evaluation_subfolder) as new:
        (new / "cascade.json").write_text("new")
    assert tree(out) == {"cascade.json": b"new", "epoch_00/run.json": b"{}"}
    (out / "checkpoints").mkdir()
    refused = pytest.raises(ConfigError, match="checkpoints")
    with refused, commit_folder(out, evaluation_owned, EVALUATION_WHAT):
        raise AssertionError("not reached")
