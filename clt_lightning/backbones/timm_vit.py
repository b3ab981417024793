"""timm `VisionTransformer`s (plain ViT, DeiT, DINOv2 with or without registers).

Block maths, calling timm's submodules: `h = h + drop_path1(ls1(attn(norm1(h))))`,
`x = norm2(h)`, `y = mlp(x)`, `h = h + drop_path2(ls2(y))` (drop paths are identities in
eval mode). The embedding re-states timm's position-embedding step from the model's public
attributes (cls_token, reg_token, pos_embed, no_embed_class) so the residual entering
block 0 can be returned; the head is timm's own `norm` then `forward_head`.

Design decisions:

- A model given by timm name is built offline with `timm.create_model(name,
  pretrained=False, **kwargs)`; weights come from a local file (see `teacher.py`). timm's
  classifier is kept (so a file with `head.weight` loads), and the teacher's features are
  the pre-logits output (the pooled, normed features a linear probe reads).
- Only timm's `Block` is run; models with dynamic image size or other block types are
  refused at construction.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from clt_lightning.backbones.base import Backbone, check_block_types, check_square
from clt_lightning.errors import ConfigError
from clt_lightning.tokens import TokenLayout


class TimmTower(Backbone):
    """Adapter for a timm `VisionTransformer` (`trunk`) inside a larger `model`.

    Args:
        model: The whole model the teacher holds (the trunk itself for timm models).
        trunk: The timm `VisionTransformer` whose blocks are run.
        pre_logits: Features are timm's pre-logits output (True), or the output of the
            trunk's classifier head (False; open_clip uses it as the projection).

    Raises:
        ConfigError: Dynamic image size, non-square input, or blocks other than `Block`.
    """

    family = "timm"

    def __init__(self, model: nn.Module, trunk: VisionTransformer, pre_logits: bool) -> None:
        super().__init__(model)
        if type(trunk) is not VisionTransformer:
            raise ConfigError(
                f"teacher trunk is {type(trunk).__name__}; only timm's VisionTransformer is "
                "supported"
            )
        if trunk.dynamic_img_size:
            raise ConfigError("teacher timm model uses dynamic_img_size; build it without")
        check_block_types(trunk.blocks, (Block,), "timm")
        self._trunk = [trunk]  # not a submodule twice: `model` already holds it
        self._size = check_square(tuple(trunk.patch_embed.img_size), "teacher")
        self.pre_logits = pre_logits

    @property
    def trunk(self) -> VisionTransformer:
        """The timm VisionTransformer."""
        return self._trunk[0]

    @property
    def blocks(self) -> nn.Sequential:
        return self.trunk.blocks

    @property
    def token_layout(self) -> TokenLayout:
        trunk = self.trunk
        n_cls = 0 if trunk.cls_token is None else 1
        n_registers = 0 if trunk.reg_token is None else int(trunk.reg_token.shape[1])
        return TokenLayout(n_cls, n_registers, int(trunk.patch_embed.num_patches))

    @property
    def image_size(self) -> int:
        return self._size

    def embed(self, images: Tensor) -> Tensor:
        trunk = self.trunk
        x = trunk.patch_embed(images)  # [N, g*g, d]
        tokens = (trunk.cls_token, trunk.reg_token)
        prefix = [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]
        if trunk.pos_embed is None:
            x = torch.cat([*prefix, x], dim=1)
        elif trunk.no_embed_class:
            x = torch.cat([*prefix, x + trunk.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + trunk.pos_embed
        x = trunk.pos_drop(x)
        x = trunk.patch_drop(x)
        return trunk.norm_pre(x)

    def attend(self, layer: int, h: Tensor) -> Tensor:
        block = self.blocks[layer]
        return h + block.drop_path1(block.ls1(block.attn(block.norm1(h))))

    def norm2(self, layer: int) -> nn.Module:
        return self.blocks[layer].norm2

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp

    def add_mlp(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        block = self.blocks[layer]
        return h + block.drop_path2(block.ls2(y))

    def head(self, h: Tensor) -> Tensor:
        return self.trunk.forward_head(self.trunk.norm(h), pre_logits=self.pre_logits)

    def reference_forward(self, images: Tensor) -> Tensor:
        features = self.trunk.forward_features(images)
        return self.trunk.forward_head(features, pre_logits=self.pre_logits)


class TimmViT(TimmTower):
    """A timm VisionTransformer used on its own (no text tower): features are pre-logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, model, pre_logits=True)

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        """Whether `model` is a timm VisionTransformer."""
        return isinstance(model, VisionTransformer)


def validate_timm_name(name: str) -> None:
    """Raise ConfigError with close matches unless timm knows the model name.

    A pretrained-tag suffix (e.g. "vit_base_patch14_dinov2.lvd142m") is allowed; the part
    before the dot must be a timm architecture.
    """
    known = timm.list_models()
    if name.split(".", 1)[0] in known:
        return
    close = difflib.get_close_matches(name.split(".", 1)[0], known, n=5, cutoff=0.6)
    hint = f"did you mean {close}? " if close else ""
    raise ConfigError(
        f"unknown timm model teacher.model_name={name!r}; {hint}see timm.list_models() for "
        "all names"
    )


def build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a timm model offline with random weights (`pretrained=False`).

    Args:
        name: timm model name, optionally with a pretrained tag suffix.
        kwargs: Extra `timm.create_model` keyword arguments (e.g. depth, embed_dim).

    Raises:
        ConfigError: Unknown name, or kwargs the architecture rejects.
    """
    validate_timm_name(name)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"timm model {name!r} with {kwargs} does not build: {e}") from e


def timm_preprocess(model: VisionTransformer) -> Any:
    """timm's eval transform for a model (PIL image -> [3, H, W] float32).

    The model's pretrained config gives mean, std, crop and interpolation; the input size is
    the built model's own (`img_size` may have been changed from the pretrained one).
    """
    size = tuple(model.patch_embed.img_size)
    config = timm.data.resolve_data_config({"input_size": (3, *size)}, model=model)
    return timm.data.create_transform(**config, is_training=False)
