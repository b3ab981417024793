"""Cached token loading: shard read + checksum-free parse + shuffle buffer + float32 batches.

What is timed: `clt_lightning.data.loaders.bench_datamodule`, i.e. iterating the cached
train stream of one rank (`CachedTokenStream` in a DataLoader with `num_workers` workers)
after one warm-up batch (which absorbs the initial fill of the shuffle buffer). Checksums
are off, as they are a one-off cost per shard read (sha256 runs at ~1-2 GB/s).

The cache is synthetic but real: written by `write_cache` with a stand-in teacher that
returns seeded random activations at the paper shape (ViT-B/32: L=12, d=768, T=50 tokens)
in fp16, so shard files, manifest and reader are exactly those of a real run. `mb_per_s`
counts the float32 x and y delivered to the training step (2 x L x d x 4 bytes per token).
The full run writes ~1.4 GB to a temporary folder; `quick` ~60 MB.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from clt_lightning.data.cache_writer import write_cache
from clt_lightning.data.loaders import bench_datamodule

PAPER_SHAPE = {"n_layers": 12, "d_model": 768, "tokens_per_image": 50}


class _SyntheticTeacher:
    """Stand-in for `Teacher` in `write_cache`: seeded random activations, no model."""

    def __init__(self, n_layers: int, d_model: int, tokens_per_image: int) -> None:
        self.n_layers, self.d_model, self.tokens_per_image = n_layers, d_model, tokens_per_image
        self.device = torch.device("cpu")
        self._generator = torch.Generator().manual_seed(0)

    def identity(self) -> dict[str, Any]:
        return {"model_name": "synthetic", "n_layers": self.n_layers, "d_model": self.d_model}

    def capture(self, images: Tensor) -> SimpleNamespace:
        shape = (images.shape[0], self.tokens_per_image, self.n_layers, self.d_model)
        x = torch.randn(shape, generator=self._generator)
        return SimpleNamespace(x=x, y=0.5 * x + 0.1)


class _BlankImages(torch.utils.data.Dataset):
    """n placeholder images (the synthetic teacher ignores pixels)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.zeros(3, 1, 1), 0

    def identity(self) -> dict[str, Any]:
        return {"name": "blank", "n_images": self.n}


def write_synthetic_cache(
    out_dir: Path, n_images: int, images_per_shard: int, shape: dict[str, int] = PAPER_SHAPE
) -> Path:
    """Write an fp16 cache of random activations at `shape` with the real writer."""
    return write_cache(
        _SyntheticTeacher(**shape),
        _BlankImages(n_images),
        out_dir,
        dtype="fp16",
        images_per_shard=images_per_shard,
        batch_size=32,
        progress=False,
    )


def run(quick: bool = False) -> list[dict]:
    """Tokens/s of the cached train stream at the paper shape.

    Args:
        quick: 32 images in 4 shards, batches of 256 (smoke run), instead of 768 images
            in 8 shards with batches of 4096.

    Returns:
        One row per worker count: name, tokens_per_s, mb_per_s, batches, batch_size,
        num_workers, shard_mb and shape.
    """
    n_images, per_shard, batch_size = (32, 8, 256) if quick else (768, 96, 4096)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache", n_images, per_shard)
        shard_mb = (cache / "shard_00000.safetensors").stat().st_size / 1e6
        for num_workers in (0, 2):
            result = bench_datamodule(cache, batch_size, n_batches=1000, num_workers=num_workers)
            rows.append(
                {
                    "name": f"data_cached_w{num_workers}",
                    **result,
                    "batch_size": batch_size,
                    "num_workers": num_workers,
                    "shard_mb": round(shard_mb, 1),
                    "shape": dict(PAPER_SHAPE),
                }
            )
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
