"""One-line messages for the errors the CLI reports (no traceback, exit status 2).

- A `CLTError` raised inside a DataLoader worker reaches the main process re-raised by
  torch with "Caught CorruptShardError in DataLoader worker process 1. Original Traceback
  ..." as its text; `user_message` recovers the original message.
- An OSError the package did not turn into a `CLTError` (a read-only folder, a file where a
  folder is expected, a permission) is described by `describe_os_error`: the operation,
  the path and the reason, e.g. "cannot create the folder /data/cache/train: Read-only
  file system (OSError); the file system is read-only: choose a writable folder".
"""

from __future__ import annotations

import errno
import re
import traceback

from clt_lightning.errors import CLTError
from clt_lightning.files import is_disk_full

_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


_OPERATIONS = (  # (pattern in the failing call, what the user is told was being done)
    (re.compile(r"\bmkdirs?\b|makedirs"), "create the folder"),
    (re.compile(r"\b(replace|rename|move)\b"), "rename into"),
    (re.compile(r"\b(unlink|remove|rmtree|rmdir)\b"), "remove"),
    (re.compile(r"\b(scandir|iterdir|listdir|glob)\b"), "list the folder"),
    (re.compile(r"\b(read_text|read_bytes|load|safe_open|load_file)\b"), "read"),
    (re.compile(r"\b(write|write_text|write_bytes|save|savefig|touch|mkstemp|copy\w*)\b"), "write"),
    (re.compile(r"\bflock\b"), "lock"),
    (re.compile(r"\bopen\b"), "open"),
)


def describe_os_error(error: OSError) -> str:
    """One line for an OSError the package did not expect: the operation, path and reason.

    The operation is read from the innermost frame of the traceback that names a file
    operation (`mkdir`, `open`, `os.replace`, ...), e.g. "cannot create the folder
    /data/cache/train: Read-only file system (OSError); the file system is read-only:
    choose a writable folder".

    Args:
        error: Any OSError (raised, so that it has a traceback).

    Returns:
        The message (no "clt: error:" prefix).
    """
    operation = "access"
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        text = f"{frame.name} {frame.line or ''}"
        found = next((verb for pattern, verb in _OPERATIONS if pattern.search(text)), None)
        if found is not None:
            operation = found
            break
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    reason = error.strerror or str(error) or type(error).__name__
    hint = _OS_ERROR_HINTS.get(error.errno, "")
    where = " -> ".join(paths) if paths else "a file"
    return f"cannot {operation} {where}: {reason} ({type(error).__name__}){hint}"


_OS_ERROR_HINTS = {
    errno.EROFS: "; the file system is read-only: choose a writable folder",
    errno.EACCES: "; check the permissions or choose another folder",
    errno.EPERM: "; check the permissions or choose another folder",
    errno.ENOTDIR: "; a file stands where a folder is expected: choose a folder path",
    errno.EEXIST: "; a file stands where a folder is expected: choose a folder path",
    errno.EISDIR: "; a folder stands where a file is expected: choose a file path",
    errno.ENOENT: "; check the path",
}


def worker_original_message(text: str) -> str:
    """The original exception text of a message torch re-raised from a DataLoader worker
    (unchanged when `text` is not one)."""
    _, found, trace = text.partition(_WORKER_TRACEBACK)
    if not found:
        return text
    lines = trace.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    while start < len(lines) and lines[start].startswith("    "):  # source line, ^^^ marks
        start += 1
    original = "\n".join(lines[start:]).strip()
    return re.sub(r"^[\w.]+: ", "", original, count=1) or text


def user_message(error: BaseException) -> str:
    """What the CLI prints after "clt: error: " for a CLTError or an OSError.

    Args:
        error: A `CLTError` (its message), or an OSError (described by the operation and
            path; a full disk says how to resume).
    """
    text = worker_original_message(str(error))
    if isinstance(error, CLTError) or text != str(error):  # ours, or from a worker
        return text
    if is_disk_full(error):
        where = getattr(error, "filename", None) or text
        return (
            f"no space left on the device ({where}); free some space and rerun: `clt cache` "
            "resumes after its last complete shard, `clt fit` with --ckpt_path last, the other "
            "commands start over"
        )
    if isinstance(error, OSError):
        return describe_os_error(error)
    return text
