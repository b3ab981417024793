"""Normalisation of the activations: per-layer scales sqrt(d_model / E||a_l||^2).

`ActivationDataModule.normalisation()` gives the CLT one input and one output scale per
layer so that every layer has mean squared norm d in the scaled space over the tokens
trained (`data.token_filter`). This module computes them from a cache; the online path
estimates E||a_l||^2 from a sample of images in the datamodule.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from clt_lightning.data.cache_reader import ActivationCache
from clt_lightning.data.streams import filtered_tokens_per_image, shard_token_rows
from clt_lightning.errors import CacheError

log = logging.getLogger(__name__)


def scales_from_mean_sq_norm(mean_sq_norm: Tensor, d_model: int) -> Tensor:
    """Per-layer scale sqrt(d_model / E||a_l||^2) as float32 [L].

    Args:
        mean_sq_norm: E||a_l||^2 per layer, [L].
        d_model: d.

    Raises:
        CacheError: A mean squared norm that is not positive.
    """
    mean_sq_norm = torch.as_tensor(mean_sq_norm, dtype=torch.float64)
    if not bool(torch.all(mean_sq_norm > 0)):
        raise CacheError(f"mean squared norms must be positive, got {mean_sq_norm.tolist()}")
    return torch.sqrt(d_model / mean_sq_norm).to(torch.float32)


def trained_mean_sq_norms(cache: ActivationCache, token_filter: str) -> tuple[Tensor, Tensor]:
    """E||x_l||^2 and E||y_l||^2 per layer ([L] float64) over the tokens the run trains on.

    The manifest's statistics cover every stored token; they are used as they are when the
    filter keeps every stored token. Otherwise (e.g. token_filter "cls" on a cache of all
    tokens, where [CLS] norms differ from patch norms by up to ~7x per layer) one pass
    over the train shards sums the squared norms of the kept tokens in float64.

    Args:
        cache: The train cache.
        token_filter: "all", "cls" or "patches".
    """
    if filtered_tokens_per_image(cache.tokens_per_image, token_filter) == cache.tokens_per_image:
        stats = cache.stats()
        return stats.x_mean_sq_norm, stats.y_mean_sq_norm
    log.info("normalisation: one pass over %s for the %s tokens", cache.path, token_filter)
    sums = torch.zeros(2, cache.n_layers, dtype=torch.float64)
    count = 0
    for index in range(cache.n_shards):
        rows = shard_token_rows(cache.load_shard(index), token_filter)
        for slot, key in enumerate(("x", "y")):
            sums[slot] += rows[key].double().square().sum(dim=(0, 2))
        count += len(rows["token"])
    if count == 0:
        raise CacheError(f"the cache {cache.path} holds no {token_filter} tokens")
    return sums[0] / count, sums[1] / count
