"""Token modes of the evaluations: which tokens a replacement, a contribution score or a
retrieval descriptor acts on.

A mode is a token group of `clt_lightning.tokens` ("cls", "registers", "patches", "all"),
asked of the teacher's `TokenLayout`, so a model without [CLS] (SigLIP) or with registers
is handled as everywhere else. Replacement also takes explicit token positions.
`GROUP_ORDER` is the order reports list the groups in (the specific groups, then "all");
`DEFAULT_MODES` the modes a cascade runs by default (the paper's [CLS], patches, all).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from clt_lightning.errors import ConfigError
from clt_lightning.tokens import TOKEN_GROUPS, TokenLayout, group_arange, layout_of

GROUP_ORDER: tuple[str, ...] = (*(g for g in TOKEN_GROUPS if g != "all"), "all")
"""Every token group of `TOKEN_GROUPS`, in report order: "cls", "registers", "patches",
then "all"."""

DEFAULT_MODES: tuple[str, ...] = tuple(g for g in GROUP_ORDER if g != "registers")
"""Default token modes of a cascade: [CLS] only, patch tokens only, every token (any group
of `GROUP_ORDER` the model has is a valid mode)."""

TokenSpec = str | Sequence[int] | Tensor
"""A token mode name or explicit token positions."""


def mode_positions(mode: TokenSpec, layout: TokenLayout | int) -> Tensor:
    """Token positions of a mode: a group's (`TokenLayout.positions`) or explicit ones.

    Args:
        mode: A token group ("cls", "registers", "patches", "all"), or explicit positions
            (may be empty).
        layout: The teacher's `TokenLayout` (or T, read as [CLS] + patches).

    Returns:
        int64 [T_M] sorted unique positions.

    Raises:
        ConfigError: Unknown mode name, a group the model lacks, or a position outside
            0..T-1.
    """
    layout = layout_of(layout)
    n_tokens = layout.n_tokens
    if isinstance(mode, str):
        return group_arange(layout, layout.check(mode, "token mode"))
    positions = torch.unique(torch.as_tensor(mode, dtype=torch.long).flatten())
    if positions.numel() and (positions.min() < 0 or positions.max() >= n_tokens):
        raise ConfigError(f"token positions must lie in 0..{n_tokens - 1}, got {positions}")
    return positions


def indexer(positions: Tensor) -> slice | Tensor:
    """A slice when the positions are a contiguous run (a view, no copy), else the tensor."""
    n = positions.numel()
    if n and int(positions[-1] - positions[0]) == n - 1:
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def relative_index(union: Tensor, positions: Tensor) -> slice | Tensor:
    """Indexer of `positions` inside the union's T_U axis."""
    return indexer(torch.searchsorted(union, positions))
