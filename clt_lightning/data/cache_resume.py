"""Settings and resume checks of the activation cache writer.

Owns settings comparison (`settings_diff`), starting or resuming a cache from its manifest,
the safety checks before writing (foreign files, listed shards, free disk space) and the
exclusive writer lock. `clt_lightning.data.cache` is the public facade.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clt_lightning.data.cache_format import (
    _SHARD_RE,
    DTYPES,
    LOCK_NAME,
    MANIFEST_NAME,
    _human_bytes,
    _read_manifest,
)
from clt_lightning.data.cache_manifest import validate_manifest
from clt_lightning.data.cache_shards import _CacheState
from clt_lightning.data.cache_stats import Moments
from clt_lightning.errors import (
    CacheError,
    CorruptShardError,
    DiskSpaceError,
)
from clt_lightning.hashing import file_sha256

try:  # POSIX only; elsewhere concurrent writers are not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("clt_lightning.data.cache")  # one logger for the whole cache


# ------------------------------------------------------------- writer: settings & resume


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted field names whose values differ, as `field: old (cache) vs new (requested)`."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    absent = "<absent>"
    return [
        f"{key}: {a.get(key, absent)!r} (cache) vs {b.get(key, absent)!r} (requested)"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, absent) != b.get(key, absent)
    ]


def _check_foreign_files(out_dir: Path) -> None:
    """Refuse to start a cache in a folder holding anything but leftovers of a cache."""
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if not (_SHARD_RE.fullmatch(p.name) or p.name == LOCK_NAME or p.name.endswith(".tmp"))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise CacheError(
            f"{out_dir} has no {MANIFEST_NAME} but is not empty ({shown}); refusing to write an "
            f"activation cache into it: choose an empty or new folder"
        )


def _check_listed_shards(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Before appending: every listed shard is there, of its size, and of its sha256 (a
    bit flip in a listed shard would otherwise be resumed and marked complete)."""
    shards = manifest["shards"]
    for record in shards:
        path = out_dir / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise CorruptShardError(
                f"{path} is listed in {out_dir / MANIFEST_NAME} with {record['bytes']} bytes "
                f"but is {found}; delete {out_dir} and rerun to rebuild the cache"
            )
    for record in tqdm(shards, desc="verifying written shards", unit="shard", leave=False):
        path = out_dir / record["file"]
        if file_sha256(path) != record["sha256"]:
            raise CorruptShardError(
                f"{path} does not match its sha256 in {out_dir / MANIFEST_NAME} (corrupted "
                f"since it was written); delete {out_dir} and rerun to rebuild the cache"
            )


def _start_or_resume(
    out_dir: Path, settings: dict[str, Any], batch_size: int
) -> _CacheState | None:
    """Load a matching unfinished cache, start a new one, or return None when complete.

    Raises:
        CacheError: The folder holds a cache made with other settings (names the fields),
            or holds unrelated files.
    """
    manifest_path = out_dir / MANIFEST_NAME
    n_layers, d_model = settings["n_layers"], settings["d_model"]
    if not manifest_path.exists():
        _check_foreign_files(out_dir)
        manifest = {
            **settings,
            "complete": False,
            "batch_size": batch_size,
            "n_images": 0,
            "n_skipped": 0,
            "shards": [],
            "skipped": [],
        }
        return _CacheState(
            manifest, Moments.empty(n_layers, d_model), Moments.empty(n_layers, d_model)
        )
    manifest = _read_manifest(manifest_path)
    validate_manifest(manifest_path, manifest)
    diff = settings_diff({key: manifest.get(key) for key in settings}, settings)
    if diff:
        raise CacheError(
            f"the cache in {out_dir} was made with different settings:\n  "
            + "\n  ".join(diff)
            + f"\nIt is never appended to or reused: choose another folder or delete {out_dir}."
        )
    if manifest.get("complete"):
        return None
    _check_listed_shards(out_dir, manifest)
    if manifest.get("batch_size") != batch_size:
        logger.warning(
            "resuming with batch_size=%d (the cache was started with %s): new shards may "
            "differ from an uninterrupted run in the last bits",
            batch_size,
            manifest.get("batch_size"),
        )
    stats = manifest["stats"]
    x = Moments.from_json(stats["n_tokens"], stats["x"], n_layers, d_model)
    y = Moments.from_json(stats["n_tokens"], stats["y"], n_layers, d_model)
    return _CacheState(manifest, x, y)


@contextlib.contextmanager
def _exclusive_lock(out_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on `out_dir/.lock` so two writers never share a folder."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(out_dir / LOCK_NAME, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise CacheError(
                f"another process is writing the cache in {out_dir}; wait for it to finish"
            ) from e
        yield


def _check_disk_space(out_dir: Path, n_images: int, settings: Mapping[str, Any]) -> None:
    """Refuse to start when the remaining shards cannot fit on the device."""
    per_image = (
        2
        * settings["tokens_per_image"]
        * settings["n_layers"]
        * settings["d_model"]
        * DTYPES[settings["dtype"]].itemsize
    )
    needed = n_images * per_image
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise DiskSpaceError(
            f"the cache in {out_dir} needs about {_human_bytes(needed)} more "
            f"({n_images} images x {_human_bytes(per_image)}) but only {_human_bytes(free)} is "
            f"free there; free space, choose another folder, or cache fewer tokens "
            f"(tokens='cls+random') or a smaller dtype"
        )
    logger.info("cache needs ~%s, %s free", _human_bytes(needed), _human_bytes(free))
