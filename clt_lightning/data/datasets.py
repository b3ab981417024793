"""Image datasets: cifar100, imagenet100, coco, imagefolder, digits.

Every dataset is an `ImageDataset` (`clt_lightning.data.image_datasets`): `ds[i]` is
`(transform(image), label)` where `i` is the image id (0..len-1), `class_names[label]`
names the class, `raw_image(i)` is the untransformed PIL image for figures and
`describe_image(i)` a short reference (a path, or dataset/split/index) for retrieval
grids. `build_dataset(config, split, transform)` is the one entry point; `list_datasets()`
names what exists. This module holds the config and the registry; each dataset's reader
is in `clt_lightning.data.dataset_readers`.

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

import logging
from collections.abc import Callable
from dataclasses import dataclass

from clt_lightning.data import dataset_readers
from clt_lightning.data.image_datasets import ImageDataset, Transform
from clt_lightning.errors import ConfigError

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------- registry

_Builder = Callable[[DatasetConfig, str, "Transform | None"], ImageDataset]
_BUILDERS: dict[str, _Builder] = {
    "cifar100": dataset_readers.build_cifar100,
    "imagenet100": dataset_readers.build_imagenet100,
    "imagefolder": dataset_readers.build_imagefolder,
    "coco": dataset_readers.build_coco,
    "digits": dataset_readers.build_digits,
}


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
