"""Token batches made on the fly from a live teacher: `OnlineTokenStream`.

Images are split over ranks (`streams.assign_images`), run through the frozen teacher on
the training device, shuffled through a token buffer there, and cut to the same number of
batches on every rank; see `clt_lightning.data.streams` for the design.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from clt_lightning.data.streams import (
    Rows,
    assign_images,
    batch_quotas,
    filtered_tokens_per_image,
    ordered_batches,
    shard_token_rows,
    shuffled_batches,
    stream_seed,
    take_quota,
)
from clt_lightning.errors import CacheError, UnreadableImageError
from clt_lightning.tokens import TokenLayout, layout_of

log = logging.getLogger(__name__)


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
        token_filter: str = "all",
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
        yield from take_quota(batches, self.quota(), f"online stream rank {self.rank}")

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

    def image_rows(self, ids: Sequence[int], token_filter: str | None = None) -> Iterator[Rows]:
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
