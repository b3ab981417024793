"""Building a teacher's model from its settings: names, model-config files, weights files.

`Teacher` (teacher.py) calls these before it wraps the model; each refuses a bad setting
in one line naming the key (`teacher.model_name`, `teacher.pretrained`,
`teacher.model_config`, `teacher.weights`):

- `build_named_clip`: an open_clip name and pretrained tag (QuickGELU when the tag was
  trained with it; with a local weights file nothing is downloaded).
- `build_custom_clip`: an open_clip model-config JSON (checked by
  `teacher_checks.validate_vision_config`), its preprocess config attached.
- `load_weights`: a safetensors or torch (weights-only) state dict that must fit the model
  key for key (`state_dict_mismatch` names the first bad key).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from torch import Tensor, nn

from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.teacher_checks import validate_vision_config, weights_read_error

logger = logging.getLogger(__name__)

REMOTE_SCHEMAS = ("hf-hub:", "local-dir:")
"""open_clip model-name prefixes that name a hub or folder model, not a built-in name."""


def existing_file(path: str | None, key: str) -> Path | None:
    """Resolve a config path, raising DataNotFoundError naming the key if it is missing."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise DataNotFoundError(f"{key}: file not found: {resolved}")
    return resolved


def read_model_config(path: Path) -> dict[str, Any]:
    """The JSON object of a model-config file (`teacher.model_config`).

    Raises:
        ConfigError: The file is not valid JSON or does not hold an object.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"teacher.model_config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"teacher.model_config {path} must hold a JSON object")
    return data


def validate_model_name(name: str) -> None:
    """Raise ConfigError with close matches unless open_clip knows the model name."""
    if name.startswith(REMOTE_SCHEMAS):
        return
    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {close}? " if close else ""
    raise ConfigError(
        f"unknown open_clip model teacher.model_name={name!r}; {hint}"
        "see open_clip.list_models() for all names"
    )


def build_named_clip(
    name: str, pretrained: str | None, local: Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a named open_clip model (weights from a pretrained tag, or random).

    With `local` (a weights file loaded afterwards), the tag only says which weights the
    file holds: the model is built as the tag needs (QuickGELU for "openai") and nothing
    is downloaded.
    """
    validate_model_name(name)
    model_cfg = open_clip.get_model_config(name) or {}
    quick_gelu = False
    if pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(
                f"unknown pretrained tag teacher.pretrained={pretrained!r} for {name}; "
                f"valid: {tags} (or pretrained: null with a local teacher.weights file)"
            )
        quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu")
        if quick_gelu:
            logger.info("%s/%s was trained with QuickGELU; building it so", name, pretrained)
    else:
        logger.info("teacher %s without pretrained tag: random weights unless weights=", name)
    download = pretrained if local is None else None
    try:
        clip = open_clip.create_model(
            name, pretrained=download, force_quick_gelu=quick_gelu, precision="fp32"
        )
    except RuntimeError as e:
        if download is None:
            raise
        raise DataNotFoundError(
            f"could not get pretrained weights {name}/{pretrained} ({e}); run once with "
            f"network access, or download the file and set teacher.weights (keeping "
            f"teacher.pretrained: {pretrained})"
        ) from e
    model_cfg = {**model_cfg, "quick_gelu": quick_gelu or model_cfg.get("quick_gelu", False)}
    return clip, model_cfg


def custom_tokenizer(model_cfg: dict[str, Any]) -> Callable[..., Tensor]:
    """The tokenizer of a custom open_clip config: its HF tokenizer, else open_clip's BPE."""
    text_cfg = model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(
            text_cfg["hf_tokenizer_name"],
            context_length=context_length,
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    return open_clip.SimpleTokenizer(context_length=context_length)


def build_custom_clip(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Build a CLIP from a model-config JSON, with its preprocess config attached."""
    data = read_model_config(path)
    model_cfg = dict(data.get("model_cfg", data))
    preprocess_cfg = model_cfg.pop("preprocess_cfg", None) or data.get("preprocess_cfg") or {}
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ConfigError(
            f"teacher.model_config {path} lacks {missing}; an open_clip model config needs "
            "embed_dim, vision_cfg and text_cfg (see tests/fixtures/tiny-vit.json)"
        )
    validate_vision_config(model_cfg, path)
    text_cfg = model_cfg["text_cfg"]
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        clip = model_class(**model_cfg)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"teacher.model_config {path} does not build: {e}") from e
    pp = merge_preprocess_dict(PreprocessCfg(), preprocess_cfg)
    pp["size"] = getattr(clip.visual, "image_size", pp["size"])
    open_clip.set_model_preprocess_cfg(clip, pp)
    return clip, {**model_cfg, "text_cfg": text_cfg}


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a torch file (weights_only), unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that weights_only refuses
        raise weights_read_error("teacher.weights", path, e) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"teacher.weights {path} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def state_dict_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str | None:
    """Describe the first key where `found` does not fit `expected`, or None if it fits.

    Args:
        expected: The model's state dict.
        found: The loaded state dict.

    Returns:
        e.g. "first bad key 'visual.proj': shape [8, 16] in file, [32, 16] in model
        (0 missing, 0 unexpected, 1 shape mismatches)", or None.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    bad_shape = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    counts = (
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(bad_shape)} shape mismatches)"
    )
    first_expected = next((k for k in expected if k in missing or k in bad_shape), None)
    if first_expected is not None and first_expected in found:
        got, want = list(found[first_expected].shape), list(expected[first_expected].shape)
        return f"first bad key {first_expected!r}: shape {got} in file, {want} in model {counts}"
    if first_expected is not None:
        return f"first bad key {first_expected!r}: missing from file {counts}"
    if unexpected:
        return f"first bad key {unexpected[0]!r}: not in model {counts}"
    return None


def load_weights(clip: nn.Module, path: Path) -> None:
    """Load a whole-model state dict, raising CheckpointMismatchError on the first bad key."""
    state = read_state_dict(path)
    problem = state_dict_mismatch(clip.state_dict(), state)
    if problem is not None:
        raise CheckpointMismatchError(f"teacher.weights {path} does not fit the model: {problem}")
    clip.load_state_dict(state, strict=True)
    logger.info("loaded teacher weights from %s", path)
