"""Which adapter runs which model, and the teacher families a config may name.

A teacher config names a family (`teacher.family`): "open_clip" models are built by
open_clip (a named or custom CLIP config) and run by the adapter matching their vision
tower; "timm" models are built by `timm.create_model` and run as timm ViTs.
"""

from __future__ import annotations

import difflib

from torch import nn

from clt_lightning.backbones.base import Backbone
from clt_lightning.backbones.open_clip_timm import OpenClipTimm
from clt_lightning.backbones.open_clip_vit import OpenClipViT
from clt_lightning.backbones.timm_vit import TimmViT
from clt_lightning.errors import ConfigError

ADAPTERS: dict[str, dict[str, type[Backbone]]] = {
    "open_clip": {"open_clip_vit": OpenClipViT, "open_clip_timm": OpenClipTimm},
    "timm": {"timm_vit": TimmViT},
}
"""family -> adapter name -> adapter class (tried in order; the first that accepts wins)."""

DESCRIPTIONS: dict[str, str] = {
    "open_clip_vit": "open_clip VisionTransformer (OpenAI/LAION CLIP): cls + patches",
    "open_clip_timm": "open_clip with a timm trunk (SigLIP, SigLIP2): patches only",
    "timm_vit": "timm VisionTransformer (ViT, DeiT, DINOv2 with/without registers)",
}


def list_backbones() -> dict[str, str]:
    """Adapter name -> what it runs, for every supported backbone."""
    return dict(DESCRIPTIONS)


def check_family(family: str) -> str:
    """Return `family` if known, else raise ConfigError listing close matches."""
    if family in ADAPTERS:
        return family
    close = difflib.get_close_matches(family, list(ADAPTERS), n=3, cutoff=0.4)
    hint = f"did you mean {close}? " if close else ""
    raise ConfigError(f"unknown teacher.family={family!r}; {hint}valid: {sorted(ADAPTERS)}")


def wrap(family: str, model: nn.Module) -> Backbone:
    """The adapter of `family` that runs `model`.

    Raises:
        ConfigError: No adapter of the family accepts the model (names its tower type).
    """
    for adapter in ADAPTERS[check_family(family)].values():
        if adapter.accepts(model):
            return adapter(model)
    tower = type(getattr(model, "visual", model)).__name__
    raise ConfigError(
        f"teacher vision tower is {tower}; {family} supports {list(ADAPTERS[family])} "
        "(not ModifiedResNet, ConvNeXt or other towers)"
    )
