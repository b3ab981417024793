"""Image datasets, the common part: `ImageDataset` and the file and array variants.

Every dataset is an `ImageDataset`: `ds[i]` is `(transform(image), label)` where `i` is
the image id (0..len-1), `class_names[label]` names the class, `raw_image(i)` is the
untransformed PIL image for figures and `describe_image(i)` a short reference (a path, or
dataset/split/index) for retrieval grids. `FileImageDataset` reads image files
(`open_image`: 8-bit RGB by mode, `image_modes.to_rgb`), `ArrayImageDataset` holds decoded
pixels. The datasets themselves are built by `clt_lightning.data.datasets.build_dataset`
(readers in `clt_lightning.data.dataset_readers`).

Design decisions:

- `max_images` keeps a fixed subset of a split: the first N of a permutation seeded with
  0, sorted, so a quick run sees the same images every time and image ids stay in order
  (`subset_indices`).
- An image that cannot be decoded raises `UnreadableImageError` (with `.path`) from
  `ds[i]` and `raw_image(i)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clt_lightning.data.image_modes import to_rgb
from clt_lightning.errors import UnreadableImageError

Transform = Callable[[Image.Image], Any]
"""PIL image -> model input (e.g. `teacher.preprocess`)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File extensions that count as images (torchvision's)."""
SUBSET_SEED = 0
"""Seed of the `max_images` permutation."""


class ImageDataset(torch.utils.data.Dataset):
    """Images with one integer label each; the index is the image id.

    Subclasses provide `_load(j)` (PIL RGB image of source item j) and `_describe(j)`;
    this class handles the `max_images` subset, the transform and identity.

    Args:
        name: Dataset name.
        split: Split name as resolved (e.g. "train", "test").
        root: Resolved dataset root (None for digits).
        class_names: Class names indexed by label.
        labels: [n_source] int labels of every source item.
        transform: PIL image -> model input; None returns the PIL image.
        max_images: Keep a seeded subset of at most this many items.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        root: Path | None,
        class_names: list[str],
        labels: Sequence[int] | np.ndarray,
        transform: Transform | None,
        max_images: int | None,
    ) -> None:
        self.name = name
        self.split = split
        self.root = root
        self.class_names = list(class_names)
        self.transform = transform
        self.max_images = max_images
        self._source_labels = np.asarray(labels, dtype=np.int64)
        self.source_index = subset_indices(len(self._source_labels), max_images)
        """[n_images] int64: the source item behind each image id."""

    def __len__(self) -> int:
        return len(self.source_index)

    @property
    def labels(self) -> np.ndarray:
        """[n_images] int64 labels, by image id."""
        return self._source_labels[self.source_index]

    def _source(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(
                f"image id {i} out of range for {self.name}/{self.split} ({len(self)})"
            )
        return int(self.source_index[i])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        """(transformed image, label) of image id i; UnreadableImageError if it won't decode."""
        j = self._source(i)
        image = self._load(j)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._source_labels[j])

    def raw_image(self, i: int) -> Image.Image:
        """The untransformed RGB image of image id i, for figures."""
        return self._load(self._source(i))

    def describe_image(self, i: int) -> str:
        """A short reference to image id i: its path, or dataset/split/index and class."""
        return self._describe(self._source(i))

    def identity(self) -> dict[str, Any]:
        """JSON-able: name, split, root (resolved), n_images, max_images, transform repr."""
        return {
            "name": self.name,
            "split": self.split,
            "root": None if self.root is None else str(self.root),
            "n_images": len(self),
            "max_images": self.max_images,
            "transform": transform_repr(self.transform),
        }

    def _load(self, j: int) -> Image.Image:
        raise NotImplementedError

    def _describe(self, j: int) -> str:
        raise NotImplementedError


class FileImageDataset(ImageDataset):
    """An `ImageDataset` over image files on disk (imagefolder, imagenet100, coco).

    Args:
        paths: Image file of every source item.
        **kwargs: `ImageDataset` arguments.
    """

    def __init__(self, *, paths: Sequence[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.paths = list(paths)

    def _load(self, j: int) -> Image.Image:
        return open_image(self.paths[j])

    def _describe(self, j: int) -> str:
        return str(self.paths[j])


class ArrayImageDataset(ImageDataset):
    """An `ImageDataset` over an in-memory uint8 array (cifar100, digits).

    Args:
        pixels: [n_source, H, W, 3] or [n_source, H, W] uint8.
        **kwargs: `ImageDataset` arguments.
    """

    def __init__(self, *, pixels: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pixels = pixels

    def _load(self, j: int) -> Image.Image:
        return Image.fromarray(self.pixels[j]).convert("RGB")

    def _describe(self, j: int) -> str:
        label = self.class_names[self._source_labels[j]]
        return f"{self.name}/{self.split}/{j} ({label})"


# ---------------------------------------------------------------------- helpers


def subset_indices(n: int, max_images: int | None) -> np.ndarray:
    """The source items kept by `max_images`: first N of a seed-0 permutation, sorted.

    Args:
        n: Number of source items.
        max_images: Keep at most this many (None keeps all).

    Returns:
        [min(n, max_images)] int64, ascending.
    """
    if max_images is None or max_images >= n:
        return np.arange(n, dtype=np.int64)
    perm = np.random.default_rng(SUBSET_SEED).permutation(n)
    return np.sort(perm[:max_images]).astype(np.int64)


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to 8-bit RGB (`image_modes.to_rgb`: every mode scaled right).

    Raises:
        UnreadableImageError: The file does not decode, or its mode has no faithful RGB
            conversion; `.path` names the file and the message says why.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        error = UnreadableImageError(f"cannot read image {path}: {e}")
        error.path = str(path)
        raise error from e


def transform_repr(transform: Transform | None) -> str | None:
    """repr of a transform without memory addresses, so it is the same in every process."""
    if transform is None:
        return None
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in a folder, sorted by name."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return [folder / name for name in sorted(names)]


def scan_class_folders(split_dir: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image paths and labels of `split_dir/<class>/*`, label = position in `classes`."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels
