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
- Slots are kept unsorted during the pass (sorted once by `finish`) and start at key 0, so
  an image where the latent is silent never enters. Per batch and group the store works
  from the batch's firings (`stats.Firings`, one scan of z): a firing is a candidate only
  if it beats its latent's current N-th key, patch candidates are reduced to one per
  (image, latent), and only latents with candidates are ranked (one `topk` over
  [R, N + n]). An admitted image takes the slot of an evicted one, so nothing else moves,
  and its heatmap is written from the firings (a strided gather out of the dense z, whose
  token stride is F, was most of the update's time at the paper shape).
- Token 0 is [CLS] and tokens 1.. are patches; `collect.check_token_layout` refuses other
  layouts (SigLIP, registers) before a store is built.
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

from clt_lightning.features.stats import Firings

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
        n_tokens: T tokens per image ([CLS] is token 0, the patches after it).
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
        self.key = {(s, g): torch.zeros(shape, **on) for s in range(n_layers) for g in GROUPS}
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
    def update(
        self, layer: int, z: Tensor, image_ids: Tensor, firings: Firings | None = None
    ) -> None:
        """Merge one batch of one layer.

        Works from the firings (`Firings.of(z)`): an image whose activation is 0 is never
        a top image, and only the (latent, image) pairs that beat the latent's current N-th
        value are ranked and have their heatmap row copied out of z.

        Args:
            layer: Source layer s.
            z: Latent activations of every token [n, T, F] (float).
            image_ids: [n] int image ids of the batch.
            firings: `Firings.of(z)` when the caller already has it (saves a scan of z).
        """
        fire = Firings.of(z) if firings is None else firings
        image_ids = image_ids.to(device=z.device, dtype=torch.int32)
        key = fire.value.abs() if self.signed else fire.value
        is_cls = fire.token == 0
        for group, where in (("cls", is_cls), ("patches", ~is_cls)):
            threshold = self.key[(layer, group)].min(1).values  # [F] current N-th key
            keep = where & (key > threshold[fire.latent])  # entries that can enter
            pick = keep.nonzero().squeeze(1)
            if pick.numel() == 0:
                continue
            candidates = fire.take(pick)
            candidate_key = key[pick]
            if group == "patches":  # one entry per (image, latent): its best patch token
                best = _best_per_pair(candidates, candidate_key, z.shape)
                candidates = candidates.take(best)
                candidate_key = candidate_key[best]
            self._merge(layer, group, z.shape, image_ids, fire, candidates, candidate_key)

    def _merge(
        self,
        layer: int,
        group: str,
        shape: torch.Size,
        image_ids: Tensor,
        fire: Firings,
        candidates: Firings,
        candidate_key: Tensor,
    ) -> None:
        """Let a batch's candidate (image, latent) entries into the top-N slots they beat.

        Each candidate is one image's best entry for one latent, with a key above that
        latent's current N-th key. Only the latents with candidates are ranked (one `topk`
        over [R, N + n]); an admitted image is written into a slot freed by an evicted one,
        so stored entries never move and only the new heatmaps are written (from `fire`,
        every firing of the batch; z's shape is `shape`).
        """
        key, n_images = self.key[(layer, group)], shape[0]
        has = torch.zeros(key.shape[0], dtype=torch.bool, device=key.device)
        has[candidates.latent] = True
        rows = has.nonzero().squeeze(1)  # latents with candidates, ascending
        row_of = (has.cumsum(0) - 1)[candidates.latent]  # their position in rows
        batch_key = key.new_full((rows.numel(), n_images), -torch.inf)
        batch_key[row_of, candidates.image] = candidate_key.to(key.dtype)
        which = torch.full_like(batch_key, -1, dtype=torch.long)  # candidate per (row, image)
        which[row_of, candidates.image] = torch.arange(row_of.numel(), device=key.device)
        both = torch.cat([key[rows], batch_key], dim=1)  # [R, N + n]
        pick = both.topk(self.n_top, dim=1, sorted=False).indices
        chosen = torch.zeros_like(both, dtype=torch.bool).scatter_(1, pick, True)
        free = (~chosen[:, : self.n_top]).nonzero()  # (row, slot), row-major
        incoming = chosen[:, self.n_top :].nonzero()  # (row, image in batch), row-major
        # per row, as many slots are freed as images come in: pair them in order
        row, slot = rows[free[:, 0]], free[:, 1]
        src = which[incoming[:, 0], incoming[:, 1]]
        image = candidates.image[src]
        entries = self.entries[(layer, group)]
        key[row, slot] = candidate_key[src].to(key.dtype)
        entries.value[row, slot] = candidates.value[src].to(entries.value.dtype)
        entries.image[row, slot] = image_ids[image]
        entries.token[row, slot] = candidates.token[src].to(torch.int32)
        _write_heatmaps(entries.heatmap, row, slot, image, fire, shape)

    def finish(self) -> dict[tuple[int, str], TopEntries]:
        """The kept entries sorted best first (CPU); slots whose activation is 0 (or that
        were never filled) get image -1 and a zero heatmap."""
        out = {}
        for (layer, group), entries in self.entries.items():
            key, order = self.key[(layer, group)].sort(dim=1, descending=True, stable=True)
            value, image, token = (
                entries.value.gather(1, order),
                entries.image.gather(1, order),
                entries.token.gather(1, order),
            )
            # whole heatmap rows move (a gather along dim 1 with an expanded index was most
            # of a short pass's time); a slot is only ever written with a key > 0, so an
            # empty slot's heatmap is still the zeros it was allocated with
            rows = torch.arange(order.shape[0], device=order.device)[:, None]
            heatmap = entries.heatmap[rows, order]  # [F, N, T]
            empty = (key <= 0) | (image < 0)
            out[(layer, group)] = TopEntries(
                value.masked_fill(empty, 0.0).cpu(),
                image.masked_fill(empty, -1).cpu(),
                token.masked_fill(empty, 0).cpu(),
                heatmap.cpu(),
            )
        return out


def _write_heatmaps(
    heatmap: Tensor, row: Tensor, slot: Tensor, image: Tensor, fire: Firings, shape: torch.Size
) -> None:
    """Write the heatmaps of admitted entries (latent `row`, `slot`, batch `image`) from the
    batch's firings: zero the rows, then scatter the firings of those (image, latent) pairs.
    Nothing is gathered from the dense z, whose token stride is F."""
    n_images, n_tokens, n_latents = shape
    flat = heatmap.view(-1, n_tokens)  # [F * N, T]
    target = row * heatmap.shape[1] + slot
    flat[target] = 0
    where = target.new_full((n_images * n_latents,), -1)  # flat row per (image, latent)
    where[image * n_latents + row] = target
    at = where[fire.image * n_latents + fire.latent]
    hit = (at >= 0).nonzero().squeeze(1)
    flat[at[hit], fire.token[hit]] = fire.value[hit].to(heatmap.dtype)


def _best_per_pair(fire: Firings, key: Tensor, shape: torch.Size) -> Tensor:
    """Indices of the entries that are their (image, latent) pair's largest key, one per
    pair (the first token on ties, as `max` over tokens picks); shape is z's [n, T, F]."""
    n_images, n_tokens, n_latents = shape
    pair = fire.image * n_latents + fire.latent
    best = key.new_full((n_images * n_latents,), -torch.inf)
    best.scatter_reduce_(0, pair, key, "amax")
    at_best = key == best[pair]
    first = pair.new_full((n_images * n_latents,), n_tokens)  # past every token
    first.scatter_reduce_(0, pair[at_best], fire.token[at_best], "amin")
    return (at_best & (fire.token == first[pair])).nonzero().squeeze(1)


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
