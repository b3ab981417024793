"""Training the quickstart's digits CLIP: data, augmentation, loss, zero-shot accuracy.

`experiments/digits_teacher.py` calls `train_digits_clip` and keeps the result in a cache
folder; nothing in the package uses this file. The digits themselves (`digits` in
`clt_lightning.data.datasets`) and the caption templates (`DIGIT_TEMPLATES` in
`clt_lightning.evaluation.zeroshot`) are the package's: the pipeline evaluates the teacher
on them.

Design decisions:

- Every image the model is trained and evaluated on is an image of the project's `digits`
  dataset put through open_clip's eval transform, built from the model config exactly as
  `Teacher.preprocess` is (for the default config: `open_clip.image_transform(32,
  is_train=False)`: bicubic resize, center crop, to tensor, OpenAI mean/std), so the
  zero-shot accuracy measured here is the one the rest of the pipeline sees. Augmentation
  (a random affine warp with a black fill) is applied afterwards, to the transformed
  tensors, during training only.
- The loss is CLIP's symmetric contrastive loss with every caption of every class in the
  batch, and with all same-class pairs as positives (as in UniCL): ten classes make many
  exact duplicates in a batch, which plain InfoNCE would push apart.
- Training runs a fixed number of epochs (never a time budget) from a fixed seed, inside
  `torch.random.fork_rng` so the caller's random state is untouched; the same seed,
  settings and thread count give the same weights. The learning rate follows the
  package's `lr_factor` (linear warm-up, cosine decay to zero).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from clt_lightning.data.dataset_readers import DIGIT_CLASS_NAMES
from clt_lightning.data.datasets import DatasetConfig, build_dataset
from clt_lightning.errors import ConfigError, NonFiniteLossError
from clt_lightning.evaluation.zeroshot import DIGIT_TEMPLATES, zero_shot_logits
from clt_lightning.module import lr_factor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """How the digits teacher is trained.

    Args:
        epochs: Passes over the 1,437 training digits.
        batch_size: Images per optimiser step.
        lr: Peak AdamW learning rate (linear warmup, then cosine decay to zero).
        weight_decay: AdamW weight decay on matrices (not on gains, biases, logit scale).
        warmup_fraction: Fraction of the steps spent warming up the learning rate.
        max_rotation: Largest random rotation, in degrees.
        max_shift: Largest random translation, as a fraction of the image size.
        max_scale: Largest random relative zoom in or out (0.1 means 0.9x to 1.1x).
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    max_rotation: float = 12.0
    max_shift: float = 0.1
    max_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"TrainSettings.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"TrainSettings.batch_size must be >= 2, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"TrainSettings.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                f"TrainSettings.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )


# ----------------------------------------------------------------------------- data


def preprocess_config(model_config: dict[str, Any]) -> PreprocessCfg:
    """open_clip's preprocess config for a model config, built as `Teacher` builds it.

    Args:
        model_config: open_clip model config; its optional `preprocess_cfg` (mean, std,
            interpolation, resize_mode) overrides open_clip's defaults (OpenAI mean/std,
            bicubic, shortest-side resize).
    """
    pp = merge_preprocess_dict(PreprocessCfg(), model_config.get("preprocess_cfg") or {})
    pp["size"] = model_config["vision_cfg"]["image_size"]
    return PreprocessCfg(**pp)


def eval_transform(model_config: dict[str, Any]) -> Callable[[Image.Image], Tensor]:
    """open_clip's eval transform for the model: resize, center crop, to tensor, normalise.

    This is the transform `Teacher.preprocess` applies downstream.

    Args:
        model_config: open_clip model config.
    """
    return image_transform_v2(preprocess_config(model_config), is_train=False)


def load_digits(split: str, transform: Callable[[Image.Image], Tensor]) -> tuple[Tensor, Tensor]:
    """Every digit of a split from the project's `digits` dataset, transformed.

    Args:
        split: "train" (1,437 digits) or "val" (360), see `digits_split`.
        transform: PIL image -> [3, H, W] tensor (normally `eval_transform`).

    Returns:
        (images [N, 3, H, W] float32, labels [N] int64), in image-id order.
    """
    dataset = build_dataset(DatasetConfig(name="digits"), split, transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, torch.from_numpy(dataset.labels)


def background_value(model_config: dict[str, Any]) -> Tensor:
    """A black pixel after normalisation, per channel: [3, 1, 1]."""
    pp = preprocess_config(model_config)
    return (-torch.tensor(pp.mean) / torch.tensor(pp.std)).view(3, 1, 1)


def random_affine(
    images: Tensor, background: Tensor, settings: TrainSettings, generator: torch.Generator
) -> Tensor:
    """Randomly rotate, shift and zoom a batch, filling uncovered pixels with black.

    Args:
        images: [B, 3, H, W] normalised images.
        background: [3, 1, 1] value of black after normalisation.
        settings: Augmentation ranges.
        generator: Source of randomness (CPU).

    Returns:
        [B, 3, H, W] warped images.
    """
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(settings.max_rotation)
    scale = 1 + u[:, 1] * settings.max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid works in [-1, 1] coordinates, so a shift of f of the image is 2f.
    shift = u[:, 2:] * 2 * settings.max_shift
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros")
    return warped + background


# ----------------------------------------------------------------------------- model


def build_model(model_config: dict[str, Any]) -> open_clip.CLIP:
    """An open_clip `CLIP` from a model config, as `open_clip.create_model` would build it.

    Args:
        model_config: {"embed_dim", "vision_cfg", "text_cfg", optional "quick_gelu"}.
    """
    try:
        return open_clip.CLIP(
            embed_dim=model_config["embed_dim"],
            vision_cfg=model_config["vision_cfg"],
            text_cfg=model_config["text_cfg"],
            quick_gelu=model_config.get("quick_gelu", False),
        )
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"invalid open_clip model config ({e}); expected keys embed_dim, vision_cfg, text_cfg"
        ) from e


def build_tokenizer(model_config: dict[str, Any]) -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer with the model's context length."""
    return open_clip.SimpleTokenizer(context_length=model_config["text_cfg"]["context_length"])


def template_ensemble_logits(
    model: open_clip.CLIP,
    tokenizer: Callable[[list[str]], Tensor],
    images: Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
) -> Tensor:
    """Zero-shot logits of an open_clip CLIP: open_clip's template-ensemble classifier and
    `clt_lightning.evaluation.zeroshot.zero_shot_logits` (no cache, no `Teacher` needed).

    Args:
        model: open_clip CLIP (used as is: call `model.eval()` first for eval-mode numbers).
        tokenizer: Text -> [n, context_length] token ids.
        images: [N, 3, H, W] preprocessed images.
        class_names: C class names.
        templates: Caption templates with one `{}` for the class name.
        batch_size: Images per forward pass.

    Returns:
        [N, C] logits (`logit_scale.exp() * cos`).
    """
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, class_names, templates, num_classes_per_batch=None
        )  # [E, C], unit columns
        logits = [
            zero_shot_logits(model.encode_image(chunk), classifier, model.logit_scale)
            for chunk in images.split(batch_size)
        ]
    return torch.cat(logits)


def zero_shot_accuracy(
    model: open_clip.CLIP,
    tokenizer: Callable[[list[str]], Tensor],
    images: Tensor,
    labels: Tensor | np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
) -> float:
    """Top-1 zero-shot accuracy (see `template_ensemble_logits` for the arguments).

    Args:
        model: open_clip CLIP, in eval mode.
        tokenizer: Text -> [n, context_length] token ids.
        images: [N, 3, H, W] preprocessed images.
        labels: [N] class indices.
        class_names: C class names.
        templates: Caption templates with one `{}` for the class name.
        batch_size: Images per forward pass.

    Returns:
        Fraction of images whose highest logit is their label.
    """
    logits = template_ensemble_logits(model, tokenizer, images, class_names, templates, batch_size)
    labels = torch.as_tensor(labels)
    return (logits.argmax(dim=1) == labels).double().mean().item()


# ----------------------------------------------------------------------------- training


def contrastive_loss(
    image_emb: Tensor, text_emb: Tensor, image_labels: Tensor, text_labels: Tensor, scale: Tensor
) -> Tensor:
    """Symmetric CLIP loss where every same-class (image, caption) pair is a positive.

    Args:
        image_emb: [B, E] unit image embeddings.
        text_emb: [M, E] unit caption embeddings.
        image_labels: [B] class of each image.
        text_labels: [M] class of each caption.
        scale: Scalar multiplier of the cosine similarities (`logit_scale.exp()`).

    Returns:
        Scalar: mean of the image->text and text->image cross-entropies against targets
        spread uniformly over the positives.
    """
    logits = scale * image_emb @ text_emb.T  # [B, M]
    positive = (image_labels[:, None] == text_labels[None, :]).float()
    image_to_text = -(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
    text_to_image = -(positive / positive.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0)
    has_image = positive.sum(0) > 0  # captions of classes absent from the batch have no target
    return (image_to_text.mean() + text_to_image[has_image].mean()) / 2


def _optimizer(model: open_clip.CLIP, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not gains, biases or the logit scale)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate of a step: `lr_factor`'s linear warm-up over `warmup_fraction` of the
    steps, then cosine decay to zero."""
    warmup = max(1, round(total * settings.warmup_fraction))
    return settings.lr * lr_factor(step, warmup, total, "cosine", 0.0)


@dataclass
class _DigitsData:
    """Preprocessed digits and the tokenized captions of every (class, template) pair."""

    train_images: Tensor  # [N_train, 3, H, W]
    train_labels: Tensor  # [N_train]
    val_images: Tensor  # [N_val, 3, H, W]
    val_labels: Tensor  # [N_val]
    caption_tokens: Tensor  # [C * n_templates, context_length]
    caption_labels: Tensor  # [C * n_templates]
    background: Tensor  # [3, 1, 1] black after normalisation


def _prepare_data(model_config: dict[str, Any]) -> _DigitsData:
    transform = eval_transform(model_config)
    train_images, train_labels = load_digits("train", transform)
    val_images, val_labels = load_digits("val", transform)
    captions = [t.format(name) for name in DIGIT_CLASS_NAMES for t in DIGIT_TEMPLATES]
    caption_labels = torch.arange(len(DIGIT_CLASS_NAMES)).repeat_interleave(len(DIGIT_TEMPLATES))
    return _DigitsData(
        train_images=train_images,
        train_labels=train_labels,
        val_images=val_images,
        val_labels=val_labels,
        caption_tokens=build_tokenizer(model_config)(captions),
        caption_labels=caption_labels,
        background=background_value(model_config),
    )


def _train_epoch(
    model: open_clip.CLIP,
    optimizer: torch.optim.Optimizer,
    data: _DigitsData,
    settings: TrainSettings,
    generator: torch.Generator,
    first_step: int,
) -> list[float]:
    """One pass over the train digits in a random order (the ragged last batch dropped).

    Returns:
        The loss of every step.
    """
    model.train()
    n_steps = len(data.train_labels) // settings.batch_size
    total_steps = settings.epochs * n_steps
    order = torch.randperm(len(data.train_labels), generator=generator)
    losses = []
    for i, batch in enumerate(order[: n_steps * settings.batch_size].view(n_steps, -1)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(first_step + i, total_steps, settings)
        images = random_affine(data.train_images[batch], data.background, settings, generator)
        loss = contrastive_loss(
            model.encode_image(images, normalize=True),
            model.encode_text(data.caption_tokens, normalize=True),
            data.train_labels[batch],
            data.caption_labels,
            model.logit_scale.exp(),
        )
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"digits teacher: loss {loss.item()} at step {first_step + i}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 is unstable
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    return losses


def train_digits_clip(
    model_config: dict[str, Any],
    settings: TrainSettings,
    seed: int = 0,
    progress: bool = True,
) -> tuple[open_clip.CLIP, float]:
    """Train a CLIP on the digits train split and measure zero-shot accuracy on val.

    Deterministic for a seed (and thread count); the caller's RNG state is untouched.

    Args:
        model_config: open_clip model config.
        settings: Training settings.
        seed: Seeds the initialisation, the batch order and the augmentation.
        progress: Show a progress bar over epochs with the loss and val accuracy.

    Returns:
        (model in eval mode, val zero-shot accuracy).
    """
    data = _prepare_data(model_config)
    tokenizer = build_tokenizer(model_config)
    n_steps = len(data.train_labels) // settings.batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_config)
        generator = torch.Generator().manual_seed(seed)
        optimizer = _optimizer(model, settings)
        bar = tqdm(range(settings.epochs), desc="digits teacher", disable=not progress)
        accuracy = float("nan")
        for epoch in bar:
            losses = _train_epoch(model, optimizer, data, settings, generator, epoch * n_steps)
            model.eval()
            accuracy = zero_shot_accuracy(
                model,
                tokenizer,
                data.val_images,
                data.val_labels,
                DIGIT_CLASS_NAMES,
                DIGIT_TEMPLATES,
            )
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_acc=f"{accuracy:.3f}")
            logger.debug("epoch %d: loss %.4f, val acc %.4f", epoch, np.mean(losses), accuracy)
    return model, accuracy
