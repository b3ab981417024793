"""Zero-shot classification head: class names, prompt templates, text classifiers, logits.

Design decisions:

- The classifier is open_clip's own `build_zero_shot_classifier` (unit-norm text embeddings
  averaged over templates, renormalised), so the teacher's baseline is the number open_clip
  users get; nothing is re-implemented.
- Templates are plain `str.format` strings with one `{}` (callables are accepted and turned
  into strings), so they hash, serialise and print.
- CIFAR-100 uses OpenAI's 18-template CIFAR set (Table 5's prompt-sensitivity axis);
  ImageNet-100 and COCO use OpenAI's full 80-template ImageNet ensemble (see
  docs/metrics.md, "Prompt templates", for why not the 7-template subset).
- Classifiers are cached on disk as safetensors, keyed by a sha256 of (teacher identity,
  class names, templates): building one costs C x n_templates text forward passes, and the
  per-template classifiers for prompt sensitivity cost the same again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from clt_lightning.data.dataset_readers import DIGIT_CLASS_NAMES
from clt_lightning.errors import ConfigError
from clt_lightning.files import atomic_write_bytes
from clt_lightning.hashing import json_sha256, tensors_sha256

logger = logging.getLogger(__name__)

Template = str | Callable[[str], str]

CIFAR100_CLASS_NAMES: list[str] = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
]  # fmt: skip
"""CIFAR-100 fine labels in label order (torchvision's names with '_' read as a space)."""

COCO_CLASS_NAMES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]  # fmt: skip
"""The 80 COCO 2017 categories in category-id order (the instances annotations' names)."""

CIFAR100_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]
"""OpenAI's 18 CIFAR prompt templates (the set Table 5's prompt sensitivity varies over)."""

IMAGENET_TEMPLATES: list[str] = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
"""OpenAI's 80 ImageNet prompt templates (open_clip's `OPENAI_IMAGENET_TEMPLATES`)."""

IMAGENET_SIMPLE_TEMPLATES: list[str] = [t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
"""OpenAI's 7-template "ensemble subset" of the ImageNet set (not the default; see docs)."""

DIGIT_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "a photo of the number {}.",
    "a low resolution photo of the digit {}.",
    "a white {} on a black background.",
    "a pixelated handwritten digit {}.",
]
"""The captions the quickstart's digits teacher (experiments/digits_teacher.py) was trained
on, and its zero-shot templates."""

_TEMPLATES: dict[str, list[str]] = {
    "cifar100": CIFAR100_TEMPLATES,
    "imagenet100": IMAGENET_TEMPLATES,
    "coco": IMAGENET_TEMPLATES,
    "imagefolder": IMAGENET_TEMPLATES,
    "digits": list(DIGIT_TEMPLATES),
}
_CLASS_NAMES: dict[str, list[str]] = {
    "cifar100": CIFAR100_CLASS_NAMES,
    "coco": COCO_CLASS_NAMES,
    "digits": list(DIGIT_CLASS_NAMES),
}


def templates_for(dataset_name: str) -> list[str]:
    """Prompt templates used for a dataset's zero-shot classifier.

    Args:
        dataset_name: One of `cifar100`, `imagenet100`, `coco`, `imagefolder`, `digits`.

    Returns:
        A new list of format strings, each with one `{}` for the class name.

    Raises:
        ConfigError: For an unknown dataset name (the message lists the known ones).
    """
    if dataset_name not in _TEMPLATES:
        raise ConfigError(
            f"no prompt templates for dataset {dataset_name!r}; known: {sorted(_TEMPLATES)}"
        )
    return list(_TEMPLATES[dataset_name])


def class_names_for(dataset_name: str, dataset: Any = None) -> list[str]:
    """Class names for a dataset: the dataset object's own, else the built-in list.

    ImageNet-100 and image folders have no built-in list: their names come from the
    dataset (WNID list or folder names), so pass the dataset object.

    Args:
        dataset_name: Dataset name (see `templates_for`).
        dataset: Optional dataset with a `class_names` attribute; it wins when non-empty.

    Returns:
        The class names, indexed by label.

    Raises:
        ConfigError: When neither the dataset nor the built-in table has class names.
    """
    names = list(getattr(dataset, "class_names", None) or [])
    if names:
        return names
    if dataset_name in _CLASS_NAMES:
        return list(_CLASS_NAMES[dataset_name])
    raise ConfigError(
        f"dataset {dataset_name!r} has no class names: zero-shot classification needs them. "
        f"Built-in lists exist for {sorted(_CLASS_NAMES)}; for other datasets pass a dataset "
        "whose `class_names` is non-empty"
    )


def _as_format_strings(templates: Sequence[Template]) -> list[str]:
    """Templates as format strings; callables are rendered with the literal `{}`."""
    out = [t if isinstance(t, str) else t("{}") for t in templates]
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"each prompt template needs exactly one '{{}}'; bad: {bad[:3]}")
    return out


def _check_inputs(class_names: Sequence[str], templates: Sequence[Template]) -> list[str]:
    if len(class_names) == 0:
        raise ConfigError("class_names is empty: zero-shot classification needs class names")
    if len(templates) == 0:
        raise ConfigError("templates is empty: pass at least one prompt template")
    return _as_format_strings(templates)


def teacher_fingerprint(teacher: Any) -> str:
    """A sha256 hex digest identifying the teacher's text side.

    Uses `teacher.identity()` when the teacher has it (weights and config hashes); otherwise
    hashes the bytes of every parameter of `teacher.clip`.

    Args:
        teacher: Object with `identity()` or a `clip` module.

    Returns:
        64 hex characters.
    """
    identity = getattr(teacher, "identity", None)
    if callable(identity):
        return json_sha256(identity())
    return tensors_sha256(teacher.clip.state_dict())


def _cache_key(teacher: Any, kind: str, class_names: Sequence[str], templates: list[str]) -> str:
    payload = {
        "kind": kind,
        "teacher": teacher_fingerprint(teacher),
        "class_names": list(class_names),
        "templates": templates,
    }
    return json_sha256(payload)


def _cached(cache_dir: str | Path | None, key: str, build: Callable[[], Tensor]) -> Tensor:
    """Load the tensor stored under `key` in `cache_dir`, or build, store and return it."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"zeroshot-{key[:32]}.safetensors"
    if path.is_file():
        try:
            stored = load_safetensors(path.read_bytes())
            logger.debug("zero-shot classifier loaded from %s", path)
            return stored["classifier"]
        except Exception as err:  # noqa: BLE001 - a broken cache file is rebuilt, not fatal
            logger.warning("ignoring unreadable classifier cache %s (%s); rebuilding", path, err)
    tensor = build().contiguous()
    atomic_write_bytes(path, save_safetensors({"classifier": tensor}, metadata={"key": key}))
    logger.info("zero-shot classifier cached at %s", path)
    return tensor


def _device(teacher: Any) -> torch.device:
    return next(teacher.clip.parameters()).device


def _build(teacher: Any, class_names: Sequence[str], templates: list[str]) -> Tensor:
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            teacher.clip,
            teacher.tokenizer,
            list(class_names),
            templates,
            num_classes_per_batch=10,
            device=_device(teacher),
        )
    return weights.float().cpu()


def build_classifier(
    teacher: Any,
    class_names: Sequence[str],
    templates: Sequence[Template],
    cache_dir: str | Path | None = None,
) -> Tensor:
    """Zero-shot classifier: template-averaged, unit-norm class text embeddings.

    Args:
        teacher: Teacher with `clip` (open_clip CLIP) and `tokenizer`.
        class_names: C class names, indexed by label.
        templates: Prompt templates (format strings with one `{}`, or callables).
        cache_dir: Folder for the on-disk cache (safetensors); None disables caching.

    Returns:
        [E, C] float32 classifier on the CPU; every column has unit norm.

    Raises:
        ConfigError: Empty class names or templates, or a template without one `{}`.
    """
    fmt = _check_inputs(class_names, templates)
    key = _cache_key(teacher, "ensemble", class_names, fmt)
    return _cached(cache_dir, key, lambda: _build(teacher, class_names, fmt))


def build_per_template_classifiers(
    teacher: Any,
    class_names: Sequence[str],
    templates: Sequence[Template],
    cache_dir: str | Path | None = None,
) -> Tensor:
    """One zero-shot classifier per template (for prompt sensitivity).

    Args:
        teacher: Teacher with `clip` and `tokenizer`.
        class_names: C class names.
        templates: n_templates prompt templates.
        cache_dir: Folder for the on-disk cache; None disables caching.

    Returns:
        [n_templates, E, C] float32; every column has unit norm.
    """
    fmt = _check_inputs(class_names, templates)
    key = _cache_key(teacher, "per_template", class_names, fmt)

    def build() -> Tensor:
        """[n_templates, E, C]: one single-template classifier per template."""
        return torch.stack([_build(teacher, class_names, [t]) for t in fmt])

    return _cached(cache_dir, key, build)


def zero_shot_logits(
    image_embedding: Tensor, classifier: Tensor, logit_scale: Tensor | float
) -> Tensor:
    """CLIP logits: `logit_scale.exp() * normalize(embedding) @ classifier`.

    Args:
        image_embedding: [N, E] image embeddings (not necessarily normalised).
        classifier: [E, C] (or [n_templates, E, C] for per-template logits).
        logit_scale: The model's *log* temperature (open_clip's `logit_scale` parameter).

    Returns:
        [N, C] float32 logits ([n_templates, N, C] for a stacked classifier).
    """
    emb = F.normalize(image_embedding.float(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=emb.device).exp()
    return scale * (emb @ classifier.to(device=emb.device, dtype=torch.float32))


def logit_scale_of(teacher: Any) -> Tensor:
    """The teacher's log temperature (`teacher.clip.logit_scale`), detached, float32 CPU."""
    return teacher.clip.logit_scale.detach().float().cpu()
