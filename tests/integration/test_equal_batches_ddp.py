"""Issue 11.2 end to end: 2 DDP ranks (gloo, CPU), online source, one unreadable image.

8 train images, one of them not an image, `data.on_bad_image: skip`, batches of one
image's tokens: both ranks promise 4 batches; rank 1 used to yield 3 and the fit died in
gloo ("Connection closed by peer"; on NCCL it would hang). Now the rank replaces the
skipped image with one of its readable ones and both ranks train 4 steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.integration.tiny_run import DELETE, TOKENS, finish, spawn_clt, write_config


def image_folder(root: Path) -> Path:
    """root/train/{a,b}/ with 8 images (one corrupt file) and root/val/a/ with 2."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for i in range(n):
            folder = root / split / ("a" if i % 2 == 0 else "b" if split == "train" else "a")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i}.png")
    (root / "train" / "b" / "img_7.png").write_bytes(b"not a png")  # one rank loses an image
    return root


def test_two_ranks_with_a_skipped_image_train_the_same_steps(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    run, log = tmp_path / "run", tmp_path / "ddp.log"
    config = write_config(
        tmp_path / "ddp.yaml", tmp_path / "unused_cache", run,
        **{"data.dataset": {"name": "imagefolder", "root": str(root)}, "data.source": "online",
           "data.on_bad_image": "skip", "data.batch_size": TOKENS,
           "data.online_image_batch": 2, "data.online_buffer_tokens": 4 * TOKENS,
           "data.online_stats_images": 8, "data.cache_dtype": DELETE,
           "data.images_per_shard": DELETE, "data.cache_batch_size": DELETE,
           "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_epochs": 1},
    )  # fmt: skip
    child = spawn_clt(["fit", "--config", str(config)], log)
    assert finish(child, log, timeout=300) == 0, log.read_text()[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4  # 4 images per rank, one token batch each
    assert "twice this epoch" in log.read_text()  # the skipped image was replaced
