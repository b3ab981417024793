"""Streaming per-latent statistics: firing frequencies, mean activation, log10 histogram.

For every (layer s, latent i), over the tokens of the pass:

    fired_cls[s, i]      = #[CLS] tokens with z != 0
    fired_patches[s, i]  = #patch tokens with z != 0
    fired_images[s, i]   = #images with z != 0 at some token
    activation_sum[s, i] = sum of z over all tokens (float64)
    histogram[s, i, b]   = #tokens with z != 0 whose log10 |z| falls in bin b

Token frequency = (fired_cls + fired_patches) / n_tokens, image frequency = fired_images /
n_images, mean activation when active = activation_sum / (fired_cls + fired_patches).

The histogram has `n_bins` equal bins on [lo, hi) of log10 |z| (default 60 bins on
[-4, 2), i.e. activations 1e-4 .. 1e2 in the CLT's scaled space); values outside the range
are counted in the first or last bin, so every firing is counted once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_BINS = 60
DEFAULT_RANGE = (-4.0, 2.0)


def histogram_edges(
    n_bins: int = DEFAULT_BINS, lo: float = DEFAULT_RANGE[0], hi: float = DEFAULT_RANGE[1]
) -> Tensor:
    """[n_bins + 1] float64 bin edges of log10 |z|."""
    return torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64)


@dataclass
class Firings:
    """The non-zero entries of one layer's activations z [n, T, F] (one scan of z).

    Both `LatentStats.update` and `TopNStore.update` work from these, so the pass scans
    each layer's dense activations once and then pays for the firings only.

    Attributes:
        image: [P] int64 image index within the batch (0..n-1).
        token: [P] int64 token position (0..T-1).
        latent: [P] int64 latent index (0..F-1).
        value: [P] activation z (non-zero), in z's dtype.
    """

    image: Tensor
    token: Tensor
    latent: Tensor
    value: Tensor

    @classmethod
    def of(cls, z: Tensor) -> Firings:
        """The firings of z [n, T, F], ordered by (image, token, latent)."""
        n_tokens, n_latents = z.shape[1], z.shape[2]
        flat = z.reshape(-1, n_latents)
        row, latent = flat.nonzero(as_tuple=True)  # row = image * T + token
        return cls(row // n_tokens, row % n_tokens, latent, flat[row, latent])

    def take(self, index: Tensor) -> Firings:
        """The firings at `index` ([P'] int positions into these P firings)."""
        return Firings(self.image[index], self.token[index], self.latent[index], self.value[index])


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op CPU thread when `device` is the CPU.

    The per-batch bookkeeping is ~100 small ops over the firings (~50k entries per layer
    and batch at the paper shape). Split over threads, each op waits at a barrier for every
    thread; on a loaded CPU one descheduled thread makes every op cost milliseconds, and
    the bookkeeping measured 20x slower with 2 threads than with 1 on the project's shared
    2-core machine (docs/benchmarks.md, `features`). The thread count is restored after.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LatentStats:
    """Accumulates the statistics above for every layer, batch by batch.

    Args:
        n_layers: L.
        n_latents: F.
        n_bins: Histogram bins.
        log10_range: (lo, hi) of the histogram in log10 |z|.
        device: Where the counters live (the CLT's device).
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        n_bins: int = DEFAULT_BINS,
        log10_range: tuple[float, float] = DEFAULT_RANGE,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_layers, self.n_latents, self.n_bins = n_layers, n_latents, n_bins
        self.lo, self.hi = float(log10_range[0]), float(log10_range[1])
        counts, on = (n_layers, n_latents), {"device": device}
        self.fired_cls = torch.zeros(counts, dtype=torch.int64, **on)
        self.fired_patches = torch.zeros(counts, dtype=torch.int64, **on)
        self.fired_images = torch.zeros(counts, dtype=torch.int64, **on)
        self.activation_sum = torch.zeros(counts, dtype=torch.float64, **on)
        self.histogram = torch.zeros((n_layers, n_latents, n_bins), dtype=torch.int64, **on)
        self.n_images = 0
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, layer: int, z: Tensor, firings: Firings | None = None) -> None:
        """Add one batch of one layer.

        Everything is counted from the non-zero entries alone (one scan of z), so the cost
        follows the number of firings, not n x T x F.

        Args:
            layer: Source layer s.
            z: Activations [n, T, F] of every token of n images.
            firings: `Firings.of(z)` when the caller already has it (saves the scan).
        """
        n_images, _, n_latents = z.shape
        fire = Firings.of(z) if firings is None else firings
        latent, values = fire.latent, fire.value
        count = functools.partial(torch.bincount, minlength=n_latents)
        is_cls = fire.token == 0
        self.fired_cls[layer] += count(latent[is_cls])
        self.fired_patches[layer] += count(latent[~is_cls])
        fired = torch.zeros(n_images, n_latents, dtype=torch.bool, device=z.device)
        fired[fire.image, latent] = True
        self.fired_images[layer] += fired.sum(0)
        self.activation_sum[layer] += count(latent, weights=values.double())
        bins = latent * self.n_bins + self.bin_of(values)
        ones = torch.ones_like(bins)
        self.histogram[layer].view(-1).index_add_(0, bins, ones)

    def bin_of(self, values: Tensor) -> Tensor:
        """Histogram bin of each non-zero activation (clamped into the first/last bin)."""
        log = torch.log10(values.abs().double())
        width = (self.hi - self.lo) / self.n_bins
        return ((log - self.lo) / width).floor().clamp(0, self.n_bins - 1).long()

    def count_images(self, n_images: int, tokens_per_image: int) -> None:
        """Record that a batch of n_images images (T tokens each) went through every layer."""
        self.n_images += n_images
        self.n_tokens += n_images * tokens_per_image

    def tensors(self) -> dict[str, Tensor]:
        """The accumulated tensors, named as in the store file."""
        return {
            "fired_cls": self.fired_cls.cpu(),
            "fired_patches": self.fired_patches.cpu(),
            "fired_images": self.fired_images.cpu(),
            "activation_sum": self.activation_sum.cpu(),
            "histogram": self.histogram.cpu(),
            "histogram_edges": histogram_edges(self.n_bins, self.lo, self.hi),
        }
