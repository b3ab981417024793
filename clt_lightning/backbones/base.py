"""The interface every vision backbone adapter implements for the `Teacher`.

An adapter wraps a library's own model and exposes the pieces of its forward pass that the
`Teacher` runs block by block: the embedding (residual entering block 0), per block the
attention update, the MLP's input norm (LN2) and the MLP, the MLP's residual add, and the
head. It calls the library's own submodules, so the unmodified run reproduces the
library's forward bit for bit (the tests compare with each library's forward and hook its
`norm2`/`mlp` or `ln_2`/`mlp` modules).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from clt_lightning.errors import ConfigError
from clt_lightning.tokens import TokenLayout


class Backbone(nn.Module, ABC):
    """A vision transformer run block by block.

    Attributes:
        model: The library's whole model (an open_clip CLIP, or a timm model).
        n_layers: Number of blocks L.
        d_model: Residual width d.
        image_size: Input side length in pixels (square).
        token_layout: How many [CLS], register and patch tokens the residual holds.
        has_text_tower: Whether `model` has a text tower (zero-shot heads).
    """

    family: str = ""
    has_text_tower: bool = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The transformer blocks, in order."""

    @property
    @abstractmethod
    def token_layout(self) -> TokenLayout:
        """Token counts of one image's residual stream."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Input side length in pixels."""

    @property
    def n_layers(self) -> int:
        """Number of blocks L."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Residual width d (read from the first block's LN2)."""
        return int(self.norm2(0).normalized_shape[0])

    @property
    def reference(self) -> Tensor:
        """A parameter whose dtype and device are the tower's."""
        return next(self.blocks.parameters())

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] preprocessed images -> residual h0 [N, T, d] entering block 0."""

    @abstractmethod
    def attend(self, layer: int, h: Tensor) -> Tensor:
        """Residual after block `layer`'s attention update: h + ls1(attn(norm1(h)))."""

    @abstractmethod
    def norm2(self, layer: int) -> nn.Module:
        """Block `layer`'s MLP input norm (LN2), the library's own module."""

    @abstractmethod
    def mlp(self, layer: int) -> nn.Module:
        """Block `layer`'s MLP, the library's own module."""

    @abstractmethod
    def add_mlp(self, layer: int, h: Tensor, y: Tensor) -> Tensor:
        """Residual after adding the MLP output y: h + ls2(y)."""

    @abstractmethod
    def head(self, h: Tensor) -> Tensor:
        """Final residual [N, T, d] -> image features [N, E] (the library's pooled output)."""

    @abstractmethod
    def reference_forward(self, images: Tensor) -> Tensor:
        """The library's own forward to image features (for tests and checks)."""

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode (the teacher is frozen)."""
        return super().train(False)


def check_block_types(blocks: nn.Module, allowed: tuple[type, ...], what: str) -> None:
    """Raise ConfigError naming the first block whose exact type is not in `allowed`."""
    for i, block in enumerate(blocks):
        if type(block) not in allowed:
            names = [t.__name__ for t in allowed]
            raise ConfigError(
                f"teacher block {i} is {type(block).__name__}; the {what} adapter runs only "
                f"{names} blocks"
            )


def check_square(size: tuple[int, int] | list[int] | int, what: str) -> int:
    """The side of a square input size, or ConfigError."""
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ConfigError(f"{what} image size must be square, got {list(size)}")
    return int(size[0])
