"""`clt features`: the pass against its floor, the top-N store's memory, the site's build time.

What is timed:

- ``features_pass_steady``: `features.collect.collect` over 96 images without the
  per-latent contributions (``contribution_images=0``), i.e. what every image after the
  first `contribution_images` (64) of a real pass costs: teacher forward, CLT encode per
  layer, top-N store, counters. The baseline, ``teacher_plus_encode``, is the floor any
  such pass has: `Teacher.run_blocks` (recording every layer) plus `encode_layer` for every
  layer, over the same DataLoader of pre-made image tensors. ``ratio`` = pass / baseline
  over the same images (the baseline of the first m images is read off its run).
- Phases: while the top-16 store fills, most (latent, image) pairs with a non-zero
  activation enter it (their heatmaps are written); later only the few that beat a
  latent's 16th value do. ``features_pass_fill`` times the first 32 images alone (all
  fill) against ``teacher_plus_encode_fill``; ``features_pass_after_fill`` is the
  difference between the 96- and the 32-image runs (images 33-96), nearer the bulk of a
  pass of thousands of images. The target is read on the whole 96-image run, fill
  included (conservative).
- ``features_pass``: the first 16 images with the per-latent contributions on every one
  (as for the first `contribution_images` images of a default pass).
- One repeat (the floor and the passes interleaved): at the paper shape on the shared
  2-core machine the floor alone costs ~0.6 s per image, and the benchmark must fit its
  300 s budget.
- ``topk_store``: a `TopNStore` at the paper shape (12 layers x 12,288 latents x N = 16,
  two token groups, T = 50 tokens of ViT-B/32) allocated for real: the bytes its tensors
  hold, the process's RSS growth and `store_bytes`' formula; the B/16 size (T = 197) by
  the formula.
- ``site_build``: `features.site.write_site` for 12 x 1,024 latents (N = 16, T = 50,
  synthetic store tensors, 500 distinct 224 px images, 96 px thumbnails): seconds and MB.

Shapes: full = a randomly initialised open_clip ViT-B-32 teacher (12 layers, d = 768,
T = 50) and a CLT with the paper's F = 12,288 and ReLU-TopK k = 128, 96 images (32 of them
the fill phase) in batches of 8; quick = the tiny test teacher, F = 64, 16 images. fp32 on
the CPU, torch's default thread count (recorded as ``threads``).
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from clt_lightning.features import site
from clt_lightning.features.collect import FeaturesConfig, collect
from clt_lightning.features.topk import GROUPS, TopNStore, store_bytes
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.teacher import Teacher, TeacherConfig

ROOT = Path(__file__).resolve().parents[1]
FULL = {
    "model": "ViT-B-32",
    "n_latents": 12_288,
    "k": 128,
    "n_images": 96,
    "n_fill": 32,
    "n_contrib": 16,
    "batch": 8,
    "repeats": 1,
}
QUICK = {
    "model": "tiny",
    "n_latents": 64,
    "k": 8,
    "n_images": 16,
    "n_fill": 8,
    "n_contrib": 4,
    "batch": 4,
    "repeats": 1,
}
PAPER = {"n_layers": 12, "n_latents": 12_288, "n_top": 16, "n_tokens": 50}


class Images(TensorDataset):
    """Pre-made image tensors with labels and an identity (what `collect` reads)."""

    def identity(self) -> dict[str, Any]:
        return {"name": "bench", "n_images": len(self)}


def _teacher(shape: dict) -> Teacher:
    if shape["model"] == "tiny":
        return Teacher(
            TeacherConfig(model_config=str(ROOT / "tests" / "fixtures" / "tiny-vit.json"))
        )
    return Teacher(TeacherConfig(model_name=shape["model"]))


@torch.no_grad()
def _baseline(
    teacher: Teacher, clt: CrossLayerTranscoder, dataset: Images, batch: int, marks=()
) -> dict[int, float]:
    """Seconds for the teacher forward plus every layer's encode over the first m images of
    the dataset, for each m in `marks` (multiples of `batch`) and for all of it."""
    start, seen, split = time.perf_counter(), 0, {}
    for images, _ in DataLoader(dataset, batch_size=batch):
        out = teacher.run_blocks(teacher.embed(images), record=True)
        for layer in range(clt.n_layers):
            clt.encode_layer(layer, out.x[layer]).float()
        seen += images.shape[0]
        if seen in marks:
            split[seen] = time.perf_counter() - start
    split[seen] = time.perf_counter() - start
    return split


def _pass(
    teacher: Teacher, clt: CrossLayerTranscoder, dataset: Images, config: FeaturesConfig
) -> float:
    start = time.perf_counter()
    collect(teacher, clt, dataset, config, progress=False)
    return time.perf_counter() - start


def pass_rows(shape: dict) -> list[dict[str, Any]]:
    """The pass against its floor over all images, over the fill phase, and with the
    per-latent contributions; the floor of the first images is read off the floor's run."""
    teacher = _teacher(shape)
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        teacher.n_layers,
        teacher.d_model,
        shape["n_latents"],
        SparsifierConfig(name="relu_topk", k=shape["k"]),
    ).eval()
    size, counts = teacher.image_size, (shape["n_images"], shape["n_fill"], shape["n_contrib"])
    images = torch.randn(counts[0], 3, size, size)
    labels = torch.zeros(counts[0], dtype=torch.long)
    subset = {n: Images(images[:n], labels[:n]) for n in counts}
    settings = {"batch_size": shape["batch"], "site": False, "classifier_cache": None}
    steady = FeaturesConfig(contribution_images=0, **settings)
    passes = {  # name: (images, config)
        "features_pass_steady": (counts[0], steady),
        "features_pass_fill": (counts[1], steady),
        "features_pass": (counts[2], FeaturesConfig(**settings)),  # contributions on all
    }
    warm = Images(images[:2], labels[:2])
    _baseline(teacher, clt, warm, 2)  # warm-up: first calls, lazy imports
    _pass(teacher, clt, warm, FeaturesConfig(**settings))
    times: dict[str, list[float]] = {name: [] for name in passes}
    floors: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(shape["repeats"]):  # interleaved
        for n, seconds in _baseline(
            teacher, clt, subset[counts[0]], shape["batch"], counts
        ).items():
            floors[n].append(seconds)
        for name, (n, config) in passes.items():
            times[name].append(_pass(teacher, clt, subset[n], config))
    floor = {n: statistics.median(values) for n, values in floors.items()}
    common = {
        "shape": f"L={teacher.n_layers}, d={teacher.d_model}, F={shape['n_latents']}, "
        f"T={teacher.tokens_per_image}",
        "batch_size": shape["batch"],
        "threads": torch.get_num_threads(),
    }

    def row(name: str, n: int, seconds: float, base: float, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "seconds": seconds,
            "n_images": n,
            "images_per_s": n / seconds if seconds > 0 else float("nan"),
            "ratio": seconds / base if base > 0 else float("nan"),
            **extra,
            **common,
        }

    rows = [row("teacher_plus_encode", counts[0], floor[counts[0]], floor[counts[0]])]
    rows.append(row("teacher_plus_encode_fill", counts[1], floor[counts[1]], floor[counts[1]]))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, (n, _) in passes.items():
        rows.append(row(name, n, median[name], floor[n], seconds_all=times[name]))
    after = median["features_pass_steady"] - median["features_pass_fill"]  # images after fill
    base_after = floor[counts[0]] - floor[counts[1]]
    rows.append(row("features_pass_after_fill", counts[0] - counts[1], after, base_after))
    return rows


def store_row() -> dict[str, Any]:
    """A TopNStore at the paper shape, allocated for real."""
    before = _rss()
    store = TopNStore(**PAPER)
    held = sum(
        t.numel() * t.element_size()
        for entries in store.entries.values()
        for t in (entries.value, entries.image, entries.token, entries.heatmap)
    ) + sum(t.numel() * t.element_size() for t in store.key.values())  # ranking keys
    grown = _rss() - before
    entries = PAPER["n_layers"] * PAPER["n_latents"] * PAPER["n_top"] * len(GROUPS)
    return {
        "name": "topk_store",
        "entries": entries,
        "bytes_held": held,
        "bytes_formula": store_bytes(**PAPER),
        "rss_growth_bytes": grown,
        "bytes_formula_b16": store_bytes(12, 12_288, 16, 197),
        "shape": "L=12, F=12,288, N=16, T=50",
    }


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc), else the peak."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class FakeImages:
    """500 distinct 224 px images (for thumbnails) with labels and class names."""

    class_names = [f"class {i}" for i in range(10)]

    def __init__(self, n: int) -> None:
        self.labels = np.arange(n) % 10

    def raw_image(self, i: int) -> Image.Image:
        rng = np.random.default_rng(i)
        return Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))


def site_row(quick: bool) -> dict[str, Any]:
    """write_site for 12 x 1,024 latents (quick: 3 x 64) from synthetic tensors."""
    n_layers, n_latents, n_top, n_tokens, n_images = (
        (3, 64, 4, 17, 50) if quick else (12, 1024, 16, 50, 500)
    )
    g = torch.Generator().manual_seed(0)
    shape = (n_layers, n_latents, n_top)
    tensors: dict[str, torch.Tensor] = {}
    for group in GROUPS:
        tensors[f"top_value_{group}"] = (
            torch.rand(shape, generator=g).sort(-1, descending=True).values
        )
        tensors[f"top_image_{group}"] = torch.randint(
            0, n_images, shape, generator=g, dtype=torch.int32
        )
        tensors[f"top_token_{group}"] = torch.randint(
            0, n_tokens, shape, generator=g, dtype=torch.int32
        )
        tensors[f"top_heatmap_{group}"] = torch.rand((*shape, n_tokens), generator=g).half()
    counts = torch.randint(0, 1000, (n_layers, n_latents), generator=g)
    tensors |= {"fired_cls": counts // 10, "fired_patches": counts, "fired_images": counts // 5}
    tensors["activation_sum"] = counts.double()
    tensors["histogram"] = torch.randint(0, 50, (n_layers, n_latents, 60), generator=g)
    norm = torch.rand((n_layers, n_latents, n_layers), generator=g)
    norm = norm * (torch.arange(n_layers)[None, None] >= torch.arange(n_layers)[:, None, None])
    share = norm / norm.sum(-1, keepdim=True)
    tensors |= {"write_norm": norm, "write_share": share, "contribution": share.double() / 10}
    tensors["direct_effect"] = torch.randn((n_layers, n_latents, 10), generator=g)
    manifest = {
        "n_layers": n_layers, "n_latents": n_latents, "n_top": n_top, "n_images": n_images,
        "n_tokens": n_images * n_tokens, "tokens_per_image": n_tokens, "grid_size": 7,
        "dataset": "bench", "split": "val", "sparsifier": "relu_topk", "created": "-",
        "checkpoint": None, "fingerprints": {"clt": "0" * 64, "dataset": "1" * 64},
        "class_names": FakeImages.class_names, "contribution_images": 256,
    }  # fmt: skip
    config = FeaturesConfig()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        site.write_site(Path(tmp), tensors, manifest, FakeImages(n_images), config, progress=False)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        thumbs = len(list((Path(tmp) / "thumbs").glob("*.jpg")))
        start = time.perf_counter()  # a rebuild reuses the thumbnails
        site.write_site(Path(tmp), tensors, manifest, FakeImages(n_images), config, progress=False)
        rebuild = time.perf_counter() - start
    return {
        "name": "site_build",
        "seconds": seconds,
        "rebuild_seconds": rebuild,
        "site_mb": size / 1e6,
        "thumbnails": thumbs,
        "shape": f"L={n_layers}, F={n_latents}, N={n_top}, T={n_tokens}",
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All rows (see the module docstring)."""
    store = store_row()  # first: its RSS growth is not hidden by memory freed by the others
    return [*pass_rows(QUICK if quick else FULL), store, site_row(quick)]
