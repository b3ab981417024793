"""DataLoaders of token streams: the epoch Lightning sets, mid-epoch resume, coverage, speed.

`EpochDataLoader` is the train loader of `ActivationDataModule`: Lightning sets each
epoch's number through its `sampler`, and its `state_dict` / `load_state_dict` (Lightning's
stateful-dataloader protocol) make a mid-epoch resume skip exactly the batches already
trained. `report_coverage` logs how much of the split an epoch uses; `bench_datamodule`
times the cached train stream (`benchmarks/bench_data.py`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Sampler

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.data.cached_stream import CachedTokenStream
from clt_lightning.data.online_stream import OnlineTokenStream

log = logging.getLogger(__name__)


class _EpochSampler(Sampler[None]):
    """The `sampler` of an `EpochDataLoader`: Lightning calls `set_epoch(epoch)` on a
    loader's sampler at the start of every epoch (its count of epochs processed, right
    after a resume too), which here selects the stream's epoch. Yields no indices: the
    stream is an IterableDataset."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)


class EpochDataLoader(DataLoader):
    """DataLoader of a token stream whose epoch Lightning sets, and that resumes mid-epoch
    (Lightning's stateful-dataloader protocol, `state_dict` / `load_state_dict`).

    Lightning sets the epoch through the loader's `sampler` (`_EpochSampler`) in the main
    process before workers copy the stream. `state_dict()` (saved in every checkpoint)
    records the epoch being iterated and the batches of it trained so far, counted from
    the trainer's public `global_step` (x `accumulate_grad_batches`) since the iteration
    began, plus those skipped on resume; Lightning's prefetching does not count. After
    `load_state_dict()`, the next iteration of that same epoch skips those batches, so a
    run resumed from a mid-epoch checkpoint trains on exactly the batches an
    uninterrupted run would. Skipping replays the stream (it reads and shuffles the
    skipped shards again), which keeps the shuffle buffer's state exact.

    Args:
        stream: The token stream (an IterableDataset with `set_epoch` and `epoch`).
        trainer_fn: Returns the trainer (or None) whose progress counts the batches.
        **kwargs: DataLoader arguments (batch_size=None: the stream yields batches).
    """

    def __init__(
        self, stream: Any, *, trainer_fn: Callable[[], Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(stream, **kwargs)
        self.trainer_fn = trainer_fn
        self._epoch: int | None = None
        self._skipped = self._start = 0
        self._resume: dict[str, Any] | None = None

    @property
    def sampler(self) -> _EpochSampler:
        """Where Lightning sets the epoch (`set_epoch`)."""
        return _EpochSampler(self.dataset)

    @sampler.setter
    def sampler(self, value: Any) -> None:
        """DataLoader.__init__ assigns its no-op sampler for IterableDatasets; ours stays."""

    def _trained(self) -> int:
        trainer = self.trainer_fn() if self.trainer_fn is not None else None
        if trainer is None:
            return 0
        steps = getattr(trainer, "global_step", 0)  # a stand-in trainer may have no steps
        return steps * getattr(trainer, "accumulate_grad_batches", 1)

    def state_dict(self) -> dict[str, Any]:
        """{"epoch": epoch being iterated, "batches": batches of it trained}."""
        return {"epoch": self._epoch, "batches": self._skipped + self._trained() - self._start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Skip the trained batches when the saved epoch is iterated next."""
        self._resume = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        self._epoch = getattr(self.dataset, "epoch", None)
        resume, self._resume = self._resume, None
        self._skipped = 0
        if resume and resume.get("epoch") == self._epoch:
            self._skipped = max(0, int(resume.get("batches", 0)))
        self._start = self._trained()
        iterator = super().__iter__()
        if self._skipped:
            log.info("resuming epoch %s after %d batches", self._epoch, self._skipped)
            return itertools.islice(iterator, self._skipped, None)
        return iterator


def report_coverage(stream: CachedTokenStream | OnlineTokenStream, batch_size: int) -> None:
    """Log how much of the split one epoch uses; warn when equal batch counts drop >10%.

    Args:
        stream: The train stream.
        batch_size: Tokens per batch.
    """
    if isinstance(stream, CachedTokenStream):
        total = sum(stream.shard_image_counts) * stream.rows_per_image
    else:
        total = len(stream.images) * stream.rows_per_image
    used = len(stream) * batch_size * stream.world_size
    share = used / max(total, 1)
    log.info(
        "train: %d batches per rank per epoch, %.1f%% of %d tokens", len(stream), 100 * share, total
    )
    if share < 0.9:
        log.warning(
            "an epoch uses only %.1f%% of the train tokens: every rank must yield as many "
            "batches as the smallest; use smaller shards (data.images_per_shard) so that they "
            "divide evenly over world_size x num_workers, or a smaller batch_size",
            100 * share,
        )


def bench_datamodule(
    cache_path: str | Path,
    batch_size: int = 4096,
    n_batches: int = 50,
    num_workers: int = 0,
    shuffle_buffer_shards: int = 4,
) -> dict[str, float]:
    """Throughput of the cached train stream on one rank.

    Args:
        cache_path: An activation cache folder (one split).
        batch_size: Tokens per batch.
        n_batches: Batches to time (after one warm-up batch).
        num_workers: Loader workers.
        shuffle_buffer_shards: Shards the shuffle buffer spans.

    Returns:
        tokens_per_s, mb_per_s (float32 x and y delivered, in MB = 1e6 bytes), batches.
    """
    cache = open_cache(cache_path, verify=False)
    stream = CachedTokenStream(
        cache,
        batch_size,
        buffer_shards=shuffle_buffer_shards,
        num_workers=num_workers,
        verify=False,
    )
    batches = iter(DataLoader(stream, batch_size=None, num_workers=num_workers))
    next(batches)
    tokens = n_bytes = done = 0
    start = time.perf_counter()
    for batch in batches:
        tokens += len(batch["token"])
        n_bytes += batch["x"].nbytes + batch["y"].nbytes
        done += 1
        if done == n_batches:
            break
    elapsed = max(time.perf_counter() - start, 1e-9)
    return {
        "tokens_per_s": tokens / elapsed,
        "mb_per_s": n_bytes / elapsed / 1e6,
        "batches": float(done),
    }
