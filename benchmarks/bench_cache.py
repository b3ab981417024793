"""Activation caching: `write_cache` against the teacher's bare forward pass.

What is timed, on the same images, batch size, thread count and teacher precision:

- ``teacher``: the bare forward, ``Teacher.encode_image`` over the batches of a
  ``DataLoader`` on the dataset (the loop a user runs to embed images; no hooks).
- ``write_cache``: ``clt_lightning.data.cache_writer.write_cache`` into a fresh folder: the same
  loader, ``Teacher.capture`` (the forward with x and y recorded at every layer), the fp16
  cast, statistics, sha256, the safetensors shards and the manifest (fsync'd), with its
  background writer thread.

``ratio_vs_teacher`` = write_cache images/s over teacher images/s (target >= 0.85): what
caching leaves of the teacher's throughput. Teacher: open_clip's real ViT-B-32
architecture (12 layers, width 768, 224 px, 50 tokens) with random weights (no download
here), fp32 and bf16 (the whole model cast, `TeacherConfig.precision`); the storage
dtype is fp16 in both (1.84 MB per image). Full run: 48 images (batches of 16, shards of
16 images, so three shards go through the writer), three interleaved repeats, medians;
quick: a 3-layer width-32 ViT at 32 px and 8 images. One torch thread (the project's
machines are shared 2-core CPUs where two compute threads spin-wait badly); the cache
writer's background thread comes on top, as it does for users. The synthetic images
are in memory, so image decoding is not part of either side.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clt_lightning.data.cache_writer import write_cache
from clt_lightning.teacher import Teacher, TeacherConfig

FULL = {"n_images": 48, "batch_size": 16, "images_per_shard": 16, "repeats": 3}
QUICK = {"n_images": 8, "batch_size": 4, "images_per_shard": 4, "repeats": 1}
TINY_VIT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-vit.json"


class _Images(Dataset):
    """Fixed random images in memory, label 0 (what `write_cache` reads)."""

    def __init__(self, n_images: int, image_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n_images, 3, image_size, image_size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], 0

    def identity(self) -> dict[str, Any]:
        return {"name": "bench-random", "n_images": len(self.images)}


def run(quick: bool = False) -> list[dict]:
    """Images/s of the bare teacher forward and of write_cache, fp32 and bf16 teachers.

    Args:
        quick: Tiny ViT and 8 images (a smoke run) instead of ViT-B-32 and 48 images.

    Returns:
        Per precision, rows ``cache_teacher_{precision}`` and ``cache_write_{precision}``:
        images_per_s, seconds (median), seconds_all, mb_per_s (bytes stored / s, write
        rows), ratio_vs_teacher, and the settings (model, n_images, batch_size,
        images_per_shard, dtype, threads).
    """
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for precision in ("fp32", "bf16"):
            config = (
                TeacherConfig(model_config=str(TINY_VIT), precision=precision)
                if quick
                else TeacherConfig(model_name="ViT-B-32", precision=precision)
            )
            rows += _measure(Teacher(config), settings, precision, quick)
        return rows
    finally:
        torch.set_num_threads(threads)


def _measure(teacher: Teacher, settings: dict, precision: str, quick: bool) -> list[dict]:
    dataset = _Images(settings["n_images"], teacher.image_size)
    batch_size = settings["batch_size"]
    loader = DataLoader(dataset, batch_size=batch_size)
    teacher.encode_image(next(iter(loader))[0])  # warm-up (first-call allocations)
    times: dict[str, list[float]] = {"teacher": [], "write": []}
    stored: list[int] = []
    variants: dict[str, Callable[[], None]] = {
        "teacher": lambda: [teacher.encode_image(images) for images, _ in loader],
        "write": lambda: stored.append(_write(teacher, dataset, settings)),
    }
    order = [("teacher", "write"), ("write", "teacher")]
    for repeat in range(settings["repeats"]):
        for name in order[repeat % 2]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    common = {
        "model": "tiny-vit (tests/fixtures)" if quick else "ViT-B-32 (random weights)",
        "teacher_precision": precision,
        "n_images": len(dataset),
        "batch_size": batch_size,
        "images_per_shard": settings["images_per_shard"],
        "dtype": "fp16 (stored)",
        "threads": torch.get_num_threads(),
        "tokens_per_image": teacher.tokens_per_image,
    }
    rows = {}
    for name in ("teacher", "write"):
        seconds = statistics.median(times[name])
        rows[name] = {
            "name": f"cache_{name}_{precision}",
            "images_per_s": len(dataset) / seconds,
            "seconds": seconds,
            "seconds_all": [round(t, 3) for t in times[name]],
            **common,
        }
    rows["write"]["mb_per_s"] = statistics.median(stored) / 1e6 / rows["write"]["seconds"]
    rows["teacher"]["ratio_vs_teacher"] = 1.0
    rows["write"]["ratio_vs_teacher"] = (
        rows["write"]["images_per_s"] / rows["teacher"]["images_per_s"]
    )
    return [rows["teacher"], rows["write"]]


def _write(teacher: Teacher, dataset: _Images, settings: dict) -> int:
    """write_cache into a fresh folder; returns the bytes of the shards written."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder:
        out = write_cache(
            teacher,
            dataset,
            Path(folder) / "cache",
            dtype="fp16",
            images_per_shard=settings["images_per_shard"],
            batch_size=settings["batch_size"],
            progress=False,
        )
        return sum(p.stat().st_size for p in out.glob("shard_*.safetensors"))


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
