"""Background shard writer of the activation cache.

Owns the shard job and run state (`ShardJob`, `CacheState`), the finiteness check, and
`ShardWriter`: the single background thread that computes statistics, hashes, serialises
and fsyncs each shard and commits it to the manifest.

Design decision: statistics, hashing, serialisation and fsync run on one background writer
thread with at most `_MAX_PENDING_SHARDS` shards handed over and not yet committed, so disk
work overlaps the teacher's forward pass. The writer thread owns the manifest while a run
is in flight.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from clt_lightning.data import cache_format
from clt_lightning.data.cache_format import shard_file_name
from clt_lightning.data.cache_manifest import stats_digest
from clt_lightning.data.cache_stats import Moments
from clt_lightning.errors import CacheError
from clt_lightning.files import human_bytes

logger = logging.getLogger("clt_lightning.data.cache")  # one logger for all cache_* modules


_MAX_PENDING_SHARDS = 2  # shards handed to the writer thread and not yet committed


# ------------------------------------------------------------------------ writer: state


@dataclass
class ShardJob:
    """One finished shard handed to the writer thread.

    Attributes:
        index: Shard index i (file `shard_file_name(i)`).
        first_image_id: First dataset image id the shard covers.
        end_image_id: One past its last image id.
        tensors: The shard's tensors (`SHARD_TENSORS`), x and y [n, T', L, d].
        skipped: {"image_id", "reason"} of the unreadable images left out.
    """

    index: int
    first_image_id: int
    end_image_id: int
    tensors: dict[str, Tensor]
    skipped: list[dict[str, Any]]


@dataclass
class CacheState:
    """The manifest being built, with the running statistics as float64 arrays.

    Attributes:
        manifest: Every manifest field but the statistics.
        x: Running moments of the stored x, [L, d].
        y: Running moments of the stored y, [L, d].
    """

    manifest: dict[str, Any]
    x: Moments
    y: Moments

    def to_manifest(self) -> dict[str, Any]:
        """The manifest with the statistics filled in (stats last, as they are long)."""
        manifest = {k: v for k, v in self.manifest.items() if k not in ("stats", "stats_sha256")}
        manifest["stats"] = {"n_tokens": self.x.n, "x": self.x.to_json(), "y": self.y.to_json()}
        manifest["stats_sha256"] = stats_digest(manifest["stats"])
        return manifest

    def commit(self, job: ShardJob, record: dict[str, Any], x: Moments, y: Moments) -> None:
        """Account for a shard whose file is on disk."""
        self.manifest["shards"].append(record)
        self.manifest["skipped"].extend(job.skipped)
        self.manifest["n_images"] += record["n_images"]
        self.manifest["n_skipped"] += len(job.skipped)
        self.x, self.y = self.x.merge(x), self.y.merge(y)


def _check_finite(moments: Moments, name: str, job: ShardJob, dtype: str) -> None:
    """Refuse a shard whose stored values overflowed (or that holds NaN)."""
    bad = [int(layer) for layer in np.flatnonzero(~np.isfinite(moments.mean).all(axis=1))]
    if bad:
        raise CacheError(
            f"shard {job.index} (images {job.first_image_id}..{job.end_image_id - 1}): "
            f"{name} at layer(s) {bad} is not finite when stored as {dtype}; values beyond the "
            f"fp16 range (65504) need dtype='bf16' or 'fp32'"
        )


class ShardWriter:
    """Background thread that commits shards in order: stats, shard file, manifest.

    At most `_MAX_PENDING_SHARDS` shards wait or are being written; `submit` blocks beyond
    that. After a failure nothing later is committed (the manifest must list a prefix of the
    shards), and the failure is raised by the next `submit` or by `close`.

    Args:
        out_dir: The cache folder.
        state: The manifest and statistics so far (committed shards are added to it).
    """

    def __init__(self, out_dir: Path, state: CacheState) -> None:
        self.out_dir, self.state = out_dir, state
        self.bytes_written = 0
        self._failed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clt-cache-writer")
        self._pending: deque[Future[None]] = deque()

    def submit(self, job: ShardJob) -> None:
        """Queue a shard; raises a previous shard's error."""
        while self._pending and (len(self._pending) >= _MAX_PENDING_SHARDS or self._failed):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._commit, job))

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every queued shard; raise the first error unless `raise_errors` is False."""
        try:
            while self._pending:
                future = self._pending.popleft()
                if raise_errors:
                    future.result()
                elif future.exception() is not None:
                    logger.error("cache writer failed too: %s", future.exception())
        finally:
            self._pool.shutdown(wait=True)

    def _commit(self, job: ShardJob) -> None:
        if self._failed:
            return
        try:
            dtype = self.state.manifest["dtype"]
            x = Moments.of_chunks(job.tensors["x"])
            y = Moments.of_chunks(job.tensors["y"])
            _check_finite(x, "x", job, dtype)
            _check_finite(y, "y", job, dtype)
            name = shard_file_name(job.index)
            metadata = {"format": "clt-activation-shard", "shard_index": str(job.index)}
            sha256, size = cache_format.write_safetensors(
                self.out_dir / name, job.tensors, metadata
            )
            record = {
                "file": name,
                "n_images": int(job.tensors["x"].shape[0]),
                "first_image_id": job.first_image_id,
                "end_image_id": job.end_image_id,
                "sha256": sha256,
                "bytes": size,
            }
            self.state.commit(job, record, x, y)
            cache_format.write_manifest(self.out_dir, self.state.to_manifest())
            self.bytes_written += size
            logger.debug("committed %s (%s)", name, human_bytes(size))
        except BaseException:
            self._failed = True
            raise
