"""One reader per dataset: cifar100, imagenet100, imagefolder, coco and digits.

Each `build_<name>(config, split, transform)` returns the `ImageDataset` of one split (a
split name already resolved by `datasets.resolve_split`); `clt_lightning.data.datasets`
holds the registry, the config and the design decisions (layouts, labels, splits). A
missing root or folder raises `DataNotFoundError` saying where the data should be and in
what layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from clt_lightning.data.image_datasets import (
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    FileImageDataset,
    ImageDataset,
    Transform,
    scan_class_folders,
)
from clt_lightning.errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:
    from clt_lightning.data.datasets import DatasetConfig

logger = logging.getLogger("clt_lightning.data.datasets")  # one logger for the datasets

DIGIT_CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_DIGITS = 1797
N_TRAIN_DIGITS = 1437
DIGITS_DISPLAY_SIZE = 224


def require_root(config: DatasetConfig, layout: str) -> Path:
    """The resolved root folder; ConfigError if unset, DataNotFoundError if missing."""
    if config.root is None:
        raise ConfigError(f"dataset.root is required for {config.name}; expected layout: {layout}")
    root = Path(config.root).expanduser().resolve()
    if not root.is_dir():
        raise DataNotFoundError(
            f"{config.name} root folder not found: {root}; expected layout: {layout}"
        )
    return root


def check_split(name: str, split: str, valid: Sequence[str]) -> None:
    """Raise a ConfigError naming the valid splits when `split` is not one of them."""
    if split not in valid:
        raise ConfigError(f"unknown split {split!r} for dataset {name}; valid: {list(valid)}")


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


# ---------------------------------------------------------------------- cifar100

_CIFAR_LAYOUT = (
    "root/cifar-100-python/{train,test,meta} (the python version of CIFAR-100); set "
    "dataset.download: true on a machine with network access, or extract "
    "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into root"
)


def build_cifar100(config: DatasetConfig, split: str, transform: Transform | None) -> ImageDataset:
    from torchvision.datasets import CIFAR100

    check_split("cifar100", split, ("train", "val", "test"))
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


def build_imagenet100(
    config: DatasetConfig, split: str, transform: Transform | None
) -> ImageDataset:
    check_split("imagenet100", split, ("train", "val"))
    root = require_root(config, _IMAGENET100_LAYOUT)
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
    paths, labels = scan_class_folders(split_dir, [wnid for wnid, _ in classes])
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


def build_imagefolder(
    config: DatasetConfig, split: str, transform: Transform | None
) -> ImageDataset:
    root = require_root(config, _IMAGEFOLDER_LAYOUT)
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
    paths, labels = scan_class_folders(split_dir, classes)
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
    """Single labels of a COCO instances file (the rule: `clt_lightning.data.datasets` docstring)."""

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


def build_coco(config: DatasetConfig, split: str, transform: Transform | None) -> ImageDataset:
    check_split("coco", split, ("train", "val"))
    root = require_root(config, _COCO_LAYOUT)
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
    check_split("digits", split, ("train", "val"))
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


def build_digits(config: DatasetConfig, split: str, transform: Transform | None) -> ImageDataset:
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
