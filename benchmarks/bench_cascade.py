"""Cascaded replacement: the shared-prefix cascade against recomputing from layer 0.

What is timed: zero-shot top-1/top-5 for every start s = 0..L-1 and the three token
modes (cls, patches, all), plus the teacher's baseline, on one batch of images:

- ``naive``: for every (mode, start), one run from layer 0 (`run_replaced`), encoding
  every layer's tokens on the way and decoding each replaced target from all its sources
  with ``decode_target``; plus one clean run for the baseline.
- ``shared_prefix``: `cascade(..., incremental=False)`: one clean run per batch records the
  residual entering every layer and the clean codes and reconstructions of the replaced
  tokens; each (mode, start) continues from the clean residual at layer s, reuses the
  clean z_0..z_s and y_hat_s, and decodes with ``decode_target``.
- ``shared_prefix_incremental``: `cascade(...)` with its default for an affine decoder:
  as above, but each new code is decoded once, as its difference from the clean code, into
  all later targets (l - s decoder blocks per target instead of l + 1), gathering only the
  decoder rows of the non-zero differences (`decode_rows`).

``seconds`` is the process CPU time of the best run (one thread, so it is the compute time
even when other processes share the cores; ``wall_seconds`` is the wall-clock time) and
``ratio`` is seconds / naive seconds (lower is better; the target is <= 0.6). Every row also
says whether its top-1/top-5 counts equal the naive ones (``matches_naive``).

Shapes: a 12-layer open_clip ViT of width 64 at 224 px with 32 px patches (50 tokens, like
ViT-B/32), a CrossLayerTranscoder with 16x expansion (F = 1024) and ReLU-TopK k = 32, 16
images; ``quick`` uses 4 layers, width 32, 17 tokens and 4 images. Timed with one thread
(the project's machines are shared 2-core CPUs where two threads spin-wait badly); best of
two runs (one when quick).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from clt_lightning.evaluation.cascade import cascade
from clt_lightning.evaluation.replacement import run_replaced
from clt_lightning.evaluation.token_modes import DEFAULT_MODES
from clt_lightning.evaluation.zeroshot import zero_shot_logits
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.teacher import Teacher, TeacherConfig

FULL = {"layers": 12, "width": 64, "image_size": 224, "patch_size": 32, "n_images": 16, "k": 32}
QUICK = {"layers": 4, "width": 32, "image_size": 32, "patch_size": 8, "n_images": 4, "k": 8}
N_CLASSES = 10


def bench_teacher(shape: dict, folder: Path) -> Teacher:
    config = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": shape["image_size"],
            "layers": shape["layers"],
            "width": shape["width"],
            "head_width": 16,
            "patch_size": shape["patch_size"],
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    path = folder / "bench-vit.json"
    path.write_text(json.dumps(config))
    return Teacher(TeacherConfig(model_config=str(path)))


def bench_clt(teacher: Teacher, k: int) -> CrossLayerTranscoder:
    n_layers, d_model = teacher.n_layers, teacher.d_model
    clt = CrossLayerTranscoder(n_layers, d_model, 16 * d_model, SparsifierConfig("relu_topk", k=k))
    with torch.no_grad():
        clt.b_dec.normal_(0, 0.1)
    return clt.eval()


@torch.no_grad()
def _naive(teacher, clt, images, labels, classifier, scale) -> dict:
    counts = {}
    k = min(5, classifier.shape[1])
    for mode in DEFAULT_MODES:
        for start in range(teacher.n_layers):
            emb = run_replaced(teacher, clt, images, start, None, mode)
            top = zero_shot_logits(emb, classifier, scale).topk(k, dim=-1).indices
            hits = top == labels[:, None]
            counts[(start, mode)] = (int(hits[:, 0].sum()), int(hits.any(dim=1).sum()))
    teacher.encode_image(images)  # the baseline
    return counts


def _counts(result, n_images: int) -> dict:
    out = {}
    for mode in result.modes:
        for i, start in enumerate(result.starts):
            top1 = round(result.accuracy[mode]["top1"][i] * n_images / 100)
            top5 = round(result.accuracy[mode]["top5"][i] * n_images / 100)
            out[(start, mode)] = (top1, top5)
    return out


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(best CPU seconds, best wall seconds, last value) over `repeats` calls."""
    best_cpu, best_wall, value = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall, value


def run(quick: bool = False) -> list[dict]:
    """Time the full cascade (every start x 3 modes) three ways.

    Args:
        quick: Tiny shapes and one repeat (a smoke run).

    Returns:
        Rows {name, seconds, wall_seconds, ratio, matches_naive, threads, n_images, shape}.
    """
    shape = QUICK if quick else FULL
    repeats = 1 if quick else 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            teacher = bench_teacher(shape, Path(folder))
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(
            shape["n_images"], 3, shape["image_size"], shape["image_size"], generator=generator
        )
        labels = torch.randint(0, N_CLASSES, (shape["n_images"],), generator=generator)
        classifier = torch.nn.functional.normalize(
            torch.randn(32, N_CLASSES, generator=generator), dim=0
        )
        scale = torch.tensor(4.6)
        clt = bench_clt(teacher, shape["k"])
        args = (teacher, clt, [(images, labels)], classifier, scale)
        variants = {
            "naive": lambda: _naive(teacher, clt, images, labels, classifier, scale),
            "shared_prefix": lambda: _counts(cascade(*args, incremental=False), len(labels)),
            "shared_prefix_incremental": lambda: _counts(
                cascade(*args, incremental=True), len(labels)
            ),
        }
        timed = {name: best_of(fn, repeats) for name, fn in variants.items()}
    finally:
        torch.set_num_threads(threads)
    naive_seconds, _, naive_counts = timed["naive"]
    return [
        {
            "name": f"cascade_{name}",
            "seconds": seconds,
            "wall_seconds": wall,
            "ratio": seconds / naive_seconds,
            "matches_naive": counts == naive_counts,
            "threads": 1,
            "n_images": shape["n_images"],
            "shape": {
                **shape,
                "n_latents": 16 * shape["width"],
                "tokens": teacher.tokens_per_image,
            },
        }
        for name, (seconds, wall, counts) in timed.items()
    ]


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))  # noqa: T201 - a script's output
