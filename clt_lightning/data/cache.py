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
Layout (this module is the public facade; internals are patched in tests on their own
module, e.g. `cache_format._write_manifest`):

- `cache_format`: format constants, dtype tables, `token_positions`, atomic writes, the
  streaming safetensors writer and parser, manifest reading and writing.
- `cache_stats`: `Moments` (streaming statistics) and `CacheStats`.
- `cache_shards`: the background writer thread that commits shards to the manifest.
- `cache_resume`: settings comparison, start-or-resume, lock and disk-space checks.
- `cache_writer`: `write_cache` and its data feed.
- `cache_reader`: `open_cache`, `ActivationCache`, `verify_cache`.
"""

from __future__ import annotations

import logging

from clt_lightning.data.cache_format import (
    BAD_IMAGE_POLICIES,
    DTYPES,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_TENSORS,
    TOKEN_MODES,
    CacheDtype,
    TokenMode,
    parse_safetensors,
    safetensors_header,
    safetensors_order,
    shard_file_name,
    token_positions,
)
from clt_lightning.data.cache_reader import ActivationCache, open_cache, verify_cache
from clt_lightning.data.cache_resume import settings_diff
from clt_lightning.data.cache_stats import CacheStats, Moments
from clt_lightning.data.cache_writer import CacheDataset, CacheTeacher, write_cache

logger = logging.getLogger(__name__)  # the cache_* modules log to this same name

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DTYPES",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "SHARD_TENSORS",
    "TOKEN_MODES",
    "ActivationCache",
    "CacheDataset",
    "CacheDtype",
    "CacheStats",
    "CacheTeacher",
    "Moments",
    "TokenMode",
    "open_cache",
    "parse_safetensors",
    "safetensors_header",
    "safetensors_order",
    "settings_diff",
    "shard_file_name",
    "token_positions",
    "verify_cache",
    "write_cache",
]
