"""Atomic file writes shared by the package (exports, teachers, evaluation results, figures).

A file is written to a temp file in the destination folder, fsynced and `os.replace`d over
the destination, so a kill or a full disk leaves either the old file or the new one, never
a half-written file under the final name. The activation cache and the checkpoint writer
stream large payloads through their own variants of the same rule (`data/cache.py`,
`checkpointing.py`), because they write through callbacks and map ENOSPC to `DiskSpaceError`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
