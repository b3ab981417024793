"""Reading the activation cache: `open_cache`, `ActivationCache` and `verify_cache`.

Owns the reader's manifest checks (format version, dtype, completeness, on top of
`cache_manifest.validate_manifest`) and the verified shard reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_lightning.data.cache_format import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_TENSORS,
    parse_safetensors,
    read_and_hash,
    read_manifest,
)
from clt_lightning.data.cache_manifest import validate_manifest
from clt_lightning.data.cache_stats import CacheStats, Moments
from clt_lightning.errors import CacheError, CorruptShardError


def _validate_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    validate_manifest(path / MANIFEST_NAME, manifest)
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
        data, sha256 = read_and_hash(path, self.verify)
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
    manifest = read_manifest(manifest_path)
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
