"""Activation cache format: names, dtype tables, stored tokens, the safetensors codec, I/O.

An activation cache is `out_dir/shard_{i:05d}.safetensors` files holding the token
activations `x` (MLP input) and `y` (MLP output) of every layer, described by
`out_dir/manifest.json`. `docs/cache-format.md` is the byte-level specification (a
stranger can read a cache with numpy alone). The cache's modules, imported directly:
`cache_format` (this one), `cache_manifest` (validation), `cache_stats` (statistics),
`cache_resume` (settings, matching, resume), `cache_shards` (background writer),
`cache_writer` (`write_cache`) and `cache_reader` (`open_cache`, `verify_cache`).

This module owns the format constants (`FORMAT_VERSION`, file names, dtype tables and
`CACHE_TOKENS`), `shard_file_name`, which tokens are stored (`StoredTokens`,
`cached_token_positions`), the streaming safetensors writer (`write_safetensors`,
`safetensors_header`, `safetensors_order`) and parser (`parse_safetensors`,
`read_and_hash`), and manifest reading and writing (`read_manifest`, `write_manifest`).

Design decisions:

- The manifest is the commit record. Every file is written to a temp file in the same
  folder, flushed, fsynced and `os.replace`d; a shard is committed before the manifest that
  lists it, so a kill at any moment leaves the previous or the new consistent state. A
  shard file the manifest does not list is an orphan of a killed run and is overwritten.
- Shards are safetensors files written by a small streaming writer rather than
  `safetensors.torch.save`: it hashes and writes each tensor straight from memory (no
  second and third copy of a multi-GB shard) and sorts the metadata keys, which the library
  does not (its metadata is a Rust HashMap, so two processes can write different bytes).
  Otherwise the layout is the library's own; the tests check both agree byte for byte.
- Token subsampling ("cls+random") draws from `np.random.default_rng([seed, image_id])`
  per image, so the chosen positions depend neither on batching nor on where a run resumed.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor

from clt_lightning.errors import (
    CacheError,
    CorruptShardError,
)
from clt_lightning.files import atomic_write_stream

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
CacheDtype = Literal["fp16", "bf16", "fp32"]
CacheTokens = Literal["all", "cls", "cls+random"]
DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
CACHE_TOKENS = ("all", "cls", "cls+random")
"""Which tokens of each image a cache stores (the `cache_tokens` / `tokens` setting)."""
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
SHARD_FILE_RE = re.compile(r"shard_\d{5}\.safetensors")
"""File names of shards (`shard_file_name`)."""
STATS_CHUNK_TOKENS = 64
"""Stored tokens per statistics chunk: part of the format (changing it changes the last bits
of the manifest's statistics)."""
_IO_CHUNK = 1 << 24  # 16 MiB; hashlib and file writes release the GIL on pieces this big
_MAX_HEADER_BYTES = 100_000_000


def shard_file_name(index: int) -> str:
    """File name of shard `index` inside a cache folder (`shard_00003.safetensors`)."""
    return f"shard_{index:05d}.safetensors"


# ------------------------------------------------------------------------ stored tokens


@dataclass(frozen=True)
class StoredTokens:
    """Which token positions of each image a cache stores (the `cache_tokens` setting).

    Attributes:
        mode: One of `CACHE_TOKENS`: "all", "cls" or "cls+random".
        n_random_patches: Patch tokens drawn per image in "cls+random".
        seed: Seed of the per-image draw in "cls+random".
        teacher_tokens: Tokens per image of the teacher (T).
    """

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
        """Stored token positions, [N, n_tokens] int64 (see `cached_token_positions`)."""
        return cached_token_positions(
            image_ids, self.mode, self.teacher_tokens, self.n_random_patches, self.seed
        )


def cached_token_positions(
    image_ids: Sequence[int],
    mode: str,
    teacher_tokens: int,
    n_random_patches: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Token positions a cache stores for each image (`cache_tokens`; not the token groups of
    `clt_lightning.tokens`, which name kinds of tokens).

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


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a cache file atomically (see `files.atomic_write_stream`)."""
    atomic_write_stream(
        path,
        write,
        disk_full=f"{path}; everything up to the last complete shard is intact: free some "
        "space and rerun the same command to resume",
    )


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


def write_safetensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> tuple[str, int]:
    """Atomically write a safetensors file (`safetensors_header`, then the tensors' bytes).

    Returns:
        (sha256 hex digest, size in bytes) of the file written.

    Raises:
        CacheError: On a big-endian machine (safetensors is little-endian).
        DiskSpaceError: The device is full (nothing is left behind).
    """
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


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Atomically write `out_dir/manifest.json` (nested containers indented, flat number
    lists on one line).

    Raises:
        DiskSpaceError: The device is full (the previous manifest stays intact).
    """
    text = (_format_json(manifest) + "\n").encode()
    _atomic_write(out_dir / MANIFEST_NAME, lambda f: f.write(text))


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse a manifest file (unvalidated: see `cache_manifest.validate_manifest`).

    Raises:
        CacheError: The file cannot be read, is not JSON, or is not a JSON object.
    """
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"cannot read cache manifest {path}: {e}") from e
    if not isinstance(manifest, dict):
        raise CacheError(f"cache manifest {path} is not a JSON object")
    return manifest


# ------------------------------------------------------------------ safetensors reading


def read_and_hash(path: Path, want_hash: bool) -> tuple[bytearray, str | None]:
    """Read a whole file into memory, hashing it piece by piece as it is read.

    Args:
        path: The file.
        want_hash: Compute its sha256 on the way.

    Returns:
        (the file's bytes, sha256 hex digest or None).

    Raises:
        CorruptShardError: The file shrank while it was read.
    """
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
