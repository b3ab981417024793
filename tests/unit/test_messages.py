"""The CLI's one-line messages: worker errors unwrapped, OSErrors described, full disks seen."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from clt_lightning.errors import CacheError, ConfigError
from clt_lightning.files import is_disk_full, require_folder
from clt_lightning.messages import describe_os_error, user_message

ORIGINAL = "the cache in /x was made with different settings:\n  dtype: 'fp16' (cache) vs 'fp32'"


class Failing(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise CacheError(ORIGINAL)


def test_error_from_a_real_worker_process_is_the_original_message() -> None:
    with pytest.raises(CacheError) as caught:
        next(iter(DataLoader(Failing(), num_workers=1)))
    assert "DataLoader worker" in str(caught.value)  # what torch makes of it
    assert user_message(caught.value) == ORIGINAL


def _raised(action) -> OSError:
    try:
        action()
    except OSError as error:
        return error
    raise AssertionError("no OSError")


def test_os_errors_name_the_operation_and_the_path(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    error = _raised(lambda: (a_file / "sub").mkdir(parents=True))
    assert describe_os_error(error).startswith(f"cannot create the folder {a_file / 'sub'}: ")
    assert "a file stands where a folder is expected" in describe_os_error(error)
    error = _raised(lambda: os.replace(tmp_path / "nope", tmp_path / "dst"))
    assert describe_os_error(error).startswith(
        f"cannot rename into {tmp_path / 'nope'} -> {tmp_path / 'dst'}: No such file"
    )
    error = _raised(lambda: open(tmp_path, "rb"))  # noqa: SIM115
    assert describe_os_error(error).startswith(f"cannot open {tmp_path}: Is a directory")


def test_disk_full_is_seen_through_cpp_runtime_errors() -> None:
    faiss_text = (
        "Error in faiss::write_index: write error in /d/i.faiss: 1 != 2 (No space left on device)"
    )
    assert is_disk_full(RuntimeError(faiss_text))
    assert is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    wrapped = RuntimeError("unexpected pos 704 vs 598")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)


def test_require_folder(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert require_folder(tmp_path / "new" / "deeper", "k") == tmp_path / "new" / "deeper"
    with pytest.raises(
        ConfigError, match=r"k=.* must be a folder, but its parent .*file is a file"
    ):
        require_folder(a_file / "sub", "k")
    with pytest.raises(ConfigError, match=r"but it is a file"):
        require_folder(a_file, "k")
