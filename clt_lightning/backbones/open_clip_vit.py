"""open_clip's own `VisionTransformer` (OpenAI / LAION CLIP): [CLS] + patches.

Block maths, calling open_clip's submodules: `h = h + ls_1(attn(ln_1(h)))`,
`x = ln_2(h)`, `y = mlp(x)`, `h = h + ls_2(y)`; the head is ln_post, tok/avg pool and proj
in open_clip's order. Patch dropout is never applied. Attentional pooling and custom
blocks are refused at construction.
"""

from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from clt_lightning.backbones.base import Backbone, check_block_types, check_square
from clt_lightning.errors import ConfigError
from clt_lightning.tokens import TokenLayout


class OpenClipViT(Backbone):
    """Adapter for an open_clip CLIP whose `visual` is a `VisionTransformer`.

    Args:
        model: The whole open_clip CLIP (its text tower serves zero-shot heads).

    Raises:
        ConfigError: Attentional pooling, a pool type other than tok/avg, a non-square
            input, or blocks other than `ResidualAttentionBlock`.
    """

    family = "open_clip"
    has_text_tower = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        visual = model.visual
        if visual.attn_pool is not None:
            raise ConfigError("teacher vision tower uses attentional pooling; only tok/avg pooling")
        if visual.pool_type not in ("tok", "avg"):
            raise ConfigError(f"teacher pool_type {visual.pool_type!r} unsupported; use tok or avg")
        self._size = check_square(visual.image_size, "teacher")
        check_block_types(visual.transformer.resblocks, (ResidualAttentionBlock,), "open_clip")
        for i, block in enumerate(visual.transformer.resblocks):
            if hasattr(block, "ln_1_kv"):
                raise ConfigError(f"teacher block {i} is a cross-attention block; unsupported")

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        """Whether `model` is an open_clip model with a standard ViT tower."""
        return type(getattr(model, "visual", None)) is VisionTransformer

    @property
    def visual(self) -> VisionTransformer:
        """open_clip's vision tower."""
        return self.model.visual

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def token_layout(self) -> TokenLayout:
        grid = self.visual.grid_size
        return TokenLayout(n_cls=1, n_registers=0, n_patches=grid[0] * grid[1])

    @property
    def image_size(self) -> int:
        return self._size

    def embed(self, images: Tensor) -> Tensor:
        visual = self.visual
        x = visual.conv1(images)  # [N, d, g, g]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, g*g, d]
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def attend(self, layer: int, h: Tensor) -> Tensor:
        block = self.blocks[layer]
        q = block.ln_1(h)
        if block.attn.batch_first:
            a = block.attention(q_x=q)
        else:
            a = block.attention(q_x=q.transpose(0, 1)).transpose(0, 1)
        return h + block.ls_1(a)

    def norm2(self, layer: int) -> nn.Module:
        return self.blocks[layer].ln_2

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp

    def add_mlp(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        return h + self.blocks[layer].ls_2(y)

    def head(self, h: Tensor) -> Tensor:
        visual = self.visual
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(_pool(h, visual.pool_type))
        else:
            pooled = _pool(visual.ln_post(h), visual.pool_type)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled

    def reference_forward(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)


def _pool(h: Tensor, pool_type: str) -> Tensor:
    """open_clip's global pool: [CLS] token ("tok") or mean of patch tokens ("avg")."""
    if pool_type == "tok":
        return h[:, 0]
    return h[:, 1:].mean(dim=1)
