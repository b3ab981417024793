"""Writing the activation cache: `write_cache` and its data feed.

Owns the teacher/dataset protocols, the batch feed (guarded dataset, collation, per-shard
batches, token capture, shard buffers, bad-image handling), argument validation and
`write_cache` itself, which hands finished shards to the background writer in
`clt_lightning.data.cache_shards`. `docs/cache-format.md` specifies what it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clt_lightning.data import cache_format
from clt_lightning.data.cache_format import (
    BAD_IMAGE_POLICIES,
    CACHE_TOKENS,
    DTYPES,
    MANIFEST_NAME,
    CacheDtype,
    CacheTokens,
    StoredTokens,
)
from clt_lightning.data.cache_resume import (
    CacheDataset,
    CacheTeacher,
    cache_settings,
    check_disk_space,
    check_foreign_files,
    exclusive_lock,
    start_or_resume,
)
from clt_lightning.data.cache_shards import CacheState, ShardJob, ShardWriter
from clt_lightning.errors import CacheError, ConfigError, UnreadableImageError
from clt_lightning.files import human_bytes
from clt_lightning.tokens import TokenLayout, layout_of

logger = logging.getLogger("clt_lightning.data.cache")  # one logger for all cache_* modules


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

    def finish(self) -> ShardJob:
        """The shard's tensors, trimmed to the images actually stored."""
        empty = torch.zeros(0, dtype=torch.int64)
        tensors = {
            "x": self.x[: self.n],
            "y": self.y[: self.n],
            "label": torch.cat([empty, *self.labels]),
            "image_id": torch.cat([empty, *self.ids]),
            "token_index": torch.from_numpy(np.concatenate(self.positions)),
        }
        return ShardJob(self.index, self.first_id, self.end_id, tensors, self.skipped)


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
    selection: StoredTokens,
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
    selection: StoredTokens
    dtype: torch.dtype
    images_per_shard: int
    n_dataset_images: int
    on_bad_image: str
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.device = _teacher_device(self.teacher)

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


def _produce(run: _Run, loader: Iterator[_Batch], writer: ShardWriter, bar: tqdm) -> None:
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
        bar.set_postfix_str(f"{human_bytes(writer.bytes_written)} written", refresh=False)
    if buffer is not None:
        writer.submit(buffer.finish())


def _validate_arguments(
    dtype: str,
    tokens: str,
    on_bad_image: str,
    n_random_patches: int,
    seed: int,
    teacher: CacheTeacher,
    sizes: Mapping[str, int],
) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not valid; use one of {sorted(DTYPES)}")
    if tokens not in CACHE_TOKENS:
        raise ConfigError(f"tokens={tokens!r} is not valid; use one of {list(CACHE_TOKENS)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"on_bad_image={on_bad_image!r} is not valid; use one of {list(BAD_IMAGE_POLICIES)}"
        )
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name}={value} is not valid; it must be at least 1")
    teacher_tokens = teacher.tokens_per_image
    if tokens == "cls+random" and not 1 <= n_random_patches <= teacher_tokens - 1:
        raise ConfigError(
            f"n_random_patches={n_random_patches} is not valid for a teacher with "
            f"{teacher_tokens - 1} patch tokens; use 1..{teacher_tokens - 1}"
        )
    if tokens == "cls+random" and seed < 0:
        raise ConfigError(f"seed={seed} is not valid; it must be >= 0")
    _check_token_mode(tokens, layout_of(teacher))


def write_cache(
    teacher: CacheTeacher,
    dataset: CacheDataset,
    out_dir: str | Path,
    *,
    dtype: CacheDtype = "fp16",
    images_per_shard: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
    tokens: CacheTokens = "all",
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
    _validate_arguments(dtype, tokens, on_bad_image, n_random_patches, seed, teacher, sizes)
    _check_workers_and_images(num_workers, dataset)
    stored = StoredTokens(tokens, n_random_patches, seed, teacher.tokens_per_image)
    settings = cache_settings(teacher, dataset, dtype, stored, images_per_shard)
    out_dir = Path(out_dir)
    if _already_complete(out_dir, settings, batch_size):  # no lock: may be read-only storage
        return out_dir
    _prepare_folder(out_dir)
    with exclusive_lock(out_dir):
        state = start_or_resume(out_dir, settings, batch_size)
        if state is None:
            logger.info("activation cache %s is already complete", out_dir)
            return out_dir
        run = _Run(teacher, stored, DTYPES[dtype], images_per_shard, len(dataset), on_bad_image)
        _write_shards(run, dataset, out_dir, state, batch_size, num_workers, progress)
    return out_dir


def _prepare_folder(out_dir: Path) -> None:
    """Create the folder; refuse one holding foreign files before the lock file is made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / MANIFEST_NAME).exists():
        check_foreign_files(out_dir)


def _check_workers_and_images(num_workers: int, dataset: CacheDataset) -> None:
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} is not valid; it must be >= 0")
    if len(dataset) == 0:
        raise CacheError(f"the dataset {dataset.identity()} has no images to cache")


def _already_complete(out_dir: Path, settings: dict[str, Any], batch_size: int) -> bool:
    """Whether `out_dir` holds the complete cache of these settings (nothing to write).

    Raises:
        CacheError: As `start_or_resume` (a cache made with other settings).
    """
    if not (out_dir / MANIFEST_NAME).is_file():
        return False
    if start_or_resume(out_dir, settings, batch_size) is not None:
        return False
    logger.info("activation cache %s is already complete", out_dir)
    return True


def _write_shards(
    run: _Run,
    dataset: CacheDataset,
    out_dir: Path,
    state: CacheState,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Produce every missing shard, then mark the cache complete."""
    for stale in out_dir.glob(".*.tmp"):  # temp files of a killed run (we hold the lock)
        stale.unlink()
    start_shard = len(state.manifest["shards"])
    start = min(start_shard * run.images_per_shard, run.n_dataset_images)
    check_disk_space(out_dir, run.n_dataset_images - start, state.manifest)
    cache_format.write_manifest(out_dir, state.to_manifest())  # a new cache exists from here on
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
    writer = ShardWriter(out_dir, state)
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
        bar.set_postfix_str(f"{human_bytes(writer.bytes_written)} written")
        bar.close()
    if state.manifest["n_images"] == 0:
        raise CacheError(f"no image of {out_dir} could be read: every image was skipped")
    state.manifest["complete"] = True
    cache_format.write_manifest(out_dir, state.to_manifest())
    logger.info(
        "activation cache %s complete: %d images, %d skipped",
        out_dir,
        state.manifest["n_images"],
        state.manifest["n_skipped"],
    )


def _check_token_mode(tokens: str, layout: TokenLayout) -> None:
    """Refuse cache token modes that assume a [CLS] token followed by patches only."""
    if tokens != "all" and layout.n_cls == 0:
        raise ConfigError(
            f"cache tokens={tokens!r} keeps the [CLS] token, which this teacher lacks "
            f"({layout.describe()}); use tokens='all'"
        )
    if tokens == "cls+random" and layout.n_registers:
        raise ConfigError(
            f"cache tokens='cls+random' draws patches from positions 1..T-1, which would "
            f"include this teacher's {layout.n_registers} register tokens; use 'all' or 'cls'"
        )
