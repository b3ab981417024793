"""Streaming statistics of the activation cache: `Moments` and `CacheStats`.

Owns the float64 (count, mean, M2) accumulator merged with Chan et al.'s parallel update
over fixed chunks of `STATS_CHUNK_TOKENS` stored tokens, and the per-layer statistics an
`ActivationCache` reports.

Design decision: statistics describe the values as stored (after the dtype cast): they are
then the statistics of the exact training data and anyone can recompute them from the
shards. They are accumulated in float64 with numpy (single-threaded, so the summation order
does not depend on the thread count) over fixed chunks of `STATS_CHUNK_TOKENS` stored tokens
of each shard, each chunk two-pass (mean, then squared deviations), merged in order with
Chan et al.'s parallel update. The running (count, mean, M2) is saved in the manifest as
JSON floats, which round-trip float64 exactly, so a resumed run ends with bit-identical
statistics. (The manifest rather than a side file: one atomic rename commits everything.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from clt_lightning.data.cache_format import STATS_CHUNK_TOKENS
from clt_lightning.errors import (
    CacheError,
)

# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Moments:
    """Streaming first and second moments of per-layer vectors, in float64.

    Attributes:
        n: Number of vectors (tokens) seen.
        mean: Per-dimension mean, [L, d].
        m2: Per-dimension sum of squared deviations from `mean`, [L, d].
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, n_layers: int, d_model: int) -> Moments:
        """Moments of no vectors at all."""
        zeros = np.zeros((n_layers, d_model), dtype=np.float64)
        return cls(0, zeros, zeros.copy())

    @classmethod
    def of(cls, values: Tensor) -> Moments:
        """Exact two-pass moments of a block of activations.

        Args:
            values: [..., L, d] activations in any float dtype; every leading index is one
                vector (e.g. [n_images, T, L, d]).
        """
        n_layers, d_model = values.shape[-2:]
        flat = values.detach().reshape(-1, n_layers * d_model).cpu()
        if flat.dtype != torch.float64:  # exact for fp16/bf16/fp32, and 3x faster than
            flat = flat.to(torch.float32)  # torch's direct half -> double conversion
        v = flat.numpy().astype(np.float64)  # always a copy: the shard is never modified
        if v.shape[0] == 0:
            return cls.empty(n_layers, d_model)
        with np.errstate(invalid="ignore", over="ignore"):  # fp16 overflow: reported later
            mean = v.mean(axis=0)
            v -= mean
            np.square(v, out=v)
            m2 = v.sum(axis=0)
        return cls(v.shape[0], mean.reshape(n_layers, d_model), m2.reshape(n_layers, d_model))

    @classmethod
    def of_chunks(cls, values: Tensor, chunk_tokens: int = STATS_CHUNK_TOKENS) -> Moments:
        """Moments of [..., L, d] over fixed chunks of `chunk_tokens` rows, merged in order.

        Small chunks keep the float64 working set in the CPU cache (several times faster
        than one big block) and make the result independent of how the data was batched.
        """
        rows = values.reshape(-1, *values.shape[-2:])
        total = cls.empty(*values.shape[-2:])
        for start in range(0, rows.shape[0], chunk_tokens):
            total = total.merge(cls.of(rows[start : start + chunk_tokens]))
        return total

    def merge(self, other: Moments) -> Moments:
        """Combine with the moments of another set of vectors (Chan et al. 1979)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def mean_sq_norm(self) -> np.ndarray:
        """E ||v||^2 per layer, [L] (0 while no vector was seen)."""
        if self.n == 0:
            return np.zeros(self.mean.shape[0])
        return (self.m2 / self.n + self.mean * self.mean).sum(axis=1)

    def var(self) -> np.ndarray:
        """E ||v - mean||^2 per layer = sum of per-dimension variances, [L] (0 when empty)."""
        if self.n == 0:
            return np.zeros(self.mean.shape[0])
        return self.m2.sum(axis=1) / self.n

    def to_json(self) -> dict[str, Any]:
        """JSON form stored in the manifest (floats round-trip float64 exactly)."""
        return {
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "mean_sq_norm": self.mean_sq_norm().tolist(),
            "var": self.var().tolist(),
        }

    @classmethod
    def from_json(cls, n: int, data: Mapping[str, Any], n_layers: int, d_model: int) -> Moments:
        """Inverse of `to_json`; checks the shapes."""
        mean = np.asarray(data["mean"], dtype=np.float64)
        m2 = np.asarray(data["m2"], dtype=np.float64)
        if mean.shape != (n_layers, d_model) or m2.shape != (n_layers, d_model):
            raise CacheError(
                f"manifest stats have shape {mean.shape}/{m2.shape}, expected {(n_layers, d_model)}"
            )
        return cls(int(n), mean, m2)


class CacheStats(NamedTuple):
    """Per-layer statistics of the cached activations over every stored token (float64).

    Attributes:
        x_mean: Mean MLP input, [L, d].
        y_mean: Mean MLP output, [L, d].
        x_mean_sq_norm: E ||x_l||^2, [L].
        y_mean_sq_norm: E ||y_l||^2, [L].
        y_var: E ||y_l - mean||^2 (sum of per-dimension variances), [L].
        x_var: E ||x_l - mean||^2, [L].
        n_tokens: Number of stored tokens the statistics cover.
    """

    x_mean: Tensor
    y_mean: Tensor
    x_mean_sq_norm: Tensor
    y_mean_sq_norm: Tensor
    y_var: Tensor
    x_var: Tensor
    n_tokens: int
