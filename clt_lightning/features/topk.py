"""Streaming top-N images per latent, with the patch heatmap of every kept image.

For every (layer, latent) the store keeps the N images with the largest activation of that
latent, separately for the [CLS] token ("cls": the value at token 0) and the patch tokens
("patches": the largest value over tokens 1..T-1, and which token it was). With each kept
image it keeps the latent's activation at every token of that image (the heatmap).

Design decisions:

- Two groups are stored and the "all tokens" ranking is derived from them (`merge_all`):
  an image in the top N by its maximum over all tokens is in the top N of the group where
  that maximum sits (fewer than N images can beat it there), so the union of the two
  lists holds the whole "all" list. Storing "all" separately would cost a third more.
- Ranking key: the activation, or its magnitude for signed sparsifiers (Abs-TopK keeps
  negative activations); the stored value keeps its sign.
- Each batch is merged with one `topk` over [F, N + n] per group. Heatmaps are only moved
  for latents that admitted a new image this batch (after the first batches, few do), so
  the bookkeeping costs about one scan of the batch's activations.
- Memory is fixed up front: per layer and group, values [F, N] float32, image ids and
  token positions [F, N] int32 and heatmaps [F, N, T] float16; `store_bytes` states it.
- Empty slots (fewer than N images seen, or a latent that never fired) have image id -1;
  entries whose activation is 0 are dropped on `finish`, since an image where the latent
  is silent is not a "top image".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GROUPS: tuple[str, ...] = ("cls", "patches")
"""Token groups ranked separately; "all" is derived by `merge_all`."""
VALUE_BYTES, INDEX_BYTES, HEAT_BYTES = 4, 4, 2


def store_bytes(n_layers: int, n_latents: int, n_top: int, n_tokens: int) -> int:
    """Bytes held by a `TopNStore` of this shape (both groups).

    Args:
        n_layers: L.
        n_latents: F.
        n_top: N images kept per latent and group.
        n_tokens: T tokens per image (heatmap length).

    Returns:
        L * F * N * len(GROUPS) * (4 + 4 + 4 + 4 + 2 T): ranking key, value, image id,
        token, heatmap.
    """
    per_entry = 2 * VALUE_BYTES + 2 * INDEX_BYTES + HEAT_BYTES * n_tokens
    return n_layers * n_latents * n_top * len(GROUPS) * per_entry


@dataclass
class TopEntries:
    """Top-N entries of one layer and group (latents along dim 0).

    Attributes:
        value: [F, N] float32 activation (signed), descending by ranking key.
        image: [F, N] int32 image id, -1 for an empty slot.
        token: [F, N] int32 token position of `value` (0 for the [CLS] group).
        heatmap: [F, N, T] float16 activation of the latent at every token of the image.
    """

    value: Tensor
    image: Tensor
    token: Tensor
    heatmap: Tensor


class TopNStore:
    """Keeps the top-N images per latent for each layer and token group.

    Args:
        n_layers: L.
        n_latents: F.
        n_top: N images per latent and group.
        n_tokens: T tokens per image ([CLS] is token 0).
        signed: Rank by |activation| (Abs-TopK) instead of the activation.
        device: Where the store lives (the CLT's device; `finish` returns CPU tensors).
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        n_top: int,
        n_tokens: int,
        signed: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_layers, self.n_latents, self.n_top, self.n_tokens = (
            n_layers,
            n_latents,
            n_top,
            n_tokens,
        )
        self.signed = signed
        shape, on = (n_latents, n_top), {"device": device}
        self.key = {
            (s, g): torch.full(shape, -torch.inf, **on) for s in range(n_layers) for g in GROUPS
        }
        self.entries = {
            (s, g): TopEntries(
                torch.zeros(shape, **on),
                torch.full(shape, -1, dtype=torch.int32, **on),
                torch.zeros(shape, dtype=torch.int32, **on),
                torch.zeros((*shape, n_tokens), dtype=torch.float16, **on),
            )
            for s in range(n_layers)
            for g in GROUPS
        }

    @torch.no_grad()
    def update(self, layer: int, z: Tensor, image_ids: Tensor) -> None:
        """Merge one batch of one layer.

        Args:
            layer: Source layer s.
            z: Latent activations of every token [n, T, F] (float, on the CPU).
            image_ids: [n] int image ids of the batch.
        """
        key = z.abs() if self.signed else z
        image_ids = image_ids.to(device=z.device, dtype=torch.int32)
        cls_key = key[:, 0]  # [n, F]
        patch_key, patch_token = key[:, 1:].max(dim=1)  # [n, F]
        cls_value = z[:, 0]
        patch_value = z[:, 1:].gather(1, patch_token[:, None]).squeeze(1)
        zero_token = torch.zeros_like(patch_token)
        self._merge(layer, "cls", z, image_ids, cls_key, cls_value, zero_token)
        self._merge(layer, "patches", z, image_ids, patch_key, patch_value, patch_token + 1)

    def _merge(
        self,
        layer: int,
        group: str,
        z: Tensor,
        image_ids: Tensor,
        new_key: Tensor,
        new_value: Tensor,
        new_token: Tensor,
    ) -> None:
        """Keep the N best of (stored, new) per latent; move heatmaps where a new one won."""
        n_images = new_key.shape[0]
        old = self.entries[(layer, group)]
        keys = torch.cat([self.key[(layer, group)], new_key.T], dim=1)  # [F, N + n]
        best_key, pick = keys.topk(self.n_top, dim=1)  # [F, N]
        self.key[(layer, group)] = best_key
        ids = image_ids[None].expand(self.n_latents, n_images)
        value = torch.cat([old.value, new_value.T], 1).gather(1, pick)
        image = torch.cat([old.image, ids], 1).gather(1, pick)
        token = torch.cat([old.token, new_token.to(torch.int32).T], 1).gather(1, pick)
        heatmap = old.heatmap
        changed = (pick >= self.n_top).any(dim=1).nonzero().squeeze(1)
        if changed.numel():
            rows = pick[changed]  # [F', N]
            new_heat = z[:, :, changed].permute(2, 0, 1).to(torch.float16)  # [F', n, T]
            both = torch.cat([heatmap[changed], new_heat], dim=1)
            index = rows[:, :, None].expand(-1, -1, self.n_tokens)
            heatmap[changed] = both.gather(1, index)
        self.entries[(layer, group)] = TopEntries(value, image, token, heatmap)

    def finish(self) -> dict[tuple[int, str], TopEntries]:
        """The kept entries; slots whose activation is 0 (or never filled) get image -1."""
        out = {}
        for (layer, group), entries in self.entries.items():
            empty = (self.key[(layer, group)] <= 0) | (entries.image < 0)
            out[(layer, group)] = TopEntries(
                entries.value.masked_fill(empty, 0.0).cpu(),
                entries.image.masked_fill(empty, -1).cpu(),
                entries.token.masked_fill(empty, 0).cpu(),
                entries.heatmap.masked_fill(empty[:, :, None], 0.0).cpu(),
            )
        return out


def merge_all(
    cls: tuple[Tensor, Tensor, Tensor], patches: tuple[Tensor, Tensor, Tensor], n_top: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The "all tokens" top-N of one latent from its [CLS] and patch lists.

    An image's all-token maximum is the larger of its two group values, so the image keeps
    the entry of the group where it is larger (ties: [CLS]), then the N best remain.

    Args:
        cls: (value [N], image [N], token [N]) of the [CLS] group (image -1 = empty).
        patches: The same for the patch group.
        n_top: N.

    Returns:
        (value, image, token, source) each [<= N], descending by |value|; source is 0 where
        the entry comes from the [CLS] list and 1 from the patch list.
    """
    value = torch.cat([cls[0], patches[0]]).float()
    image = torch.cat([cls[1], patches[1]])
    token = torch.cat([cls[2], patches[2]])
    source = torch.cat([torch.zeros_like(cls[1]), torch.ones_like(patches[1])])
    keep = image >= 0
    value, image, token, source = value[keep], image[keep], token[keep], source[keep]
    order = torch.argsort(value.abs(), descending=True, stable=True)
    value, image, token, source = value[order], image[order], token[order], source[order]
    first = torch.ones_like(keep[: len(image)])
    seen: set[int] = set()
    for i, img in enumerate(image.tolist()):
        first[i] = img not in seen
        seen.add(img)
    value, image, token, source = value[first], image[first], token[first], source[first]
    return value[:n_top], image[:n_top], token[:n_top], source[:n_top]
