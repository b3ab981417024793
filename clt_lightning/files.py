"""Atomic file writes shared by the package (exports, teachers, evaluation results, figures).

A file is written to a temp file in the destination folder, fsynced and `os.replace`d over
the destination, so a kill or a full disk leaves either the old file or the new one, never
a half-written file under the final name. `atomic_write_stream` is the streaming form used
for large payloads (cache shards, checkpoints): content written by a callback into a fixed
hidden temp name, a full disk reported as `DiskSpaceError`, the folder fsynced after the
rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from clt_lightning.errors import DiskSpaceError


def temp_path(path: Path) -> Path:
    """The hidden temp file `path` is streamed into before the rename (same folder)."""
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], None], *, disk_full: str) -> None:
    """Stream a file through `temp_path(path)`, fsync, `os.replace`, then fsync the folder.

    Args:
        path: Final file path.
        write: Writes the whole content to the open temp file.
        disk_full: Completes "no space left on the device while writing ..." when the device
            fills up (name the file and say what is still intact).

    Raises:
        DiskSpaceError: The device ran out of space (the temp file is removed, `path` intact).
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(
                f"no space left on the device while writing {disk_full}"
            ) from error
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically: temp file in the same folder, fsync, `os.replace`.

    Args:
        path: Destination file; parent folders are created.
        data: File content.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
