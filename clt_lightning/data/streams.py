"""Token streams: shuffled token batches from an activation cache or from a live teacher.

Both streams yield the token batch (docs/architecture.md) `{"x": [B, L, d] float32, "y": [B, L, d] float32,
"token": [B] int64, "image": [B] int64}`; `ActivationDataModule` wraps them in DataLoaders.

Design decisions:

- Work is split by shard (cache) or by image (online), never by token, so a worker reads
  only its own files. Per epoch the shard order is a permutation seeded by (seed, epoch);
  position j of that order goes to global worker j % (world_size * workers), where global
  worker = rank * workers + worker_id (`assign_shards`, a pure function). Images are split
  the same way over ranks (`assign_images`).
- Shuffling uses a fixed-capacity token buffer (`TokenBuffer`) that spans
  `buffer_shards` shards (or `buffer_tokens` tokens online): batches are drawn uniformly
  without replacement from everything in the buffer, and a new shard is read as soon as
  there is room. Its random stream is seeded by (seed, epoch, global worker), so a run is
  reproducible for a fixed seed, world size and worker count.
- DDP needs every rank to yield the same number of batches or the gradient all-reduce
  hangs. The count per rank and worker is computed from the manifest's image counts
  before reading anything (`batch_quotas`): each worker can fill floor(tokens / B) batches
  (ceil without `drop_last`), every rank stops at the smallest rank total, and the tokens
  beyond it are dropped for that epoch (different tokens each epoch, as the order changes).
  A shard whose token count differs from the manifest raises `CacheError` instead of
  silently shortening one rank. The count is the same in every epoch (shuffled, a worker
  counts on the smallest shards it could be given), since Lightning reads `len()` once.
  Online, a rank replaces each unreadable image it skips by another of its readable
  images (`OnlineTokenStream.rows_of_every_image`), so skipping never shortens a rank.
- Memory per cache worker is about (buffer_shards + 1) x shard size in the stored dtype
  (the buffer keeps the stored dtype; only the batch is converted to float32), plus one
  float32 batch. Batches are fresh tensors that own their storage, so a worker never sends
  a whole shard through shared memory.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from clt_lightning.errors import CacheError, UnreadableImageError
from clt_lightning.tokens import CLIP_LAYOUT, TokenLayout, layout_of

log = logging.getLogger(__name__)

TokenFilter = Literal["all", "cls", "registers", "patches"]
TOKEN_FILTERS = ("all", "cls", "registers", "patches")
Rows = dict[str, Tensor]  # x, y [n, L, d] (any float dtype), token, image [n] int64


# ---------------------------------------------------------------------------- pure helpers
def permutation(n: int, entropy: Sequence[int]) -> list[int]:
    """A permutation of range(n) seeded by a sequence of non-negative ints."""
    rng = np.random.default_rng(np.random.SeedSequence(list(entropy)))
    return rng.permutation(n).tolist()


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one (seed, epoch, stream) triple, independent across triples."""
    state = np.random.SeedSequence([seed, epoch, stream, 0x5EED]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def _check_split(world_size: int, rank: int, num_workers: int, worker_id: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0 or not 0 <= worker_id < max(1, num_workers):
        raise ValueError(
            f"need 0 <= worker_id < max(1, num_workers), got {worker_id}, {num_workers}"
        )


def assign_shards(
    n_shards: int,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    num_workers: int,
    worker_id: int,
    shuffle: bool = True,
) -> list[int]:
    """Shards one (rank, worker) reads in an epoch, in reading order.

    Across all ranks and workers the lists are disjoint and together hold every shard once.

    Args:
        n_shards: Shards in the cache.
        seed: Run seed.
        epoch: Epoch number; the shard order is a permutation seeded by (seed, epoch).
        world_size: DDP processes.
        rank: This process's global rank.
        num_workers: DataLoader workers per rank (0 = load in the main process, as 1 worker).
        worker_id: This worker's id in [0, max(1, num_workers)).
        shuffle: False keeps the stored order (validation).

    Returns:
        Shard indices for this (rank, worker).
    """
    _check_split(world_size, rank, num_workers, worker_id)
    order = permutation(n_shards, [seed, epoch]) if shuffle else list(range(n_shards))
    n_workers = max(1, num_workers)
    return order[rank * n_workers + worker_id :: world_size * n_workers]


def assign_images(
    n_images: int, seed: int, epoch: int, world_size: int, rank: int, shuffle: bool = True
) -> list[int]:
    """Image ids one rank runs through the teacher in an epoch (online path), in order.

    Position j of the (seed, epoch) permutation goes to rank j % world_size.
    """
    _check_split(world_size, rank, 0, 0)
    order = permutation(n_images, [seed, epoch]) if shuffle else list(range(n_images))
    return order[rank::world_size]


def batch_quotas(
    tokens: Sequence[Sequence[int]],
    batch_size: int,
    drop_last: bool = True,
    max_batches: int | None = None,
) -> list[list[int]]:
    """Batches each (rank, worker) yields so that every rank yields the same number.

    Args:
        tokens: tokens[rank][worker] = tokens that worker will read this epoch.
        batch_size: Tokens per batch.
        drop_last: Only full batches (floor); otherwise a last partial batch counts (ceil).
        max_batches: Optional cap on batches per rank.

    Returns:
        quotas[rank][worker]; each rank's quotas sum to the same total, the smallest rank's
        capacity (capped by max_batches), filled greedily in worker order.
    """
    round_fn = (lambda t: t // batch_size) if drop_last else (lambda t: -(-t // batch_size))
    caps = [[round_fn(t) for t in workers] for workers in tokens]
    total = min(sum(c) for c in caps)
    if max_batches is not None:
        total = min(total, max_batches)
    quotas = []
    for rank_caps in caps:
        left, rank_quota = total, []
        for cap in rank_caps:
            rank_quota.append(min(cap, left))
            left -= rank_quota[-1]
        quotas.append(rank_quota)
    return quotas


def token_mask(
    token_index: Tensor, token_filter: TokenFilter, layout: TokenLayout = CLIP_LAYOUT
) -> Tensor | None:
    """Boolean mask of the tokens of a group (`TokenLayout.mask`); None keeps all."""
    if token_filter == "all":
        return None
    return layout.mask(layout.check(token_filter, "data.token_filter"), token_index)


def shard_token_rows(
    shard: dict[str, Tensor], token_filter: TokenFilter, layout: TokenLayout = CLIP_LAYOUT
) -> Rows:
    """Turn a shard (or a teacher capture) into token rows.

    Args:
        shard: x, y [n, T, L, d], token_index [n, T], image_id [n].
        token_filter: A token group: "all", "cls", "registers" or "patches".
        layout: The teacher's token layout (positions of each group).

    Returns:
        x, y [m, L, d] in the input dtype (x[n, t] becomes one row), token, image [m] int64.
    """
    x, y = shard["x"], shard["y"]
    n, n_tokens = x.shape[:2]
    token = shard["token_index"].to(torch.int64)
    image = shard["image_id"].to(torch.int64).view(n, 1).expand(n, n_tokens)
    mask = token_mask(token, token_filter, layout)
    if mask is None:
        return {
            "x": x.reshape(n * n_tokens, *x.shape[2:]),
            "y": y.reshape(n * n_tokens, *y.shape[2:]),
            "token": token.reshape(-1),
            "image": image.reshape(-1),
        }
    return {"x": x[mask], "y": y[mask], "token": token[mask], "image": image[mask]}


def to_batch(rows: Rows, copy: bool = True) -> dict[str, Tensor]:
    """Rows -> token batch with float32 x/y and int64 ids.

    Args:
        rows: Token rows.
        copy: Copy even where the dtype already matches, so that the batch owns its storage
            (rows that are views of a shard); False for rows that are fresh tensors.
    """
    return {
        "x": rows["x"].to(torch.float32, copy=copy),
        "y": rows["y"].to(torch.float32, copy=copy),
        "token": rows["token"].to(torch.int64, copy=copy),
        "image": rows["image"].to(torch.int64, copy=copy),
    }


# ---------------------------------------------------------------------------- shuffling
class TokenBuffer:
    """Fixed-capacity pool of token rows that hands out uniformly random batches.

    Rows live in preallocated slots and never move: `add` writes new rows into free slots,
    `take(k)` gathers k occupied slots drawn uniformly without replacement and frees them.
    Only slot indices are shuffled, so each row's data is copied once in and once out.

    Args:
        capacity: Rows the buffer can hold.
        generator: CPU generator for the draws (seeded per stream for reproducibility).
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self._generator = generator
        self._store: Rows | None = None
        self._occupied = torch.empty(0, dtype=torch.int64)  # slot ids holding rows
        self._free = torch.arange(capacity)  # slot ids free, used in order

    def __len__(self) -> int:
        return len(self._occupied)

    def add(self, rows: Rows) -> None:
        """Copy rows in (x, y [m, L, d], token, image [m]); they must fit."""
        m = len(rows["token"])
        if m > len(self._free):
            raise ValueError(f"buffer overflow: {len(self)} + {m} rows > capacity {self.capacity}")
        if self._store is None:
            self._store = {
                key: torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
                for key, t in rows.items()
            }
        slots, self._free = self._free[:m], self._free[m:]
        device_slots = slots.to(self._store["token"].device)
        for key, t in rows.items():
            self._store[key].index_copy_(0, device_slots, t.to(self._store[key].dtype))
        self._occupied = torch.cat([self._occupied, slots])

    def take(self, k: int) -> Rows:
        """Remove and return k rows drawn uniformly without replacement, in random order."""
        if not 0 < k <= len(self):
            raise ValueError(f"cannot take {k} rows from a buffer holding {len(self)}")
        order = torch.randperm(len(self), generator=self._generator)
        slots = self._occupied[order[:k]]
        self._occupied = self._occupied[order[k:]]
        self._free = torch.cat([self._free, slots])
        device_slots = slots.to(self._store["token"].device)
        return {key: t.index_select(0, device_slots) for key, t in self._store.items()}


def shuffled_batches(
    chunks: Iterable[Rows],
    batch_size: int,
    capacity: int,
    max_chunk_rows: int,
    generator: torch.Generator,
    drop_last: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Shuffle a stream of row chunks through a `TokenBuffer` into token batches.

    Batches are drawn while the buffer could not take another chunk, so it stays between
    capacity - max_chunk_rows and capacity rows after the first fill.

    Args:
        chunks: Row chunks (shards or image batches), each at most max_chunk_rows rows.
        batch_size: Rows per batch.
        capacity: Buffer rows; at least max_chunk_rows + batch_size.
        max_chunk_rows: Largest chunk.
        generator: Seeded CPU generator.
        drop_last: Drop the final rows that do not fill a batch.
    """
    if capacity < max_chunk_rows + batch_size:
        raise ValueError(f"capacity {capacity} < max_chunk_rows + batch_size")
    buffer = TokenBuffer(capacity, generator)
    for rows in chunks:
        buffer.add(rows)
        del rows
        while len(buffer) >= batch_size and len(buffer) + max_chunk_rows > capacity:
            yield to_batch(buffer.take(batch_size), copy=False)
    while len(buffer) >= batch_size:
        yield to_batch(buffer.take(batch_size), copy=False)
    if len(buffer) and not drop_last:
        yield to_batch(buffer.take(len(buffer)), copy=False)


def ordered_batches(
    chunks: Iterable[Rows], batch_size: int, drop_last: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Cut a stream of row chunks into batches in their given order (validation)."""
    carry: Rows | None = None
    for rows in chunks:
        start = 0
        n = len(rows["token"])
        if carry is not None:
            need = batch_size - len(carry["token"])
            head = {key: t[:need] for key, t in rows.items()}
            carry = {key: torch.cat([carry[key], head[key]]) for key in carry}
            start = min(need, n)
            if len(carry["token"]) < batch_size:
                continue
            yield to_batch(carry)
            carry = None
        for begin in range(start, n, batch_size):
            piece = {key: t[begin : begin + batch_size] for key, t in rows.items()}
            if len(piece["token"]) == batch_size:
                yield to_batch(piece)
            else:
                carry = {key: t.clone() for key, t in piece.items()}
    if carry is not None and not drop_last:
        yield to_batch(carry)


def _take_quota(
    batches: Iterator[dict[str, Tensor]], quota: int | None, what: str
) -> Iterator[dict[str, Tensor]]:
    produced = 0
    for batch in itertools.islice(batches, quota):
        produced += 1
        yield batch
    if quota is not None and produced < quota:
        log.warning(
            "%s yielded %d of %d batches; DDP ranks may now disagree", what, produced, quota
        )


# ---------------------------------------------------------------------------- cached stream
class CachedTokenStream(IterableDataset):
    """Token batches read from an activation cache (see the module docstring).

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
        token_filter: TokenFilter = "all",
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
        worker_id = _worker_id(self.num_workers)
        quota = self.quotas()[self.rank][worker_id]
        if quota == 0:
            return
        chunks = (self._rows(s) for s in self.shards(self.epoch, self.rank, worker_id))
        if self.shuffle:
            max_rows = max(self.shard_image_counts) * self.rows_per_image
            stream = self.rank * max(1, self.num_workers) + worker_id
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, stream))
            capacity = self.buffer_shards * max_rows + self.batch_size
            batches = shuffled_batches(
                chunks, self.batch_size, capacity, max_rows, generator, self.drop_last
            )
        else:
            batches = ordered_batches(chunks, self.batch_size, self.drop_last)
        yield from _take_quota(batches, quota, f"cache {self.cache_path} rank {self.rank}")

    def _rows(self, shard_index: int) -> Rows:
        if self.cache is None:
            from clt_lightning.data.cache_reader import open_cache

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


def filtered_tokens_per_image(
    tokens_per_image: int, token_filter: TokenFilter, layout: TokenLayout = CLIP_LAYOUT
) -> int:
    """Tokens per image that pass the filter; every stored image holds its [CLS] token."""
    layout.check(token_filter, "data.token_filter")
    counts = {"all": tokens_per_image, "cls": layout.n_cls, "registers": layout.n_registers}
    counts["patches"] = tokens_per_image - layout.n_prefix  # stored patches (all or random)
    return counts[token_filter]


def _worker_id(num_workers: int) -> int:
    info = get_worker_info()
    if info is None:
        return 0
    if info.num_workers != max(1, num_workers):
        raise ValueError(
            f"stream built for {num_workers} workers runs in a loader with {info.num_workers}"
        )
    return info.id


# ---------------------------------------------------------------------------- online stream
class _IndexedImages(Dataset):
    """(image, image id) pairs; with skip, an unreadable image becomes None."""

    def __init__(self, images: Dataset, skip_bad: bool) -> None:
        self.images, self.skip_bad = images, skip_bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        try:
            image, _ = self.images[i]
        except UnreadableImageError as error:
            if not self.skip_bad:
                raise
            log.warning("skipping unreadable image %d: %s", i, error)
            return None
        return image, i


def _collate_images(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor] | None:
    items = [item for item in items if item is not None]
    if not items:
        return None
    return torch.stack([image for image, _ in items]), torch.tensor([i for _, i in items])


class OnlineTokenStream(IterableDataset):
    """Token batches made on the fly: images -> frozen teacher -> token rows.

    Runs in the main process (the teacher sits on the training device); image decoding
    uses its own DataLoader with `num_workers`. Use with `DataLoader(stream,
    batch_size=None, num_workers=0)`. Each rank gets a disjoint set of images
    (`assign_images`); the token buffer lives on the teacher's device and holds
    `buffer_tokens` tokens (x and y in the teacher's compute dtype: buffer_tokens x L x d
    x 8 bytes in float32, half that in bf16).

    Args:
        capture: images [N, 3, H, W] -> object with x, y [N, T, L, d] (`Teacher.capture`).
        images: Image dataset yielding (image tensor, label) with the teacher's transform.
        tokens_per_image: T of the teacher.
        device: Where the teacher runs.
        batch_size: Tokens per batch.
        token_filter: A token group: "all", "cls", "registers" or "patches".
        image_batch: Images per teacher forward.
        buffer_tokens: Shuffle buffer capacity in tokens (raised to fit one image batch
            plus one token batch).
        seed: Run seed.
        shuffle: Shuffle images and tokens (training) or keep the stored order (validation).
        world_size: DDP processes.
        rank: This process's rank.
        num_workers: Image-decoding workers.
        skip_bad_images: Skip unreadable images instead of raising.
        drop_last: Drop the last partial batch.
        max_batches: Optional cap on batches per epoch.
        token_layout: The teacher's token layout (default: [CLS] + patches).
    """

    def __init__(
        self,
        capture: Callable[[Tensor], Any],
        images: Dataset,
        tokens_per_image: int,
        device: torch.device | str,
        batch_size: int,
        token_filter: TokenFilter = "all",
        image_batch: int = 64,
        buffer_tokens: int = 32768,
        seed: int = 0,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        skip_bad_images: bool = False,
        drop_last: bool = True,
        max_batches: int | None = None,
        token_layout: TokenLayout | None = None,
    ) -> None:
        super().__init__()
        self.capture, self.images, self.device = capture, images, torch.device(device)
        self.tokens_per_image = tokens_per_image
        self.token_layout = token_layout or layout_of(tokens_per_image)
        self.rows_per_image = filtered_tokens_per_image(
            tokens_per_image, token_filter, self.token_layout
        )
        self.batch_size, self.token_filter = batch_size, token_filter
        self.image_batch, self.buffer_tokens = image_batch, buffer_tokens
        self.seed, self.shuffle = seed, shuffle
        self.world_size, self.rank, self.num_workers = world_size, rank, num_workers
        self.skip_bad_images = skip_bad_images
        self.drop_last, self.max_batches = drop_last, max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose image order and shuffle the next iteration uses."""
        self.epoch = epoch

    def quota(self) -> int:
        """Batches per epoch, equal on every rank."""
        n = len(self.images)
        tokens = [
            [len(range(r, n, self.world_size)) * self.rows_per_image]
            for r in range(self.world_size)
        ]
        return batch_quotas(tokens, self.batch_size, self.drop_last, self.max_batches)[self.rank][0]

    def __len__(self) -> int:
        return self.quota()

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        ids = assign_images(
            len(self.images), self.seed, self.epoch, self.world_size, self.rank, self.shuffle
        )
        chunks = self.rows_of_every_image(ids)
        if self.shuffle:
            max_rows = self.image_batch * self.rows_per_image
            capacity = max(self.buffer_tokens, max_rows + self.batch_size)
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, self.rank))
            batches = shuffled_batches(
                chunks, self.batch_size, capacity, max_rows, generator, self.drop_last
            )
        else:
            batches = ordered_batches(chunks, self.batch_size, self.drop_last)
        yield from _take_quota(batches, self.quota(), f"online stream rank {self.rank}")

    def rows_of_every_image(self, ids: Sequence[int]) -> Iterator[Rows]:
        """`image_rows(ids)`, then as many readable images again as were unreadable.

        The rank's batch count (`quota`) is fixed from the number of its images before any
        is decoded; an unreadable image skipped under `skip_bad_images` would leave the
        rank short of batches while the others wait for it in the gradient all-reduce
        (a hang on NCCL). Each skipped image is therefore replaced by the next readable one
        of `ids`, from the start, cyclically: the rank yields the tokens of exactly
        len(ids) images, some twice in that epoch (logged).

        Raises:
            UnreadableImageError: None of `ids` is readable (nothing could replace them).
        """
        readable = 0
        for rows in self.image_rows(ids):
            readable += len(rows["token"]) // self.rows_per_image
            yield rows
        missing = len(ids) - readable
        if missing <= 0:
            return
        log.warning(
            "rank %d: %d of %d images were unreadable; training on %d of its readable images "
            "twice this epoch so that every rank yields the same number of batches",
            self.rank, missing, len(ids), missing,
        )  # fmt: skip
        if readable == 0:
            raise UnreadableImageError(
                f"none of the {len(ids)} images of rank {self.rank} is readable "
                "(data.on_bad_image=skip): check the dataset folder"
            )
        while missing > 0:  # ends: at least one image of ids is readable
            for rows in self.image_rows(ids):
                take = min(missing * self.rows_per_image, len(rows["token"]))
                yield {key: value[:take] for key, value in rows.items()}
                missing -= take // self.rows_per_image
                if missing <= 0:
                    return

    def image_rows(
        self, ids: Sequence[int], token_filter: TokenFilter | None = None
    ) -> Iterator[Rows]:
        """Run the images `ids` (in order) through the teacher; yield token rows per batch."""
        loader = DataLoader(
            _IndexedImages(self.images, self.skip_bad_images),
            batch_size=self.image_batch,
            sampler=list(ids),
            num_workers=self.num_workers,
            collate_fn=_collate_images,
        )
        for item in loader:
            if item is None:
                continue
            pixels, image_ids = item
            with torch.no_grad():
                captured = self.capture(pixels.to(self.device))
            if not (torch.isfinite(captured.x).all() and torch.isfinite(captured.y).all()):
                raise CacheError(
                    f"the teacher's activations are not finite (NaN/Inf) for images "
                    f"{image_ids.tolist()}; check teacher.weights and teacher.precision"
                )
            n, n_tokens = captured.x.shape[:2]
            token_index = torch.arange(n_tokens, device=self.device).expand(n, n_tokens)
            shard = {
                "x": captured.x,
                "y": captured.y,
                "token_index": token_index,
                "image_id": image_ids.to(self.device),
            }
            yield shard_token_rows(shard, token_filter or self.token_filter, self.token_layout)
