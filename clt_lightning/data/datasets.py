"""Image datasets: cifar100, imagenet100, coco, imagefolder, digits.

Every dataset is an `ImageDataset`: `ds[i]` is `(transform(image), label)` where `i` is
the image id (0..len-1), `class_names[label]` names the class, `raw_image(i)` is the
untransformed PIL image for figures and `describe_image(i)` a short reference (a path, or
dataset/split/index) for retrieval grids. `build_dataset(config, split, transform)` is the
one entry point; `list_datasets()` names what exists.

Design decisions:

- Splits. `build_dataset(config, "train" | "val")` resolves the role through
  `config.train_split` / `config.val_split`; any other split name is used as is, so
  `build_dataset(config, config.val_split)` works too. Valid split names: cifar100
  train/val/test (val and test are both CIFAR's test set), imagenet100, coco and digits
  train/val, imagefolder any folder under the root.
- `max_images` keeps a fixed subset of a split: the first N of a permutation seeded with
  0, sorted, so a quick run sees the same images every time and image ids stay in order.
- cifar100: torchvision's CIFAR100 (its md5-checked python-version files); downloads only
  with `download: true`. Class names come from the dataset's meta, `_` replaced by spaces.
- imagenet100: the 100-class subset of ImageNet-1k from CMC (Tian et al., 2019), listed
  with readable class names (OpenAI's CLIP names for those classes) in
  `clt_lightning/resources/imagenet100.txt` (`wnid<TAB>name`, CMC order). Layout
  `root/{train,val}/<wnid>/*.JPEG`; labels follow sorted WNIDs, as torchvision's
  ImageFolder would number them.
- coco: COCO 2017 instances annotations, `root/annotations/instances_{train,val}2017.json`
  and images in `root/{train,val}2017/`. COCO is multi-label; each image gets ONE label:
  the category with the largest total annotated area (sum of `area` over the image's
  annotations of that category, crowd annotations included), ties broken by the lowest
  category id. Images without annotations are skipped; the dataset's
  `n_skipped_unannotated` says how many (and it is logged). Class names are the
  categories' names in id order; labels are 0..C-1 (C = 80 for COCO 2017).
- imagefolder: `root/<split>/<class>/<image>` like torchvision's ImageFolder; class names
  are the sorted class folder names; files with torchvision's image extensions count.
- digits: scikit-learn's `load_digits` (1,797 real 8x8 digits), split by
  `digits_split`: train = first 1,437 of `np.random.default_rng(0).permutation(1797)`,
  val = the other 360, each sorted. Values 0..16 become round(v * 255 / 16) as uint8,
  white digit on black, grey replicated to RGB. `ds[i]` transforms that native 8x8 image
  (the same pixels `experiments/digits_teacher.py` trains the digits teacher on); `raw_image(i)` is the
  digit upsampled (bilinear) to 224x224 for figures. Class names "zero".."nine".
- Image files are converted to 8-bit RGB by mode (`image_modes.to_rgb`: 16-bit and float
  images scaled, alpha dropped, unsupported modes refused).
- An image that cannot be decoded raises `UnreadableImageError` (with `.path`) from
  `ds[i]` and `raw_image(i)`; a missing root or folder raises `DataNotFoundError` saying
  where the data should be and in what layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from clt_lightning.data.image_modes import to_rgb
from clt_lightning.errors import ConfigError, DataNotFoundError, UnreadableImageError

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File extensions read as images (torchvision's list), compared case-insensitively."""

DIGIT_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_DIGITS = 1797
N_TRAIN_DIGITS = 1437
DIGITS_DISPLAY_SIZE = 224
SUBSET_SEED = 0


@dataclass(frozen=True)
class DatasetConfig:
    """Which images to use.

    Args:
        name: Dataset: cifar100, imagenet100, coco, imagefolder or digits.
        root: Dataset root folder (not used by digits).
        download: Download CIFAR-100 into `root` if it is missing (cifar100 only).
        train_split: Split used for training ("train").
        val_split: Split used for validation ("val"; cifar100 also accepts "test").
        max_images: Keep at most this many images per split: a fixed seeded subset.
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    train_split: str = "train"
    val_split: str = "val"
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.name not in _BUILDERS:
            raise ConfigError(f"unknown dataset.name {self.name!r}; valid: {list_datasets()}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"dataset.max_images must be >= 1 or null, got {self.max_images}")


# ---------------------------------------------------------------------- base class


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


class CocoDataset(FileImageDataset):
    """COCO with one label per image; `n_skipped_unannotated` images had no annotation.

    Args:
        n_skipped_unannotated: Images of the split left out for having no annotation.
        **kwargs: `FileImageDataset` arguments.
    """

    def __init__(self, *, n_skipped_unannotated: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_skipped_unannotated = n_skipped_unannotated

    def identity(self) -> dict[str, Any]:
        """`ImageDataset.identity` plus the labelling rule and the skipped count."""
        return {
            **super().identity(),
            "label_rule": "largest_total_area",
            "n_skipped_unannotated": self.n_skipped_unannotated,
        }


class DigitsDataset(ArrayImageDataset):
    """Digits: `ds[i]` transforms the native 8x8 image; `raw_image` is 224x224 bilinear.

    Args:
        sklearn_index: [n_source] index of every source item in `load_digits()`.
        **kwargs: `ArrayImageDataset` arguments.
    """

    def __init__(self, *, sklearn_index: np.ndarray, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sklearn_index = sklearn_index

    def _describe(self, j: int) -> str:
        label = self.class_names[self._source_labels[j]]
        return f"digits/{self.split}/{self.sklearn_index[j]} ({label})"

    def raw_image(self, i: int) -> Image.Image:
        size = (DIGITS_DISPLAY_SIZE, DIGITS_DISPLAY_SIZE)
        return super().raw_image(i).resize(size, Image.Resampling.BILINEAR)


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


def _require_root(config: DatasetConfig, layout: str) -> Path:
    """The resolved root folder; ConfigError if unset, DataNotFoundError if missing."""
    if config.root is None:
        raise ConfigError(f"dataset.root is required for {config.name}; expected layout: {layout}")
    root = Path(config.root).expanduser().resolve()
    if not root.is_dir():
        raise DataNotFoundError(
            f"{config.name} root folder not found: {root}; expected layout: {layout}"
        )
    return root


def _check_split(name: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ConfigError(f"unknown split {split!r} for dataset {name}; valid: {list(valid)}")


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in a folder, sorted by name."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return [folder / name for name in sorted(names)]


def _scan_class_folders(split_dir: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image paths and labels of `split_dir/<class>/*`, label = position in `classes`."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _list_images(split_dir / name)
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels


# ---------------------------------------------------------------------- registry

_Builder = Callable[[DatasetConfig, str, "Transform | None"], ImageDataset]
_BUILDERS: dict[str, _Builder] = {}


def _register(name: str) -> Callable[[_Builder], _Builder]:
    def decorate(builder: _Builder) -> _Builder:
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_datasets() -> list[str]:
    """Names accepted by `DatasetConfig.name`."""
    return sorted(_BUILDERS)


def resolve_split(config: DatasetConfig, split: str) -> str:
    """Map the roles "train"/"val" to `config.train_split`/`config.val_split`; else as is."""
    return {"train": config.train_split, "val": config.val_split}.get(split, split)


def build_dataset(
    config: DatasetConfig, split: str, transform: Transform | None = None
) -> ImageDataset:
    """Build one split of a dataset.

    Args:
        config: Which dataset, where, and how many images.
        split: "train" or "val" (resolved through config.train_split / config.val_split),
            or a split name of the dataset.
        transform: PIL image -> model input (e.g. `teacher.preprocess`); None keeps PIL.

    Returns:
        The `ImageDataset`.
    """
    if config.name not in _BUILDERS:
        raise ConfigError(f"unknown dataset.name {config.name!r}; valid: {list_datasets()}")
    dataset = _BUILDERS[config.name](config, resolve_split(config, split), transform)
    logger.info("dataset %s/%s: %d images", dataset.name, dataset.split, len(dataset))
    return dataset


# ---------------------------------------------------------------------- cifar100

_CIFAR_LAYOUT = (
    "root/cifar-100-python/{train,test,meta} (the python version of CIFAR-100); set "
    "dataset.download: true on a machine with network access, or extract "
    "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into root"
)


@_register("cifar100")
def _build_cifar100(config: DatasetConfig, split: str, transform: Transform | None) -> ImageDataset:
    from torchvision.datasets import CIFAR100

    _check_split("cifar100", split, ("train", "val", "test"))
    if config.root is None:
        raise ConfigError(
            f"dataset.root is required for cifar100; expected layout: {_CIFAR_LAYOUT}"
        )
    root = Path(config.root).expanduser().resolve()
    folder = root / CIFAR100.base_folder
    if not config.download and not folder.is_dir():
        raise DataNotFoundError(
            f"CIFAR-100 not found: expected folder {folder}; layout: {_CIFAR_LAYOUT}"
        )
    try:
        source = CIFAR100(str(root), train=split == "train", download=config.download)
    except RuntimeError as e:
        raise DataNotFoundError(
            f"CIFAR-100 in {folder} is incomplete or corrupted ({e}); layout: {_CIFAR_LAYOUT}"
        ) from e
    return ArrayImageDataset(
        name="cifar100",
        split=split,
        root=root,
        class_names=[c.replace("_", " ") for c in source.classes],
        labels=source.targets,
        pixels=source.data,
        transform=transform,
        max_images=config.max_images,
    )


# ---------------------------------------------------------------------- imagenet100

_IMAGENET100_LAYOUT = (
    "root/{train,val}/<wnid>/*.JPEG (ImageNet's ImageFolder layout, with validation images "
    "sorted into class folders) for the 100 WNIDs in clt_lightning/resources/imagenet100.txt"
)


def imagenet100_classes() -> list[tuple[str, str]]:
    """(wnid, class name) of the 100 ImageNet-100 classes, in the CMC list's order."""
    text = resources.files("clt_lightning").joinpath("resources/imagenet100.txt").read_text()
    pairs = [tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip()]
    return [(wnid.strip(), name.strip()) for wnid, name in pairs]


@_register("imagenet100")
def _build_imagenet100(
    config: DatasetConfig, split: str, transform: Transform | None
) -> ImageDataset:
    _check_split("imagenet100", split, ("train", "val"))
    root = _require_root(config, _IMAGENET100_LAYOUT)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataNotFoundError(
            f"ImageNet-100 split folder not found: {split_dir}; layout: {_IMAGENET100_LAYOUT}"
        )
    classes = sorted(imagenet100_classes())
    missing = [wnid for wnid, _ in classes if not (split_dir / wnid).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"ImageNet-100: {len(missing)} of 100 class folders missing, e.g. "
            f"{split_dir / missing[0]}; layout: {_IMAGENET100_LAYOUT}"
        )
    paths, labels = _scan_class_folders(split_dir, [wnid for wnid, _ in classes])
    return FileImageDataset(
        name="imagenet100",
        split=split,
        root=root,
        class_names=[name for _, name in classes],
        labels=labels,
        paths=paths,
        transform=transform,
        max_images=config.max_images,
    )


# ---------------------------------------------------------------------- imagefolder

_IMAGEFOLDER_LAYOUT = "root/<split>/<class>/<image files> (split folders such as train and val)"


@_register("imagefolder")
def _build_imagefolder(
    config: DatasetConfig, split: str, transform: Transform | None
) -> ImageDataset:
    root = _require_root(config, _IMAGEFOLDER_LAYOUT)
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataNotFoundError(
            f"split folder not found: {split_dir} (folders in root: {found}); "
            f"layout: {_IMAGEFOLDER_LAYOUT}"
        )
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    paths, labels = _scan_class_folders(split_dir, classes)
    if not paths:
        raise DataNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {split_dir}; "
            f"layout: {_IMAGEFOLDER_LAYOUT}"
        )
    return FileImageDataset(
        name="imagefolder",
        split=split,
        root=root,
        class_names=classes,
        labels=labels,
        paths=paths,
        transform=transform,
        max_images=config.max_images,
    )


# ---------------------------------------------------------------------- coco

_COCO_LAYOUT = (
    "root/annotations/instances_{train,val}2017.json and images in root/{train,val}2017/ "
    "(COCO 2017 from https://cocodataset.org)"
)


class CocoLabels(NamedTuple):
    """Single labels of a COCO instances file (see the module docstring for the rule)."""

    file_names: list[str]
    """File name of every kept image, by ascending image id."""
    image_ids: list[int]
    """COCO image id of every kept image."""
    labels: list[int]
    """Label (0..C-1) of every kept image."""
    class_names: list[str]
    """Category names in category id order."""
    n_skipped_unannotated: int
    """Images with no annotation, left out."""


def coco_single_labels(instances: dict[str, Any]) -> CocoLabels:
    """One label per image: the category with the largest total annotated area.

    Args:
        instances: A parsed COCO instances JSON (keys images, annotations, categories).

    Returns:
        `CocoLabels`; ties in area go to the lowest category id.
    """
    categories = sorted(instances["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: label for label, c in enumerate(categories)}
    areas: dict[int, dict[int, float]] = {}
    for ann in instances["annotations"]:
        per_category = areas.setdefault(ann["image_id"], {})
        per_category[ann["category_id"]] = per_category.get(ann["category_id"], 0.0) + float(
            ann["area"]
        )
    file_names, image_ids, labels = [], [], []
    skipped = 0
    for image in sorted(instances["images"], key=lambda im: im["id"]):
        per_category = areas.get(image["id"])
        if not per_category:
            skipped += 1
            continue
        best = min(per_category, key=lambda cat: (-per_category[cat], cat))
        file_names.append(image["file_name"])
        image_ids.append(image["id"])
        labels.append(label_of[best])
    return CocoLabels(file_names, image_ids, labels, [c["name"] for c in categories], skipped)


@_register("coco")
def _build_coco(config: DatasetConfig, split: str, transform: Transform | None) -> ImageDataset:
    _check_split("coco", split, ("train", "val"))
    root = _require_root(config, _COCO_LAYOUT)
    annotations = root / "annotations" / f"instances_{split}2017.json"
    image_dir = root / f"{split}2017"
    for needed in (annotations, image_dir):
        if not needed.exists():
            raise DataNotFoundError(f"COCO: {needed} not found; layout: {_COCO_LAYOUT}")
    coco = coco_single_labels(_read_coco_json(annotations))
    if coco.n_skipped_unannotated:
        logger.info(
            "coco/%s: skipped %d images without annotations", split, coco.n_skipped_unannotated
        )
    return CocoDataset(
        n_skipped_unannotated=coco.n_skipped_unannotated,
        name="coco",
        split=split,
        root=root,
        class_names=coco.class_names,
        labels=coco.labels,
        paths=[image_dir / name for name in coco.file_names],
        transform=transform,
        max_images=config.max_images,
    )


def _read_coco_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"COCO annotations {path} are not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ConfigError(f"COCO annotations {path} lack {missing}; expected an instances file")
    return data


# ---------------------------------------------------------------------- digits


def digits_split(split: str) -> np.ndarray:
    """Indices into `sklearn.datasets.load_digits()` of a digits split.

    Args:
        split: "train" (1,437 digits) or "val" (360 digits).

    Returns:
        Sorted int64 indices: train = first 1,437 of `default_rng(0).permutation(1797)`.
    """
    _check_split("digits", split, ("train", "val"))
    perm = np.random.default_rng(0).permutation(N_DIGITS)
    part = perm[:N_TRAIN_DIGITS] if split == "train" else perm[N_TRAIN_DIGITS:]
    return np.sort(part).astype(np.int64)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as [N, 8, 8] uint8 (round(v * 255 / 16)) and [N] int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    pixels.setflags(write=False)
    return pixels, digits.target.astype(np.int64)


@_register("digits")
def _build_digits(config: DatasetConfig, split: str, transform: Transform | None) -> ImageDataset:
    index = digits_split(split)
    pixels, labels = _digits_arrays()
    return DigitsDataset(
        sklearn_index=index,
        name="digits",
        split=split,
        root=None,
        class_names=list(DIGIT_CLASS_NAMES),
        labels=labels[index],
        pixels=pixels[index],
        transform=transform,
        max_images=config.max_images,
    )
