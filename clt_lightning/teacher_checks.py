"""Checks of teacher settings that run before any model is built or image read.

- `validate_device`: a device string torch parses and this machine has ("cuda" without a
  GPU, "cuda:3" on a 2-GPU machine and "tpu9" are `ConfigError`s naming the setting).
- `validate_vision_config`: the `vision_cfg` of a custom open_clip model-config JSON
  (layers, width, patch and image size are positive integers, the patch fits the image),
  so a bad file is refused in one line instead of building a model with no blocks or no
  patches.
- `weights_read_error`: a weights file that a weights-only load refuses is named in one
  line, without torch's advice to load it unsafely.

Both are self-contained functions so that any backbone's config reader can call them.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clt_lightning.errors import CheckpointMismatchError, ConfigError

_VALID_DEVICES = "valid: 'cpu', 'cuda', 'cuda:N' (with a GPU), 'mps' (Apple silicon)"


def _available(device: torch.device) -> tuple[bool, str]:
    """Whether this machine has `device`, and what it has instead."""
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return False, "this machine has no CUDA GPU (use 'cpu')"
        if device.index is not None and device.index >= count:
            return False, f"this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"
        return True, ""
    if device.type == "mps":
        ok = torch.backends.mps.is_available()
        return ok, "" if ok else "MPS is not available here (use 'cpu')"
    return False, f"device type {device.type!r} is not supported here"


def validate_device(device: str, key: str) -> torch.device:
    """Parse a device setting and check that this machine has it.

    Args:
        device: e.g. "cpu", "cuda", "cuda:1", "mps".
        key: The setting, for the message (e.g. "data.teacher.device").

    Returns:
        The parsed `torch.device`.

    Raises:
        ConfigError: Not a device string, or a device this machine does not have.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key}={device!r} is not a device; {_VALID_DEVICES}") from None
    ok, why = _available(parsed)
    if not ok:
        raise ConfigError(f"{key}={device!r} cannot be used: {why}; {_VALID_DEVICES}")
    return parsed


_POSITIVE_VISION_KEYS = ("layers", "width", "patch_size", "image_size")


def _as_size(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def validate_vision_config(model_cfg: Mapping[str, Any], path: str | Path) -> None:
    """Check the `vision_cfg` of an open_clip model config before it is built.

    Args:
        model_cfg: The model config ({"embed_dim", "vision_cfg", "text_cfg", ...}).
        path: The JSON file it came from (`teacher.model_config`), for the message.

    Raises:
        ConfigError: A size that is not a positive integer, `head_width` larger than
            `width`, or a patch larger than the image (names the file and the key).
    """
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, Mapping):
        raise ConfigError(f"teacher.model_config {path}: vision_cfg must be a JSON object")
    for name in (*_POSITIVE_VISION_KEYS, "head_width"):
        if name not in vision:
            continue
        for value in _as_size(vision[name]):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"teacher.model_config {path}: vision_cfg.{name} must be a positive "
                    f"integer, got {vision[name]!r}"
                )
    patch = _as_size(vision.get("patch_size", 16))
    image = _as_size(vision.get("image_size", 224))
    if len(patch) == 1:
        patch = patch * len(image)
    if any(p > i for p, i in zip(patch, image, strict=False)):
        raise ConfigError(
            f"teacher.model_config {path}: vision_cfg.patch_size {vision.get('patch_size')} "
            f"is larger than vision_cfg.image_size {vision.get('image_size')}; a patch must "
            "fit in the image (e.g. patch_size 16 for image_size 224)"
        )
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if isinstance(width, int) and isinstance(head_width, int) and head_width > width:
        raise ConfigError(
            f"teacher.model_config {path}: vision_cfg.head_width {head_width} is larger than "
            f"vision_cfg.width {width}"
        )


def weights_read_error(key: str, path: str | Path, error: BaseException) -> CheckpointMismatchError:
    """One line for a weights file that cannot be read safely, without torch's advice to
    retry with `weights_only=False` (that would run whatever code the file holds).

    Args:
        key: The setting that names the file (e.g. "teacher.weights").
        path: The file.
        error: What safetensors or `torch.load(weights_only=True)` raised.
    """
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        return CheckpointMismatchError(
            f"{key} {path} holds Python objects besides tensors and was refused unread "
            "(files are loaded weights-only: such a file can run code); give a state dict "
            "of tensors, ideally a .safetensors file"
        )
    reason = (text.strip().splitlines() or [type(error).__name__])[0][:200]
    return CheckpointMismatchError(
        f"cannot read {key} {path}: {type(error).__name__}: {reason} (truncated, or not a "
        ".safetensors / torch state-dict file)"
    )
