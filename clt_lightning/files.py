"""Atomic file writes shared by the package (exports, teachers, evaluation results, figures).

A file is written to a temp file in the destination folder, fsynced and `os.replace`d over
the destination, so a kill or a full disk leaves either the old file or the new one, never
a half-written file under the final name. `atomic_write_stream` is the streaming form used
for large payloads (cache shards, checkpoints): content written by a callback into a fixed
hidden temp name, a full disk reported as `DiskSpaceError`, the folder fsynced after the
rename.

`commit_folder` does the same for a multi-file output (an export, a retrieval index, an
evaluation): the files are written into a hidden sibling staging folder, which is then
swapped in for the destination with two renames (old folder aside, staging folder in).
A kill at any moment leaves the old folder or the new one, never a mix; a kill between the
two renames leaves the old folder under `previous_folder(path)`, which `recover_folder`
(called by the next commit and by the readers) puts back.

A full disk is reported the same way everywhere: `DiskSpaceError` naming the destination
file (`is_disk_full` also recognises the ENOSPC that torch's zip writer and FAISS turn into
a RuntimeError). `allocate` reserves a file's blocks up front, so a memory-mapped file on a
full disk is an error, not a SIGBUS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from clt_lightning.errors import ConfigError, DiskSpaceError


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


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) says the device or the quota is full.

    torch's zip writer and FAISS report a failed write as a RuntimeError whose text holds
    the C library's message; an OSError carries the errno.
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, RuntimeError) and any(
            os.strerror(code) in str(error) for code in DISK_FULL_ERRNOS
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


class _RecordingWriter:
    """A binary file proxy that remembers the OSError a `write` raised: torch.save swallows
    it and raises its own RuntimeError ("unexpected pos ..."), losing the ENOSPC."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)


def allocate(path: Path, n_bytes: int, *, what: str) -> None:
    """Reserve the blocks of `path` (at least `n_bytes`) so later writes through a memory
    map cannot fail with SIGBUS when the device fills up.

    Args:
        path: An existing file.
        n_bytes: Its final size.
        what: Says what the file is, for the error ("the layer-3 descriptors").

    Raises:
        DiskSpaceError: The device has no room for `n_bytes` (names the file).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(1, n_bytes))
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise DiskSpaceError(
                f"no space left on the device for {what} {path} ({n_bytes} bytes); free some "
                "space or choose another folder and rerun"
            ) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. some network mounts
            raise
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
    recorder: _RecordingWriter | None = None
    try:
        with open(tmp, "wb") as f:
            recorder = _RecordingWriter(f)
            write(recorder)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        swallowed = recorder.error if recorder is not None else None
        if is_disk_full(error) or (swallowed is not None and is_disk_full(swallowed)):
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

    Raises:
        DiskSpaceError: The device filled up (names `path`; any previous file is intact).
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
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskSpaceError(
                f"no space left on the device while writing {path} ({len(data)} bytes); "
                "nothing was written under that name (a previous file there is intact): free "
                "some space and rerun"
            ) from error
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def staging_folder(path: Path) -> Path:
    """The hidden sibling folder a `commit_folder` output is written into."""
    return path.with_name(f".{path.name}.partial")


def previous_folder(path: Path) -> Path:
    """Where `commit_folder` moves the old folder between its two renames."""
    return path.with_name(f".{path.name}.previous")


def recover_folder(path: str | Path) -> None:
    """Finish a `commit_folder` that was killed between its two renames.

    The old folder is put back when the new one is not in place yet; it is deleted when
    the new one is. A no-op when no commit was interrupted.
    """
    path = Path(path)
    previous = previous_folder(path)
    if not previous.is_dir():
        return
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(previous, path)
        fsync_dir(path.parent)


def check_replaceable(path: str | Path, owned: Callable[[Path], bool], what: str) -> None:
    """Refuse (before any work) an output folder that `commit_folder` could not replace.

    Raises:
        ConfigError: `path` is a file, or holds entries `owned` does not recognise.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder: give a folder (new or empty) for {what}")
    foreign = sorted(p.name for p in path.iterdir() if not owned(p))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"{path} holds files that are not {what} ({shown}); it is replaced as a whole, "
            "so choose a new or empty folder"
        )


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def retire_folder(path: Path) -> None:
    """First rename of a commit: the old folder (if any) moves to `previous_folder(path)`."""
    if path.exists():
        os.replace(path, previous_folder(path))


def install_folder(staging: Path, path: Path) -> None:
    """Second rename of a commit: the staging folder becomes `path`."""
    os.replace(staging, path)
    fsync_dir(path.parent)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(path: Path, staging: Path, keep: Callable[[Path], bool]) -> None:
    """Hard-link the old folder's kept entries into the staging folder (the old folder is
    untouched, so a kill at any moment loses nothing)."""
    if not path.is_dir():
        return
    for entry in path.iterdir():
        if keep(entry) and not (staging / entry.name).exists():
            if entry.is_dir():
                shutil.copytree(entry, staging / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(staging / entry.name))


@contextlib.contextmanager
def commit_folder(
    path: str | Path,
    owned: Callable[[Path], bool],
    what: str,
    keep: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Write a multi-file output as a unit: yields an empty staging folder to fill.

    On a normal exit the staging folder replaces `path` (old folder aside, staging folder
    in, old folder deleted); on an exception it is deleted and `path` is untouched.

    Args:
        path: The output folder (created; an existing one is replaced as a whole).
        owned: True for an entry of an existing `path` that this output writes; any other
            entry makes the commit refuse to start (replacing would delete it).
        what: What the folder holds, for messages ("a clt export").
        keep: True for an entry of the old folder that the new one keeps unless it writes
            its own (e.g. per-epoch subfolders); carried over as hard links before the swap.

    Raises:
        ConfigError: `path` is a file, or holds entries `owned` does not recognise.
    """
    path = Path(path)
    recover_folder(path)
    check_replaceable(path, owned, what)
    staging = staging_folder(path)
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier, killed commit
    staging.mkdir(parents=True)
    try:
        yield staging
        if keep is not None:
            _carry_over(path, staging, keep)
        _fsync_tree(staging)
    except DiskSpaceError as error:  # name the output the user asked for, not the staging one
        shutil.rmtree(staging, ignore_errors=True)
        raise DiskSpaceError(
            f"{str(error).replace(str(staging), str(path))} ({what} in {path} unchanged)"
        ) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retire_folder(path)
    install_folder(staging, path)
    shutil.rmtree(previous_folder(path), ignore_errors=True)


def require_folder(path: str | Path, key: str) -> Path:
    """Check that `path` is, or can become, a folder: neither it nor a parent is a file.

    Args:
        path: A folder setting's value.
        key: The setting, for the message (e.g. "data.cache_dir").

    Returns:
        `path` as a Path (nothing is created).

    Raises:
        ConfigError: `path` or one of its parents exists and is not a folder.
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                named = "it" if candidate == path else f"its parent {candidate}"
                raise ConfigError(
                    f"{key}={str(path)!r} must be a folder, but {named} is a file; "
                    "choose a folder path"
                )
            break
    return path


def require_writable_folder(path: str | Path, key: str) -> Path:
    """`require_folder`, then create the folder and check a file can be made in it, so a
    read-only or forbidden output folder is refused before any work.

    Args:
        path: An output folder setting's value.
        key: The setting, for the message (e.g. "evaluation.output_dir").

    Returns:
        `path` as a Path (created if missing).

    Raises:
        ConfigError: A file stands there, or the folder cannot be created or written
            (read-only file system, permissions); names the key, path and reason.
    """
    path = require_folder(path, key)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(
            f"{key}={str(path)!r} cannot be written: {error.strerror or error}; choose a "
            "writable folder"
        ) from error
    return path


def human_bytes(n: float) -> str:
    """Format a byte count in decimal units for messages (`1.84 MB`, `512 B`).

    Args:
        n: Bytes.
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def atomic_write_via_path(
    path: Path, write: Callable[[Path], None], *, disk_full: str, temp: Path | None = None
) -> Path:
    """Atomic write for a writer that only takes a file name (FAISS ``write_index``, a
    numpy memmap): ``write(temp)`` fills the temp file, then fsync, `os.replace`, and the
    folder is fsynced.

    Args:
        path: Final file path.
        write: Writes (or finishes writing) the whole content of the file it is given.
        disk_full: Completes "no space left on the device while writing ..." when the device
            fills up (name the file and say what is still intact).
        temp: The temp file name, in `path`'s folder (default: `temp_path(path)`).

    Returns:
        `path`.

    Raises:
        DiskSpaceError: The device ran out of space (the temp file is removed, `path` intact).
    """
    temp = temp_path(path) if temp is None else temp
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskSpaceError(
                f"no space left on the device while writing {disk_full}"
            ) from error
        raise
    fsync_dir(path.parent)
    return path
