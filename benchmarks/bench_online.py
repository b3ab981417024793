"""Online activations: tokens/s of the online source against the cached source.

The ViT-B/16 configs train from activations made on the fly (`data.source: online`):
images -> frozen teacher forward with capture hooks -> shuffle buffer -> token batches
(`OnlineTokenStream`, as `ActivationDataModule` builds it). This benchmark times that
source at the ViT-B-32 and ViT-B-16 shapes (open_clip architectures with random weights:
the cost does not depend on the weights; fp32 teacher, as in `configs/teachers/`), and
the cached source at the same shapes (`bench_data.write_synthetic_cache` + the cached
datamodule stream, fp16 shards, one worker process fewer: ``num_workers=0``).

What is timed: iterating the whole stream once (every token batch of ``N_IMAGES`` random
images, the initial fill of the shuffle buffer included), after one untimed teacher
forward (first-call allocations). Tokens/s = tokens delivered / seconds. The report
divides it by what the training step consumes (``train_step``'s sparse ReLU-TopK step,
tokens/s at 128 tokens, and ``batch_size``'s largest sparse batch): the online source
must not be what limits training. One thread, as in the other benchmarks: on the CPU
the teacher and the training step share the same cores, so the stream runs in the
training process between steps (Lightning fetches the next batch before the step).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from benchmarks.bench_data import write_synthetic_cache
from clt_lightning.data.loaders import bench_datamodule
from clt_lightning.data.online_stream import OnlineTokenStream
from clt_lightning.teacher import Teacher, TeacherConfig

TINY_VIT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-vit.json"
MODELS = ("ViT-B-32", "ViT-B-16")
FULL = {"n_images": 32, "image_batch": 16, "batch_size": 1024, "buffer_tokens": 8192}
QUICK = {"n_images": 8, "image_batch": 4, "batch_size": 64, "buffer_tokens": 512}
CACHED_TOKENS = 40_000
"""Tokens in the synthetic cache of each shape (about 800 B/32 or 200 B/16 images)."""


class _Images(Dataset):
    """Fixed random images in memory, label 0."""

    def __init__(self, n_images: int, image_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n_images, 3, image_size, image_size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], 0


def run(quick: bool = False) -> list[dict]:
    """Tokens/s of the online and the cached source at the ViT-B-32 and ViT-B-16 shapes.

    Args:
        quick: The tiny test ViT and 8 images (a smoke run).

    Returns:
        Per model, rows ``online_{model}`` and ``cached_{model}`` with tokens_per_s,
        seconds, tokens, tokens_per_image, n_layers, d_model, and the online row's
        ``ratio_vs_cached``; settings: n_images, image_batch, batch_size, threads.
    """
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for model in ("tiny-vit",) if quick else MODELS:
            rows += _measure(model, settings, quick)
        return rows
    finally:
        torch.set_num_threads(threads)


def _teacher(model: str) -> Teacher:
    if model == "tiny-vit":
        return Teacher(TeacherConfig(model_config=str(TINY_VIT), precision="fp32"))
    return Teacher(TeacherConfig(model_name=model, precision="fp32"))


def _measure(model: str, settings: dict, quick: bool) -> list[dict]:
    """The online row and the cached row of one model."""
    teacher = _teacher(model)
    images = _Images(settings["n_images"], teacher.image_size)
    teacher.capture(images.images[:2])  # warm-up
    stream = OnlineTokenStream(
        teacher.capture,
        images,
        tokens_per_image=teacher.tokens_per_image,
        device="cpu",
        batch_size=settings["batch_size"],
        image_batch=settings["image_batch"],
        buffer_tokens=settings["buffer_tokens"],
    )
    start = time.perf_counter()
    tokens = sum(len(batch["token"]) for batch in stream)
    seconds = time.perf_counter() - start
    shape = {
        "n_layers": teacher.n_layers,
        "d_model": teacher.d_model,
        "tokens_per_image": teacher.tokens_per_image,
    }
    common = {
        "model": model if quick else f"{model} (random weights)",
        **shape,
        "n_images": settings["n_images"],
        "image_batch": settings["image_batch"],
        "batch_size": settings["batch_size"],
        "threads": torch.get_num_threads(),
    }
    online = {
        "name": f"online_{model}",
        "source": "online",
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "tokens": tokens,
        **common,
    }
    del teacher, stream
    cached = _cached(shape, settings, quick)
    online["ratio_vs_cached"] = online["tokens_per_s"] / cached["tokens_per_s"]
    return [online, {"name": f"cached_{model}", "source": "cache", **cached, **common}]


def _cached(shape: dict[str, int], settings: dict, quick: bool) -> dict:
    """Tokens/s of the cached train stream over a synthetic cache of the same shape."""
    n_images = max(8, (2_000 if quick else CACHED_TOKENS) // shape["tokens_per_image"])
    per_shard = max(1, n_images // 8)
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache", n_images, per_shard, shape)
        result = bench_datamodule(cache, settings["batch_size"], n_batches=1000, num_workers=0)
    return {"tokens_per_s": result["tokens_per_s"], "batches": result["batches"]}


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
