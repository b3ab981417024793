"""Token batches read from an activation cache: `CachedTokenStream`.

Work is split by shard (`streams.assign_shards`), shuffled through a token buffer spanning
`buffer_shards` shards, and cut to the same number of batches on every rank
(`streams.batch_quotas`); see `clt_lightning.data.streams` for the design.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.data.streams import (
    Rows,
    assign_shards,
    batch_quotas,
    filtered_tokens_per_image,
    ordered_batches,
    shard_token_rows,
    shuffled_batches,
    stream_seed,
    take_quota,
    worker_id,
)
from clt_lightning.errors import CacheError
from clt_lightning.tokens import TokenLayout


class CachedTokenStream(IterableDataset):
    """Token batches read from an activation cache (design: `clt_lightning.data.streams`).

    Use with `DataLoader(stream, batch_size=None, num_workers=num_workers)`; the epoch is
    set with `set_epoch` before each iteration (the datamodule's loader does this).

    Args:
        cache: An `ActivationCache` (`open_cache`); re-opened by path in spawned workers.
        batch_size: Tokens per batch.
        token_filter: A token group: "all", "cls", "registers" or "patches".
        seed: Run seed.
        shuffle: Shuffle shards and tokens (training) or keep the stored order (validation).
        buffer_shards: Shards the shuffle buffer spans.
        world_size: DDP processes.
        rank: This process's rank.
        num_workers: DataLoader workers per rank (must match the loader's).
        drop_last: Drop a worker's last partial batch.
        max_batches: Optional cap on batches per rank and epoch.
        verify: Check shard checksums when re-opening the cache in a worker.
        token_layout: The teacher's token layout (default: from the cache manifest).
    """

    def __init__(
        self,
        cache: Any,
        batch_size: int,
        token_filter: str = "all",
        seed: int = 0,
        shuffle: bool = True,
        buffer_shards: int = 4,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
        max_batches: int | None = None,
        verify: bool = True,
        token_layout: TokenLayout | None = None,
    ) -> None:
        super().__init__()
        self.cache, self.cache_path, self.verify = cache, Path(cache.path), verify
        self.shard_image_counts = list(cache.shard_image_counts)
        teacher = getattr(cache, "manifest", {}).get("teacher", {})
        self.token_layout = token_layout or TokenLayout.from_identity(teacher)
        self.rows_per_image = filtered_tokens_per_image(
            cache.tokens_per_image, token_filter, self.token_layout
        )
        self.batch_size, self.token_filter, self.seed = batch_size, token_filter, seed
        self.shuffle, self.buffer_shards = shuffle, buffer_shards
        self.world_size, self.rank, self.num_workers = world_size, rank, num_workers
        self.drop_last, self.max_batches = drop_last, max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle the next iteration uses."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["cache"] = None  # re-opened by path: readers may hold file handles
        return state

    def shards(self, epoch: int, rank: int, worker_id: int) -> list[int]:
        """Shards that (rank, worker) reads in an epoch (`assign_shards`)."""
        n_shards = len(self.shard_image_counts)
        return assign_shards(
            n_shards, self.seed, epoch, self.world_size, rank, self.num_workers, worker_id,
            self.shuffle,
        )  # fmt: skip

    def quotas(self, epoch: int | None = None) -> list[list[int]]:
        """Batches per [rank][worker], the same in every epoch.

        Shuffled, a (rank, worker) reads a different set of shards each epoch, and when
        shards differ in size (the last one, skipped images) so does its token count; its
        capacity is therefore taken as the worst case over all epochs, the tokens of the
        smallest shards it could be given (it always gets the same number of shards). So
        `len()` holds in every epoch, which Lightning reads once. In stored order
        (validation) the capacity is exact.

        Args:
            epoch: Unused in shuffled order (kept for callers); the stored order has one.
        """
        n_workers = max(1, self.num_workers)
        n_streams = self.world_size * n_workers
        smallest_first = sorted(self.shard_image_counts)
        tokens = []
        for rank in range(self.world_size):
            rank_tokens = []
            for worker in range(n_workers):
                if self.shuffle:
                    n_own = len(range(rank * n_workers + worker, len(smallest_first), n_streams))
                    images = sum(smallest_first[:n_own])
                else:
                    shards = self.shards(0, rank, worker)
                    images = sum(self.shard_image_counts[s] for s in shards)
                rank_tokens.append(self.rows_per_image * images)
            tokens.append(rank_tokens)
        return batch_quotas(tokens, self.batch_size, self.drop_last, self.max_batches)

    def __len__(self) -> int:
        return sum(self.quotas()[self.rank])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        worker = worker_id(self.num_workers)
        quota = self.quotas()[self.rank][worker]
        if quota == 0:
            return
        chunks = (self._rows(s) for s in self.shards(self.epoch, self.rank, worker))
        if self.shuffle:
            max_rows = max(self.shard_image_counts) * self.rows_per_image
            stream = self.rank * max(1, self.num_workers) + worker
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, stream))
            capacity = self.buffer_shards * max_rows + self.batch_size
            batches = shuffled_batches(
                chunks, self.batch_size, capacity, max_rows, generator, self.drop_last
            )
        else:
            batches = ordered_batches(chunks, self.batch_size, self.drop_last)
        yield from take_quota(batches, quota, f"cache {self.cache_path} rank {self.rank}")

    def _rows(self, shard_index: int) -> Rows:
        if self.cache is None:
            self.cache = open_cache(self.cache_path, verify=self.verify)
        shard = self.cache.load_shard(shard_index)
        rows = shard_token_rows(shard, self.token_filter, self.token_layout)
        expected = self.shard_image_counts[shard_index] * self.rows_per_image
        if len(rows["token"]) != expected:
            raise CacheError(
                f"shard {shard_index} of {self.cache_path} has {len(rows['token'])} "
                f"{self.token_filter} tokens, the manifest implies {expected}"
            )
        return rows
