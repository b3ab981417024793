"""Activation cache: a sharded, checksummed, resumable store of teacher activations.

`write_cache` runs the frozen teacher over one dataset split and writes the token
activations `x` (MLP input) and `y` (MLP output) of every layer to
`out_dir/shard_{i:05d}.safetensors`, described by `out_dir/manifest.json`; `open_cache`
reads them back and verifies what it reads. `docs/cache-format.md` is the byte-level
specification (a stranger can read a cache with numpy alone).

Design decisions:

- Shard i always covers dataset image ids [i * images_per_shard, (i + 1) * images_per_shard)
  minus skipped unreadable images, and batches never straddle shards. The resume point is
  therefore a function of the manifest's shard count alone, and a resumed run feeds the
  teacher exactly the batches an uninterrupted run would.
- The manifest is the commit record. Every file is written to a temp file in the same
  folder, flushed, fsynced and `os.replace`d; a shard is committed before the manifest that
  lists it, so a kill at any moment leaves the previous or the new consistent state. A
  shard file the manifest does not list is an orphan of a killed run and is overwritten.
- Shards are safetensors files written by a small streaming writer rather than
  `safetensors.torch.save`: it hashes and writes each tensor straight from memory (no
  second and third copy of a multi-GB shard) and sorts the metadata keys, which the library
  does not (its metadata is a Rust HashMap, so two processes can write different bytes).
  Otherwise the layout is the library's own; the tests check both agree byte for byte.
- Statistics, hashing, serialisation and fsync run on one background writer thread with at
  most `_MAX_PENDING_SHARDS` shards handed over and not yet committed, so disk work overlaps
  the teacher's forward pass. The writer thread owns the manifest while a run is in flight.
- Statistics describe the values as stored (after the dtype cast): they are then the
  statistics of the exact training data and anyone can recompute them from the shards.
  They are accumulated in float64 with numpy (single-threaded, so the summation order does
  not depend on the thread count) over fixed chunks of `_STATS_CHUNK_TOKENS` stored tokens
  of each shard, each chunk two-pass (mean, then squared deviations), merged in order with
  Chan et al.'s parallel update. The running (count, mean, M2) is saved in the manifest as
  JSON floats, which round-trip float64 exactly, so a resumed run ends with bit-identical
  statistics. (The manifest rather than a side file: one atomic rename commits everything.)
- Token subsampling draws from `np.random.default_rng([seed, image_id])` per image, so the
  chosen positions depend neither on batching nor on where a run resumed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clt_lightning.errors import (
    CacheError,
    ConfigError,
    CorruptShardError,
    DiskSpaceError,
    UnreadableImageError,
)

try:  # POSIX only; elsewhere concurrent writers are not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "ActivationCache",
    "CacheStats",
    "Moments",
    "open_cache",
    "shard_file_name",
    "token_positions",
    "verify_cache",
    "write_cache",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
CacheDtype = Literal["fp16", "bf16", "fp32"]
TokenMode = Literal["all", "cls", "cls+random"]
DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
TOKEN_MODES = ("all", "cls", "cls+random")
BAD_IMAGE_POLICIES = ("error", "skip")
SHARD_TENSORS = ("x", "y", "label", "image_id", "token_index")
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_SHARD_RE = re.compile(r"shard_\d{5}\.safetensors")
_STATS_CHUNK_TOKENS = 64  # part of the format: changing it changes the last bits of stats
_MAX_PENDING_SHARDS = 2  # shards handed to the writer thread and not yet committed
_IO_CHUNK = 1 << 24  # 16 MiB; hashlib and file writes release the GIL on pieces this big
_MAX_HEADER_BYTES = 100_000_000


class CacheTeacher(Protocol):
    """What `write_cache` needs from `clt_lightning.teacher.Teacher`."""

    n_layers: int
    d_model: int
    tokens_per_image: int

    def identity(self) -> dict[str, Any]: ...

    def capture(self, images: Tensor) -> Any: ...  # Capture(x [N,T,L,d], y [N,T,L,d])


class CacheDataset(Protocol):
    """What `write_cache` needs from `clt_lightning.data.datasets.ImageDataset`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Tensor, int]: ...

    def identity(self) -> dict[str, Any]: ...


def shard_file_name(index: int) -> str:
    """File name of shard `index` inside a cache folder (`shard_00003.safetensors`)."""
    return f"shard_{index:05d}.safetensors"


def _human_bytes(n: float) -> str:
    """Format a byte count in decimal units (`1.84 MB`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Moments:
    """Streaming first and second moments of per-layer vectors, in float64.

    Attributes:
        n: Number of vectors (tokens) seen.
        mean: Per-dimension mean, [L, d].
        m2: Per-dimension sum of squared deviations from `mean`, [L, d].
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, n_layers: int, d_model: int) -> Moments:
        """Moments of no vectors at all."""
        zeros = np.zeros((n_layers, d_model), dtype=np.float64)
        return cls(0, zeros, zeros.copy())

    @classmethod
    def of(cls, values: Tensor) -> Moments:
        """Exact two-pass moments of a block of activations.

        Args:
            values: [..., L, d] activations in any float dtype; every leading index is one
                vector (e.g. [n_images, T, L, d]).
        """
        n_layers, d_model = values.shape[-2:]
        flat = values.detach().reshape(-1, n_layers * d_model).cpu()
        if flat.dtype != torch.float64:  # exact for fp16/bf16/fp32, and 3x faster than
            flat = flat.to(torch.float32)  # torch's direct half -> double conversion
        v = flat.numpy().astype(np.float64)  # always a copy: the shard is never modified
        if v.shape[0] == 0:
            return cls.empty(n_layers, d_model)
        with np.errstate(invalid="ignore", over="ignore"):  # fp16 overflow: reported later
            mean = v.mean(axis=0)
            v -= mean
            np.square(v, out=v)
            m2 = v.sum(axis=0)
        return cls(v.shape[0], mean.reshape(n_layers, d_model), m2.reshape(n_layers, d_model))

    @classmethod
    def of_chunks(cls, values: Tensor, chunk_tokens: int = _STATS_CHUNK_TOKENS) -> Moments:
        """Moments of [..., L, d] over fixed chunks of `chunk_tokens` rows, merged in order.

        Small chunks keep the float64 working set in the CPU cache (several times faster
        than one big block) and make the result independent of how the data was batched.
        """
        rows = values.reshape(-1, *values.shape[-2:])
        total = cls.empty(*values.shape[-2:])
        for start in range(0, rows.shape[0], chunk_tokens):
            total = total.merge(cls.of(rows[start : start + chunk_tokens]))
        return total

    def merge(self, other: Moments) -> Moments:
        """Combine with the moments of another set of vectors (Chan et al. 1979)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def mean_sq_norm(self) -> np.ndarray:
        """E ||v||^2 per layer, [L] (0 while no vector was seen)."""
        if self.n == 0:
            return np.zeros(self.mean.shape[0])
        return (self.m2 / self.n + self.mean * self.mean).sum(axis=1)

    def var(self) -> np.ndarray:
        """E ||v - mean||^2 per layer = sum of per-dimension variances, [L] (0 when empty)."""
        if self.n == 0:
            return np.zeros(self.mean.shape[0])
        return self.m2.sum(axis=1) / self.n

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the manifest (floats round-trip float64 exactly)."""
        return {
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "mean_sq_norm": self.mean_sq_norm().tolist(),
            "var": self.var().tolist(),
        }

    @classmethod
    def from_json(cls, n: int, data: Mapping[str, Any], n_layers: int, d_model: int) -> Moments:
        """Inverse of `to_json`; checks the shapes."""
        mean = np.asarray(data["mean"], dtype=np.float64)
        m2 = np.asarray(data["m2"], dtype=np.float64)
        if mean.shape != (n_layers, d_model) or m2.shape != (n_layers, d_model):
            raise CacheError(
                f"manifest stats have shape {mean.shape}/{m2.shape}, expected {(n_layers, d_model)}"
            )
        return cls(int(n), mean, m2)


class CacheStats(NamedTuple):
    """Per-layer statistics of the cached activations over every stored token (float64).

    Attributes:
        x_mean: Mean MLP input, [L, d].
        y_mean: Mean MLP output, [L, d].
        x_mean_sq_norm: E ||x_l||^2, [L].
        y_mean_sq_norm: E ||y_l||^2, [L].
        y_var: E ||y_l - mean||^2 (sum of per-dimension variances), [L].
        x_var: E ||x_l - mean||^2, [L].
        n_tokens: Number of stored tokens the statistics cover.
    """

    x_mean: Tensor
    y_mean: Tensor
    x_mean_sq_norm: Tensor
    y_mean_sq_norm: Tensor
    y_var: Tensor
    x_var: Tensor
    n_tokens: int


# ----------------------------------------------------------------------- token selection


@dataclass(frozen=True)
class _TokenSelection:
    """Which token positions of each image are stored."""

    mode: str
    n_random_patches: int
    seed: int
    teacher_tokens: int

    @property
    def n_tokens(self) -> int:
        """Tokens stored per image."""
        return {"all": self.teacher_tokens, "cls": 1}.get(self.mode, 1 + self.n_random_patches)

    def settings(self) -> dict[str, Any]:
        """Manifest form: only the settings that change what is stored."""
        if self.mode == "cls+random":
            return {"mode": self.mode, "n_random_patches": self.n_random_patches, "seed": self.seed}
        return {"mode": self.mode}

    def positions(self, image_ids: Sequence[int]) -> np.ndarray:
        """Stored token positions, [N, n_tokens] int64 (see `token_positions`)."""
        return token_positions(
            image_ids, self.mode, self.teacher_tokens, self.n_random_patches, self.seed
        )


def token_positions(
    image_ids: Sequence[int],
    mode: str,
    teacher_tokens: int,
    n_random_patches: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Token positions stored for each image.

    Args:
        image_ids: Dataset image ids, [N].
        mode: "all" (every token), "cls" (token 0) or "cls+random" (token 0 plus
            `n_random_patches` distinct patch positions, sorted, drawn from
            `np.random.default_rng([seed, image_id])`).
        teacher_tokens: Tokens per image of the teacher (1 + patches).
        n_random_patches: Patch tokens drawn per image in "cls+random".
        seed: Seed of the per-image generator in "cls+random".

    Returns:
        [N, T'] int64 positions, 0 = [CLS].
    """
    n = len(image_ids)
    if mode == "all":
        return np.tile(np.arange(teacher_tokens, dtype=np.int64), (n, 1))
    if mode == "cls":
        return np.zeros((n, 1), dtype=np.int64)
    out = np.zeros((n, 1 + n_random_patches), dtype=np.int64)
    for row, image_id in enumerate(image_ids):  # ids only: cheap, and independent of batching
        rng = np.random.default_rng([seed, int(image_id)])
        patches = rng.choice(teacher_tokens - 1, size=n_random_patches, replace=False)
        out[row, 1:] = np.sort(patches) + 1
    return out


# ------------------------------------------------------------------- atomic file writing


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file via a temp file in the same folder, fsync and `os.replace`.

    Args:
        path: Final file path.
        write: Writes the whole content to the open temp file.

    Raises:
        DiskSpaceError: The device ran out of space (the temp file is removed).
    """
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(
                f"no space left on the device while writing {path}; everything up to the last "
                f"complete shard is intact: free some space and rerun the same command to resume"
            ) from e
        raise
    _fsync_dir(path.parent)


def _write_chunks(f: BinaryIO, data: memoryview, digest: Any) -> None:
    """Hash and write `data` in large pieces."""
    for start in range(0, len(data), _IO_CHUNK):
        piece = data[start : start + _IO_CHUNK]
        digest.update(piece)
        f.write(piece)


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def safetensors_header(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus JSON header the safetensors library would write.

    Tensors are laid out by element size (largest first), then name, as the library does,
    so every tensor stays aligned; metadata keys are sorted so the bytes are reproducible.

    Args:
        tensors: Name -> tensor (dtypes in `_SAFETENSORS_DTYPES`).
        metadata: String -> string metadata (`__metadata__`).

    Returns:
        Header bytes; the data section is the tensors' bytes in `safetensors_order`.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in safetensors_order(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def safetensors_order(tensors: Mapping[str, Tensor]) -> list[str]:
    """Order of the tensors in the data section (element size descending, then name)."""
    return sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))


def _write_safetensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> tuple[str, int]:
    """Atomically write a safetensors file; return its sha256 hex digest and size."""
    if sys.byteorder != "little":  # pragma: no cover
        raise CacheError("writing a cache needs a little-endian machine (safetensors is LE)")
    header = safetensors_header(tensors, metadata)
    digest = hashlib.sha256()
    size = [0]

    def write(f: BinaryIO) -> None:
        _write_chunks(f, memoryview(header), digest)
        for name in safetensors_order(tensors):
            _write_chunks(f, _tensor_bytes(tensors[name]), digest)
        size[0] = f.tell()

    _atomic_write(path, write)
    return digest.hexdigest(), size[0]


def _format_json(value: Any, indent: int = 0) -> str:
    """JSON with nested containers indented and flat lists of numbers on one line."""
    pad, end = "  " * (indent + 1), "  " * indent
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {_format_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [pad + _format_json(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(value, allow_nan=False)


def _write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    text = (_format_json(manifest) + "\n").encode()
    _atomic_write(out_dir / MANIFEST_NAME, lambda f: f.write(text))


# ------------------------------------------------------------------------ writer: state


@dataclass
class _ShardJob:
    """One finished shard handed to the writer thread."""

    index: int
    first_image_id: int
    end_image_id: int
    tensors: dict[str, Tensor]
    skipped: list[dict[str, Any]]


@dataclass
class _CacheState:
    """The manifest being built, with the running statistics as float64 arrays."""

    manifest: dict[str, Any]
    x: Moments
    y: Moments

    def to_manifest(self) -> dict[str, Any]:
        """The manifest with the statistics filled in (stats last, as they are long)."""
        manifest = {k: v for k, v in self.manifest.items() if k != "stats"}
        manifest["stats"] = {"n_tokens": self.x.n, "x": self.x.to_json(), "y": self.y.to_json()}
        return manifest

    def commit(self, job: _ShardJob, record: dict[str, Any], x: Moments, y: Moments) -> None:
        """Account for a shard whose file is on disk."""
        self.manifest["shards"].append(record)
        self.manifest["skipped"].extend(job.skipped)
        self.manifest["n_images"] += record["n_images"]
        self.manifest["n_skipped"] += len(job.skipped)
        self.x, self.y = self.x.merge(x), self.y.merge(y)


def _check_finite(moments: Moments, name: str, job: _ShardJob, dtype: str) -> None:
    """Refuse a shard whose stored values overflowed (or that holds NaN)."""
    bad = [int(layer) for layer in np.flatnonzero(~np.isfinite(moments.mean).all(axis=1))]
    if bad:
        raise CacheError(
            f"shard {job.index} (images {job.first_image_id}..{job.end_image_id - 1}): "
            f"{name} at layer(s) {bad} is not finite when stored as {dtype}; values beyond the "
            f"fp16 range (65504) need dtype='bf16' or 'fp32'"
        )


class _ShardWriter:
    """Background thread that commits shards in order: stats, shard file, manifest.

    At most `_MAX_PENDING_SHARDS` shards wait or are being written; `submit` blocks beyond
    that. After a failure nothing later is committed (the manifest must list a prefix of the
    shards), and the failure is raised by the next `submit` or by `close`.
    """

    def __init__(self, out_dir: Path, state: _CacheState) -> None:
        self.out_dir, self.state = out_dir, state
        self.bytes_written = 0
        self._failed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clt-cache-writer")
        self._pending: deque[Future[None]] = deque()

    def submit(self, job: _ShardJob) -> None:
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

    def _commit(self, job: _ShardJob) -> None:
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
            sha256, size = _write_safetensors(self.out_dir / name, job.tensors, metadata)
            record = {
                "file": name,
                "n_images": int(job.tensors["x"].shape[0]),
                "first_image_id": job.first_image_id,
                "end_image_id": job.end_image_id,
                "sha256": sha256,
                "bytes": size,
            }
            self.state.commit(job, record, x, y)
            _write_manifest(self.out_dir, self.state.to_manifest())
            self.bytes_written += size
            logger.debug("committed %s (%s)", name, _human_bytes(size))
        except BaseException:
            self._failed = True
            raise


# ------------------------------------------------------------------- writer: data feed


class _Batch(NamedTuple):
    """A collated batch: the good images, and the ids and reasons of unreadable ones."""

    first_id: int
    n_requested: int
    images: Tensor | None
    labels: Tensor
    image_ids: Tensor
    bad: list[tuple[int, str]]


class _GuardedDataset(Dataset):
    """Turns `UnreadableImageError` into a sentinel so one bad file cannot kill a worker."""

    def __init__(self, dataset: CacheDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, int, str | None]:
        try:
            image, label = self.dataset[i]
        except UnreadableImageError as e:
            return i, None, -1, str(e) or type(e).__name__
        return i, image, int(label), None


def _collate(items: list[tuple[int, Tensor | None, int, str | None]]) -> _Batch:
    good = [item for item in items if item[1] is not None]
    return _Batch(
        first_id=items[0][0],
        n_requested=len(items),
        images=torch.stack([item[1] for item in good]) if good else None,
        labels=torch.tensor([item[2] for item in good], dtype=torch.int64),
        image_ids=torch.tensor([item[0] for item in good], dtype=torch.int64),
        bad=[(item[0], item[3] or "") for item in items if item[1] is None],
    )


def _shard_batches(
    start_shard: int, n_images: int, images_per_shard: int, batch_size: int
) -> list[list[int]]:
    """Image-id batches from `start_shard` on; no batch straddles two shards."""
    batches = []
    for first in range(start_shard * images_per_shard, n_images, images_per_shard):
        stop = min(first + images_per_shard, n_images)
        batches.extend(
            list(range(a, min(a + batch_size, stop))) for a in range(first, stop, batch_size)
        )
    return batches


class _ShardBuffer:
    """Collects one shard's activations in preallocated tensors of the cache dtype."""

    def __init__(
        self, index: int, first_id: int, end_id: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        self.index, self.first_id, self.end_id = index, first_id, end_id
        self.x = torch.empty((end_id - first_id, *shape), dtype=dtype)
        self.y = torch.empty_like(self.x)
        self.n = 0
        self.labels: list[Tensor] = []
        self.ids: list[Tensor] = []
        self.positions: list[np.ndarray] = [np.zeros((0, shape[0]), dtype=np.int64)]
        self.skipped: list[dict[str, Any]] = []

    def add(self, x: Tensor, y: Tensor, labels: Tensor, ids: Tensor, positions: np.ndarray) -> None:
        """Append a batch ([N, T', L, d] activations, any device and float dtype)."""
        n = x.shape[0]
        self.x[self.n : self.n + n].copy_(x)
        self.y[self.n : self.n + n].copy_(y)
        self.labels.append(labels)
        self.ids.append(ids)
        self.positions.append(positions)
        self.n += n

    def finish(self) -> _ShardJob:
        """The shard's tensors, trimmed to the images actually stored."""
        empty = torch.zeros(0, dtype=torch.int64)
        tensors = {
            "x": self.x[: self.n],
            "y": self.y[: self.n],
            "label": torch.cat([empty, *self.labels]),
            "image_id": torch.cat([empty, *self.ids]),
            "token_index": torch.from_numpy(np.concatenate(self.positions)),
        }
        return _ShardJob(self.index, self.first_id, self.end_id, tensors, self.skipped)


def _teacher_device(teacher: CacheTeacher) -> torch.device:
    """`teacher.device` when it has one, else the device of its first parameter, else CPU."""
    device = getattr(teacher, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(teacher, "parameters", None)
    if callable(parameters):
        for p in parameters():
            return p.device
    return torch.device("cpu")


def _capture_tokens(
    teacher: CacheTeacher,
    images: Tensor,
    device: torch.device,
    selection: _TokenSelection,
    positions: np.ndarray,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Run the teacher once and keep the stored token positions, cast to the cache dtype.

    Returns:
        x, y: [N, T', L, d] on the teacher's device (already in `dtype` off the CPU).
    """
    with torch.no_grad():
        capture = teacher.capture(images.to(device))
    x, y = capture.x, capture.y
    expected = (images.shape[0], teacher.tokens_per_image, teacher.n_layers, teacher.d_model)
    if tuple(x.shape) != expected or tuple(y.shape) != expected:
        raise ValueError(
            f"teacher.capture returned x {tuple(x.shape)}, y {tuple(y.shape)}; "
            f"expected {expected} = [N, T, L, d]"
        )
    if selection.mode == "cls":
        x, y = x[:, :1], y[:, :1]
    elif selection.mode == "cls+random":
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        index = torch.from_numpy(positions).to(x.device)
        x, y = x[rows, index], y[rows, index]
    if x.device.type == "cpu":  # the copy into the shard buffer casts in the same pass
        return x, y
    return x.to(dtype), y.to(dtype)  # cast on the accelerator: fewer bytes to transfer


# --------------------------------------------------------------------- writer: the run


@dataclass
class _Run:
    """Everything the production loop needs."""

    teacher: CacheTeacher
    selection: _TokenSelection
    dtype: torch.dtype
    images_per_shard: int
    n_dataset_images: int
    on_bad_image: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def new_buffer(self, index: int) -> _ShardBuffer:
        first = index * self.images_per_shard
        end = min(first + self.images_per_shard, self.n_dataset_images)
        shape = (self.selection.n_tokens, self.teacher.n_layers, self.teacher.d_model)
        return _ShardBuffer(index, first, end, shape, self.dtype)


def _handle_bad_images(run: _Run, batch: _Batch, buffer: _ShardBuffer) -> None:
    for image_id, reason in batch.bad:
        if run.on_bad_image == "error":
            raise UnreadableImageError(
                f"image {image_id} could not be read: {reason}; "
                f"pass on_bad_image='skip' to leave unreadable images out of the cache"
            )
        logger.warning("skipping unreadable image %d: %s", image_id, reason)
        buffer.skipped.append({"image_id": image_id, "reason": reason})


def _produce(run: _Run, loader: Iterator[_Batch], writer: _ShardWriter, bar: tqdm) -> None:
    """The main loop: teacher forward per batch, one shard job per finished shard."""
    buffer: _ShardBuffer | None = None
    for batch in loader:
        index = batch.first_id // run.images_per_shard
        if buffer is None or buffer.index != index:
            if buffer is not None:
                writer.submit(buffer.finish())
            buffer = run.new_buffer(index)
        _handle_bad_images(run, batch, buffer)
        if batch.images is not None:
            positions = run.selection.positions(batch.image_ids.tolist())
            x, y = _capture_tokens(
                run.teacher, batch.images, run.device, run.selection, positions, run.dtype
            )
            buffer.add(x, y, batch.labels, batch.image_ids, positions)
        bar.update(batch.n_requested)
        bar.set_postfix_str(f"{_human_bytes(writer.bytes_written)} written", refresh=False)
    if buffer is not None:
        writer.submit(buffer.finish())


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


def _cache_settings(
    teacher: CacheTeacher,
    dataset: CacheDataset,
    dtype: str,
    selection: _TokenSelection,
    images_per_shard: int,
) -> dict[str, Any]:
    """The manifest fields that must match for a cache to be resumed or reused."""
    teacher_identity = _jsonable(teacher.identity())
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_identity,
        "dataset": _jsonable(dataset.identity()),
        "dataset_n_images": len(dataset),
        "input_site": teacher_identity.get("input_site"),
        "n_layers": int(teacher.n_layers),
        "d_model": int(teacher.d_model),
        "tokens_per_image": selection.n_tokens,
        "teacher_tokens_per_image": int(teacher.tokens_per_image),
        "dtype": dtype,
        "tokens": selection.settings(),
        "images_per_shard": images_per_shard,
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"cannot read cache manifest {path}: {e}") from e
    if not isinstance(manifest, dict):
        raise CacheError(f"cache manifest {path} is not a JSON object")
    return manifest


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
    for record in manifest.get("shards", []):
        path = out_dir / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise CorruptShardError(
                f"{path} is listed in {out_dir / MANIFEST_NAME} with {record['bytes']} bytes "
                f"but is {found}; delete {out_dir} and rerun to rebuild the cache"
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


def _validate_arguments(
    dtype: str,
    tokens: str,
    on_bad_image: str,
    n_random_patches: int,
    seed: int,
    teacher_tokens: int,
    sizes: Mapping[str, int],
) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not valid; use one of {sorted(DTYPES)}")
    if tokens not in TOKEN_MODES:
        raise ConfigError(f"tokens={tokens!r} is not valid; use one of {list(TOKEN_MODES)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"on_bad_image={on_bad_image!r} is not valid; use one of {list(BAD_IMAGE_POLICIES)}"
        )
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name}={value} is not valid; it must be at least 1")
    if tokens == "cls+random" and not 1 <= n_random_patches <= teacher_tokens - 1:
        raise ConfigError(
            f"n_random_patches={n_random_patches} is not valid for a teacher with "
            f"{teacher_tokens - 1} patch tokens; use 1..{teacher_tokens - 1}"
        )
    if tokens == "cls+random" and seed < 0:
        raise ConfigError(f"seed={seed} is not valid; it must be >= 0")


def write_cache(
    teacher: CacheTeacher,
    dataset: CacheDataset,
    out_dir: str | Path,
    *,
    dtype: CacheDtype = "fp16",
    images_per_shard: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
    tokens: TokenMode = "all",
    n_random_patches: int = 16,
    on_bad_image: Literal["error", "skip"] = "error",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write (or resume, or confirm) the activation cache of one dataset split.

    Args:
        teacher: Frozen teacher (`clt_lightning.teacher.Teacher`).
        dataset: Image dataset of one split; `dataset[i]` is (image tensor, label), i the id.
        out_dir: Cache folder (created if needed).
        dtype: Stored dtype of x and y: "fp16", "bf16" or "fp32".
        images_per_shard: Dataset ids per shard file.
        batch_size: Images per teacher forward.
        num_workers: DataLoader worker processes that load and transform images.
        tokens: "all", "cls" (token 0 only) or "cls+random" (token 0 plus
            `n_random_patches` patch tokens per image, drawn with `seed`).
        n_random_patches: Patch tokens per image for tokens="cls+random".
        on_bad_image: "error" raises `UnreadableImageError`; "skip" records the image under
            `skipped` in the manifest and leaves it out.
        seed: Seed of the per-image token draw (tokens="cls+random").
        progress: Show a progress bar (images/s and bytes written).

    Returns:
        The cache folder.

    Raises:
        CacheError: The folder holds a cache made with other settings (the message names
            the differing fields), or unrelated files, or another writer holds it.
        DiskSpaceError: Not enough free space (checked before starting, and on ENOSPC).
        UnreadableImageError: An image does not decode and on_bad_image="error".
    """
    sizes = {"images_per_shard": images_per_shard, "batch_size": batch_size}
    _validate_arguments(
        dtype, tokens, on_bad_image, n_random_patches, seed, teacher.tokens_per_image, sizes
    )
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} is not valid; it must be >= 0")
    if len(dataset) == 0:
        raise CacheError(f"the dataset {dataset.identity()} has no images to cache")
    selection = _TokenSelection(tokens, n_random_patches, seed, teacher.tokens_per_image)
    settings = _cache_settings(teacher, dataset, dtype, selection, images_per_shard)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / MANIFEST_NAME).exists():
        _check_foreign_files(out_dir)  # before the lock file is created in someone's folder
    with _exclusive_lock(out_dir):
        state = _start_or_resume(out_dir, settings, batch_size)
        if state is None:
            logger.info("activation cache %s is already complete", out_dir)
            return out_dir
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink()
        run = _Run(
            teacher,
            selection,
            DTYPES[dtype],
            images_per_shard,
            len(dataset),
            on_bad_image,
            _teacher_device(teacher),
        )
        _write_shards(run, dataset, out_dir, state, batch_size, num_workers, progress)
    return out_dir


def _write_shards(
    run: _Run,
    dataset: CacheDataset,
    out_dir: Path,
    state: _CacheState,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Produce every missing shard, then mark the cache complete."""
    start_shard = len(state.manifest["shards"])
    start = min(start_shard * run.images_per_shard, run.n_dataset_images)
    _check_disk_space(out_dir, run.n_dataset_images - start, state.manifest)
    _write_manifest(out_dir, state.to_manifest())  # a new cache exists from here on
    if start_shard:
        logger.info("resuming %s after %d complete shards (image %d)", out_dir, start_shard, start)
    batches = _shard_batches(start_shard, run.n_dataset_images, run.images_per_shard, batch_size)
    loader = DataLoader(
        _GuardedDataset(dataset),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=False,
    )
    writer = _ShardWriter(out_dir, state)
    bar = tqdm(
        total=run.n_dataset_images,
        initial=start,
        unit="img",
        disable=not progress,
        desc=f"caching {out_dir.name}",
        dynamic_ncols=True,
    )
    try:
        _produce(run, iter(loader), writer, bar)
        writer.close()
    except BaseException:
        writer.close(raise_errors=False)  # commit the finished shards already handed over
        raise
    finally:
        bar.set_postfix_str(f"{_human_bytes(writer.bytes_written)} written")
        bar.close()
    if state.manifest["n_images"] == 0:
        raise CacheError(f"no image of {out_dir} could be read: every image was skipped")
    state.manifest["complete"] = True
    _write_manifest(out_dir, state.to_manifest())
    logger.info(
        "activation cache %s complete: %d images, %d skipped",
        out_dir,
        state.manifest["n_images"],
        state.manifest["n_skipped"],
    )


# ------------------------------------------------------------------------------ reader


def _read_and_hash(path: Path, want_hash: bool) -> tuple[bytearray, str | None]:
    """Read a whole file into memory, hashing it piece by piece as it is read."""
    size = path.stat().st_size
    buffer = bytearray(size)
    view = memoryview(buffer)
    digest = hashlib.sha256() if want_hash else None
    position = 0
    with open(path, "rb", buffering=0) as f:
        while position < size:
            n = f.readinto(view[position : position + _IO_CHUNK])
            if not n:
                break
            if digest is not None:
                digest.update(view[position : position + n])
            position += n
    if position != size:
        raise CorruptShardError(f"{path} shrank while being read ({position} of {size} bytes)")
    return buffer, digest.hexdigest() if digest is not None else None


def parse_safetensors(data: bytearray, path: Path | str = "<memory>") -> dict[str, Tensor]:
    """Parse a safetensors file held in memory, without any unpickling.

    Args:
        data: The whole file; the returned tensors share its memory.
        path: Name used in error messages.

    Returns:
        Name -> tensor.

    Raises:
        CorruptShardError: The bytes are not a well-formed safetensors file.
    """

    def corrupt(why: str) -> CorruptShardError:
        return CorruptShardError(f"{path} is not a valid safetensors file: {why}")

    if len(data) < 8:
        raise corrupt(f"only {len(data)} bytes")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise corrupt(f"header length {header_len} does not fit in {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    base, data_len = 8 + header_len, len(data) - 8 - header_len
    tensors = {}
    for name, info in header.items():
        try:
            tensors[name] = _tensor_from_header(data, base, data_len, info)
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"bad entry for tensor {name!r}: {info!r} ({e})") from e
    return tensors


def _tensor_from_header(data: bytearray, base: int, data_len: int, info: Any) -> Tensor:
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    shape = [int(s) for s in info["shape"]]
    begin, end = (int(o) for o in info["data_offsets"])
    numel = int(np.prod(shape, dtype=np.int64))
    itemsize = dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len:
        raise ValueError("shape or offsets out of range")
    if end - begin != numel * itemsize:
        raise ValueError(f"{end - begin} bytes cannot hold shape {shape}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=base + begin).reshape(shape)


_REQUIRED_MANIFEST_KEYS = (
    "format_version",
    "complete",
    "n_layers",
    "d_model",
    "tokens_per_image",
    "dtype",
    "shards",
    "stats",
    "teacher",
    "dataset",
)


def _validate_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CacheError(f"cache manifest {path / MANIFEST_NAME} lacks field(s) {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheError(
            f"cache {path} has format_version {manifest['format_version']!r}; this version of "
            f"clt_lightning reads format_version {FORMAT_VERSION}: rebuild the cache"
        )
    if manifest["dtype"] not in DTYPES:
        raise CacheError(f"cache {path} has unknown dtype {manifest['dtype']!r}")
    if not manifest["complete"]:
        done = sum(record["n_images"] for record in manifest["shards"])
        raise CacheError(
            f"the activation cache {path} is incomplete ({len(manifest['shards'])} shards, "
            f"{done} images written): resume it by rerunning `clt cache --config ...` (or "
            f"write_cache) with the same settings; it continues after the last complete shard"
        )


class ActivationCache:
    """A complete activation cache on disk (see `open_cache`).

    Attributes:
        path: Cache folder.
        manifest: Parsed manifest.json.
        n_layers: L.
        d_model: d.
        tokens_per_image: Tokens stored per image (T').
        dtype: Stored dtype of x and y.
        n_images: Images stored (skipped images excluded).
        n_shards: Shard files.
        shard_image_counts: Images per shard.
        verify: Whether `load_shard` checks sha256 checksums.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = True) -> None:
        self.path, self.manifest, self.verify = path, manifest, verify
        self.n_layers = int(manifest["n_layers"])
        self.d_model = int(manifest["d_model"])
        self.tokens_per_image = int(manifest["tokens_per_image"])
        self.dtype = DTYPES[manifest["dtype"]]
        self.shard_image_counts = [int(record["n_images"]) for record in manifest["shards"]]
        self.n_images = sum(self.shard_image_counts)
        self.n_shards = len(self.shard_image_counts)

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, n_images={self.n_images}, "
            f"n_shards={self.n_shards}, T={self.tokens_per_image}, L={self.n_layers}, "
            f"d={self.d_model}, dtype={self.manifest['dtype']})"
        )

    def shard_path(self, i: int) -> Path:
        """Path of shard `i`."""
        return self.path / self.manifest["shards"][i]["file"]

    def stats(self) -> CacheStats:
        """Per-layer statistics over every stored token, as float64 tensors."""
        stats = self.manifest["stats"]
        x = Moments.from_json(stats["n_tokens"], stats["x"], self.n_layers, self.d_model)
        y = Moments.from_json(stats["n_tokens"], stats["y"], self.n_layers, self.d_model)

        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

        return CacheStats(
            x_mean=t(x.mean),
            y_mean=t(y.mean),
            x_mean_sq_norm=t(x.mean_sq_norm()),
            y_mean_sq_norm=t(y.mean_sq_norm()),
            y_var=t(y.var()),
            x_var=t(x.var()),
            n_tokens=x.n,
        )

    def load_shard(self, i: int) -> dict[str, Tensor]:
        """Read shard `i`, verifying its checksum (when `verify`), format, shapes and dtypes.

        Args:
            i: Shard index, 0..n_shards-1.

        Returns:
            x, y [n, T', L, d] (stored dtype), label [n] int64, image_id [n] int64,
            token_index [n, T'] int64.

        Raises:
            CorruptShardError: Checksum mismatch, truncation, not safetensors, or tensors
                that do not match the manifest; the message names the file.
        """
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range: {self.path} has {self.n_shards} shards")
        record, path = self.manifest["shards"][i], self.shard_path(i)
        if not path.is_file():
            raise CacheError(f"shard file {path} listed in the manifest is missing")
        data, sha256 = _read_and_hash(path, self.verify)
        if self.verify and sha256 != record["sha256"]:
            raise CorruptShardError(
                f"{path} is corrupted: expected sha256 {record['sha256']} ({record['bytes']} "
                f"bytes), got {sha256} ({len(data)} bytes); delete {self.path} and rerun "
                f"`clt cache --config ...` to rebuild it"
            )
        tensors = parse_safetensors(data, path)
        self._check_shard(tensors, record, path)
        return {name: tensors[name] for name in SHARD_TENSORS}

    def _check_shard(
        self, tensors: Mapping[str, Tensor], record: Mapping[str, Any], path: Path
    ) -> None:
        n, t = int(record["n_images"]), self.tokens_per_image
        act = (n, t, self.n_layers, self.d_model)
        expected = {
            "x": (act, self.dtype),
            "y": (act, self.dtype),
            "label": ((n,), torch.int64),
            "image_id": ((n,), torch.int64),
            "token_index": ((n, t), torch.int64),
        }
        for name, (shape, dtype) in expected.items():
            got = tensors.get(name)
            if got is None or tuple(got.shape) != shape or got.dtype != dtype:
                found = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
                raise CorruptShardError(
                    f"{path}: tensor {name!r} is {found}; the manifest says {shape} {dtype}"
                )


def open_cache(path: str | Path, verify: bool = True) -> ActivationCache:
    """Open a complete activation cache.

    Args:
        path: Cache folder (holding manifest.json).
        verify: Check every shard's size now and its sha256 whenever it is loaded.

    Returns:
        The cache.

    Raises:
        CacheError: No manifest (run `clt cache --config ...`), an incomplete cache (says
            how to resume), an unreadable manifest, or a listed shard file that is missing.
        CorruptShardError: A shard whose size differs from the manifest (verify=True).
    """
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CacheError(
            f"no activation cache at {path} ({MANIFEST_NAME} not found); create it with "
            f"`clt cache --config <your config.yaml>`"
        )
    manifest = _read_manifest(manifest_path)
    _validate_manifest(path, manifest)
    for record in manifest["shards"]:
        shard = path / record["file"]
        if not shard.is_file():
            raise CacheError(f"shard file {shard} listed in {manifest_path} is missing")
        if verify and shard.stat().st_size != record["bytes"]:
            raise CorruptShardError(
                f"{shard} is truncated or corrupted: {shard.stat().st_size} bytes, the manifest "
                f"says {record['bytes']} (sha256 {record['sha256']}); delete {path} and rerun "
                f"`clt cache --config ...` to rebuild it"
            )
    return ActivationCache(path, manifest, verify=verify)


def verify_cache(path: str | Path, progress: bool = False) -> ActivationCache:
    """Check every shard of a cache: checksum, format, shapes and dtypes.

    Args:
        path: Cache folder.
        progress: Show a progress bar.

    Returns:
        The opened cache, when every shard is sound.

    Raises:
        CorruptShardError: Naming every bad shard file.
    """
    cache = open_cache(path, verify=True)
    problems = []
    for i in tqdm(range(cache.n_shards), desc="verifying", unit="shard", disable=not progress):
        try:
            cache.load_shard(i)
        except CacheError as e:
            problems.append(str(e))
    if problems:
        raise CorruptShardError(
            f"{len(problems)} of {cache.n_shards} shards in {path} are bad:\n  "
            + "\n  ".join(problems)
        )
    return cache
