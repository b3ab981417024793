"""Token groups of a vision transformer: `cls`, `registers`, `patches` (and `all`).

A ViT's token sequence is [CLS] (if the model has one), then register tokens (if any, e.g.
DINOv2 with registers), then the image patches in raster order. Every part of the project
that splits tokens by kind (training metrics, `data.token_filter`, cascaded replacement
modes, contribution scores, retrieval aggregation, reconstruction metrics) asks a
`TokenLayout` for the positions or the mask of a group, so a model without [CLS] (SigLIP)
or with registers is handled the same way everywhere.

Design decisions:

- The groups are named by what the model has; asking for a group the model lacks (`cls`
  on SigLIP, `registers` on CLIP) is a one-line `ConfigError` that lists the valid groups.
- `all` is always valid. Every group is a contiguous run of positions, so a group's
  positions are a `slice` (a view, no copy).
- Teachers and caches made before registers existed describe themselves by
  `tokens_per_image` only; `TokenLayout.from_identity` reads those as 1 [CLS] token and
  T - 1 patches, which is what they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clt_lightning.errors import ConfigError

TOKEN_GROUPS: tuple[str, ...] = ("all", "cls", "registers", "patches")
"""Every token group name, whatever the model has."""


@dataclass(frozen=True)
class TokenLayout:
    """How many tokens of each kind a vision transformer has, in sequence order.

    Args:
        n_cls: Number of [CLS] tokens at the start (0 or 1).
        n_registers: Number of register tokens after [CLS].
        n_patches: Number of patch tokens after them.
    """

    n_cls: int = 1
    n_registers: int = 0
    n_patches: int = 0

    @property
    def n_tokens(self) -> int:
        """T, every token of one image."""
        return self.n_cls + self.n_registers + self.n_patches

    @property
    def n_prefix(self) -> int:
        """Tokens before the first patch ([CLS] and registers)."""
        return self.n_cls + self.n_registers

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups this model has, in `TOKEN_GROUPS` order (always including "all")."""
        counts = {"all": self.n_tokens, "cls": self.n_cls, "registers": self.n_registers}
        counts["patches"] = self.n_patches
        return tuple(g for g in TOKEN_GROUPS if counts[g] > 0)

    def check(self, group: str, key: str = "token group") -> str:
        """Return `group` if the model has it, else raise a one-line ConfigError.

        Args:
            group: A group name.
            key: The setting that named it, for the message (e.g. "data.token_filter").

        Raises:
            ConfigError: Unknown name, or a group this model lacks (e.g. "cls" on SigLIP).
        """
        if group not in TOKEN_GROUPS:
            raise ConfigError(f"{key}={group!r} is not a token group; valid: {list(self.groups)}")
        if group not in self.groups:
            raise ConfigError(
                f"{key}={group!r}: this model has no {group} tokens ({self.describe()}); "
                f"valid: {list(self.groups)}"
            )
        return group

    def positions(self, group: str) -> slice:
        """Positions of a group's tokens within one image, as a slice of 0..T-1.

        Raises:
            ConfigError: As `check`.
        """
        self.check(group)
        bounds = {
            "all": (0, self.n_tokens),
            "cls": (0, self.n_cls),
            "registers": (self.n_cls, self.n_prefix),
            "patches": (self.n_prefix, self.n_tokens),
        }
        return slice(*bounds[group])

    def mask(self, group: str, token_index: Tensor) -> Tensor:
        """Boolean mask of the tokens in a group, from their positions in the image.

        Args:
            group: A group this model has.
            token_index: Any-shaped int tensor of token positions (0..T-1).

        Returns:
            Bool tensor shaped like `token_index`.
        """
        where = self.positions(group)
        return (token_index >= where.start) & (token_index < where.stop)

    def describe(self) -> str:
        """e.g. "1 cls, 4 registers, 256 patches"."""
        return f"{self.n_cls} cls, {self.n_registers} registers, {self.n_patches} patches"

    def to_dict(self) -> dict[str, int]:
        """JSON-able counts (stored in teacher identities and cache manifests)."""
        return {"n_cls": self.n_cls, "n_registers": self.n_registers, "n_patches": self.n_patches}

    @classmethod
    def from_identity(cls, identity: Mapping[str, Any]) -> TokenLayout:
        """The layout a teacher identity describes (older identities: [CLS] + patches;
        no identity at all: `CLIP_LAYOUT`).

        Args:
            identity: `Teacher.identity()` or a cache manifest's teacher entry.
        """
        stored = identity.get("token_layout")
        if isinstance(stored, Mapping):
            return cls(**{k: int(stored[k]) for k in ("n_cls", "n_registers", "n_patches")})
        if "tokens_per_image" not in identity:
            return CLIP_LAYOUT
        return cls(n_cls=1, n_registers=0, n_patches=int(identity["tokens_per_image"]) - 1)


CLIP_LAYOUT = TokenLayout(n_cls=1, n_registers=0, n_patches=2**62)
"""Layout assumed where T is unknown: [CLS] at position 0, every later position a patch."""


def layout_of(source: Any) -> TokenLayout:
    """The token layout of a teacher-like object, or of a bare token count T.

    Args:
        source: A `TokenLayout`, an object with `token_layout`, an object with
            `tokens_per_image` (taken as [CLS] + patches), or an int T (the same).
    """
    if isinstance(source, TokenLayout):
        return source
    layout = getattr(source, "token_layout", None)
    if isinstance(layout, TokenLayout):
        return layout
    n_tokens = source if isinstance(source, int) else int(source.tokens_per_image)
    return TokenLayout(n_cls=1, n_registers=0, n_patches=n_tokens - 1)


def group_arange(layout: TokenLayout, group: str) -> Tensor:
    """int64 [T_group] positions of a group (for indexing a [N, T, ...] tensor)."""
    where = layout.positions(group)
    return torch.arange(where.start, where.stop)
