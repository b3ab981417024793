"""Token streams, the shared part: splitting work over ranks and workers, token rows,
shuffling, and equal batch counts.

Two streams yield the token batch (docs/architecture.md) `{"x": [B, L, d] float32,
"y": [B, L, d] float32, "token": [B] int64, "image": [B] int64}`:
`cached_stream.CachedTokenStream` (from an activation cache) and
`online_stream.OnlineTokenStream` (from a live teacher); `ActivationDataModule` wraps them
in DataLoaders. This module holds what both use: pure functions (`assign_shards`,
`assign_images`, `batch_quotas`, `shard_token_rows`) and the shuffle buffer.

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
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from clt_lightning.tokens import CLIP_LAYOUT, TokenLayout

log = logging.getLogger(__name__)

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
    token_index: Tensor, token_filter: str, layout: TokenLayout = CLIP_LAYOUT
) -> Tensor | None:
    """Boolean mask of the tokens of a group (`TokenLayout.mask`); None keeps all."""
    if token_filter == "all":
        return None
    return layout.mask(layout.check(token_filter, "data.token_filter"), token_index)


def shard_token_rows(
    shard: dict[str, Tensor], token_filter: str, layout: TokenLayout = CLIP_LAYOUT
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


def take_quota(
    batches: Iterator[dict[str, Tensor]], quota: int | None, what: str
) -> Iterator[dict[str, Tensor]]:
    """The first `quota` batches; warns when fewer came (DDP ranks would disagree).

    Args:
        batches: A stream's batches.
        quota: Batches to yield (`batch_quotas`); None yields them all.
        what: The stream, for the warning.
    """
    produced = 0
    for batch in itertools.islice(batches, quota):
        produced += 1
        yield batch
    if quota is not None and produced < quota:
        log.warning(
            "%s yielded %d of %d batches; DDP ranks may now disagree", what, produced, quota
        )


def filtered_tokens_per_image(
    tokens_per_image: int, token_filter: str, layout: TokenLayout = CLIP_LAYOUT
) -> int:
    """Tokens per image that pass the filter (a token group of `clt_lightning.tokens`).

    Args:
        tokens_per_image: Tokens stored (cache) or made (online) per image.
        token_filter: A group in `TOKEN_GROUPS` that the layout has.
        layout: The teacher's token layout.

    Raises:
        ConfigError: A group the layout lacks.
    """
    layout.check(token_filter, "data.token_filter")
    counts = {"all": tokens_per_image, "cls": layout.n_cls, "registers": layout.n_registers}
    counts["patches"] = tokens_per_image - layout.n_prefix  # stored patches (all or random)
    return counts[token_filter]


def worker_id(num_workers: int) -> int:
    """This DataLoader worker's id (0 in the main process).

    Raises:
        ValueError: The stream was built for another number of workers.
    """
    info = get_worker_info()
    if info is None:
        return 0
    if info.num_workers != max(1, num_workers):
        raise ValueError(
            f"stream built for {num_workers} workers runs in a loader with {info.num_workers}"
        )
    return info.id
