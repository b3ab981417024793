"""Tiny random-weight models of every backbone family, built offline.

timm architectures are the library's own (SigLIP's, DINOv2's, DeiT's), shrunk through
`timm.create_model` keyword arguments. `clt_test_tiny_siglip` is registered with timm's
public `register_model` so an open_clip model config can name it as its timm trunk
(open_clip passes no size arguments to timm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from timm.models import register_model

SHRINK = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}
"""Shape of every tiny timm ViT: 2 blocks, width 32, 32x32 images, 4x4 patches."""

TIMM_MODELS = {
    "dinov2": ("vit_small_patch14_dinov2", {}),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}),
    "deit": ("deit_tiny_patch16_224", {}),
    "vit": ("vit_tiny_patch16_224", {}),
}
"""Test name -> (timm architecture, extra kwargs)."""

_TIMM_FIELD_DROPS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained")


@register_model
def clt_test_tiny_siglip(pretrained: bool = False, **kwargs: Any) -> Any:
    """timm's SigLIP B/16 architecture (no [CLS], attention-pool head) at test size."""
    rest = {k: v for k, v in kwargs.items() if k not in _TIMM_FIELD_DROPS}
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **{**SHRINK, **rest})


SIGLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "init_logit_bias": -10,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": "clt_test_tiny_siglip",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "no_causal_mask": True,
        "pool_type": "last",
        "proj_bias": True,
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}
"""An open_clip model config of a tiny SigLIP (timm trunk; open_clip's BPE text tower)."""


def write_siglip_config(folder: Path) -> Path:
    """Write `SIGLIP_CONFIG` to folder/tiny-siglip.json and return its path."""
    path = folder / "tiny-siglip.json"
    path.write_text(json.dumps(SIGLIP_CONFIG))
    return path


def write_timm_kwargs(folder: Path, name: str) -> Path:
    """Write the create_model kwargs of a tiny timm model (`TIMM_MODELS[name]`)."""
    path = folder / f"tiny-{name}.json"
    path.write_text(json.dumps({**SHRINK, **TIMM_MODELS[name][1]}))
    return path
