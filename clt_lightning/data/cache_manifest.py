"""Validation of an activation cache's manifest.json before any of it is used.

A manifest is read by the reader (`open_cache`) and by a resuming writer; both call
`validate_manifest` first, so a deleted or retyped field is one `CacheError` naming the
manifest and the field (`shards[3].sha256`), not a KeyError or TypeError when that shard is
reached. The statistics (which set the CLT's normalisation) are protected by
`stats_sha256`, the sha256 of their canonical JSON (`stats_digest`): an edited or damaged
`stats` object is refused rather than trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clt_lightning.data.cache_format import SHARD_FILE_RE
from clt_lightning.errors import CacheError

SHA256_RE = re.compile(r"[0-9a-f]{64}")

_POSITIVE = ("n_layers", "d_model", "tokens_per_image")
_OBJECTS = ("teacher", "dataset", "stats")
_SHARD_FIELDS = {"file": str, "sha256": str, "bytes": int, "n_images": int}


def stats_digest(stats: Mapping[str, Any]) -> str:
    """sha256 of the statistics' canonical JSON (sorted keys; floats round-trip exactly)."""
    text = json.dumps(stats, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(manifest_path: Path, field: str, problem: str) -> CacheError:
    return CacheError(
        f"cache manifest {manifest_path}: field {field!r} {problem}; the manifest is damaged "
        f"or was edited: delete {manifest_path.parent} and rerun `clt cache --config ...`"
    )


def _check_top_level(manifest_path: Path, manifest: Mapping[str, Any]) -> None:
    required = ("format_version", "complete", *_POSITIVE, "dtype", "shards", *_OBJECTS)
    for field in required:
        if field not in manifest:
            raise _fail(manifest_path, field, "is missing")
    if not _is_int(manifest["format_version"]):
        raise _fail(manifest_path, "format_version", "is not an integer")
    if not isinstance(manifest["complete"], bool):
        raise _fail(manifest_path, "complete", "is not true or false")
    for field in _POSITIVE:
        if not _is_int(manifest[field]) or manifest[field] <= 0:
            raise _fail(manifest_path, field, f"is {manifest[field]!r}, not a positive integer")
    if not isinstance(manifest["dtype"], str):
        raise _fail(manifest_path, "dtype", "is not a string")
    for field in _OBJECTS:
        if not isinstance(manifest[field], dict):
            raise _fail(manifest_path, field, "is not an object")
    if not isinstance(manifest["shards"], list):
        raise _fail(manifest_path, "shards", f"is {manifest['shards']!r}, not a list of shards")


def _check_shards(manifest_path: Path, shards: list[Any]) -> None:
    for i, record in enumerate(shards):
        if not isinstance(record, dict):
            raise _fail(manifest_path, f"shards[{i}]", "is not an object")
        for field, kind in _SHARD_FIELDS.items():
            value = record.get(field)
            if value is None:
                raise _fail(manifest_path, f"shards[{i}].{field}", "is missing")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise _fail(manifest_path, f"shards[{i}].{field}", f"is {value!r}")
        if not SHARD_FILE_RE.fullmatch(record["file"]):
            raise _fail(
                manifest_path, f"shards[{i}].file", f"is {record['file']!r}, not a shard name"
            )
        if not SHA256_RE.fullmatch(record["sha256"]):
            raise _fail(manifest_path, f"shards[{i}].sha256", "is not a hex sha256")
        if record["bytes"] < 0 or record["n_images"] < 0:
            raise _fail(manifest_path, f"shards[{i}]", "has a negative size or image count")


def _check_stats(manifest_path: Path, manifest: Mapping[str, Any]) -> None:
    stats = manifest["stats"]
    if not _is_int(stats.get("n_tokens")) or stats["n_tokens"] < 0:
        raise _fail(manifest_path, "stats.n_tokens", "is not a non-negative integer")
    for side in ("x", "y"):
        if not isinstance(stats.get(side), dict):
            raise _fail(manifest_path, f"stats.{side}", "is missing or not an object")
        for field in ("mean", "m2"):
            if not isinstance(stats[side].get(field), list):
                raise _fail(manifest_path, f"stats.{side}.{field}", "is missing or not a list")
    recorded = manifest.get("stats_sha256")
    if recorded is None:
        raise _fail(manifest_path, "stats_sha256", "is missing (it protects the statistics)")
    try:
        digest = stats_digest(stats)
    except (TypeError, ValueError) as error:
        raise _fail(manifest_path, "stats", f"is not plain JSON numbers ({error})") from error
    if digest != recorded:
        raise _fail(
            manifest_path, "stats", "does not match stats_sha256 (the statistics were altered)"
        )


def validate_manifest(manifest_path: Path, manifest: Mapping[str, Any]) -> None:
    """Check every field a reader or a resuming writer uses, before using any.

    Args:
        manifest_path: The manifest file (for messages).
        manifest: Its parsed JSON object.

    Raises:
        CacheError: Naming the manifest and the first missing, mistyped or inconsistent
            field, or statistics that do not match `stats_sha256`.
    """
    _check_top_level(manifest_path, manifest)
    _check_shards(manifest_path, manifest["shards"])
    if "n_images" in manifest:
        listed = sum(record["n_images"] for record in manifest["shards"])
        if manifest["n_images"] != listed:
            raise _fail(
                manifest_path, "n_images", f"is {manifest['n_images']!r}; the shards hold {listed}"
            )
    _check_stats(manifest_path, manifest)
