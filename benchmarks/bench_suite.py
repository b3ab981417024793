"""The evaluation suite's teacher passes: one shared clean pass against one pass per metric.

What is timed: the four metric families of `clt evaluate` (cascaded replacement for every
start and the three token modes, contribution scores, necessity/sufficiency ablations,
per-layer reconstruction metrics) on one set of images, two ways:

- ``four_passes``: each family runs the clean teacher itself, as `run_suite` did before:
  `cascade`, `contribution_scores` (`Teacher.capture`), `ablate`, and the reconstruction
  metrics over `Teacher.capture`.
- ``shared_pass``: `clean_pass.shared_clean_pass` runs the clean teacher once per batch and
  feeds the cascade, the contribution scores and the reconstruction metrics from it; the
  ablations (which need the finished scores) run the second pass.

  When the modes cover every token (the default), the contribution scores and the
  reconstruction metrics reuse the cascade's clean codes and reconstructions instead of
  encoding and decoding again.

``seconds`` is the process CPU time of the best run (one thread; ``wall_seconds`` is the
wall-clock time), ``ratio`` is seconds / four-pass seconds (lower is better; the target is
< 1), and ``matches_four_passes`` says whether the numbers equal the four-pass ones
(cascade and ablation accuracies exactly, contribution scores and reconstruction metrics
to rtol 1e-6: float rounding of per-layer against whole-token products).

Shapes: a 12-layer open_clip ViT of width 64 at 224 px with 32 px patches (50 tokens, like
ViT-B/32), a CrossLayerTranscoder with 16x expansion (F = 1024) and ReLU-TopK k = 32, 16
images in batches of 8; ``quick`` uses 4 layers, width 32, 17 tokens and 4 images. Zero-shot
heads are random (the same in both variants). Best of two runs (one when quick).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_cascade import FULL, N_CLASSES, QUICK, bench_clt, bench_teacher, best_of
from clt_lightning.evaluation import ablations, cascade, clean_pass, contributions, suite

BATCH = 8


def _four_passes(teacher, clt, batches, classifier, scale) -> dict:
    result = cascade.cascade(teacher, clt, batches, classifier, scale)
    scores = contributions.contribution_scores(teacher, clt, batches)
    ablation = ablations.ablate(teacher, clt, batches, classifier, scale, scores)
    recon = suite.reconstruction_metrics(teacher, clt, batches)
    return _numbers(result, scores, ablation, recon)


def _shared_pass(teacher, clt, batches, classifier, scale) -> dict:
    accuracy = cascade.CascadeAccumulator(teacher, clt, classifier, scale)
    contribution = contributions.ContributionAccumulator(clt.n_layers)
    recon = clean_pass.ReconstructionAccumulator(clt.n_layers, clt.d_model)
    clean_pass.shared_clean_pass(teacher, clt, batches, accuracy, contribution, recon)
    scores = contribution.compute()
    ablation = ablations.ablate(teacher, clt, batches, classifier, scale, scores)
    return _numbers(accuracy.compute(), scores, ablation, recon.payload())


def _numbers(result, scores, ablation, recon) -> dict:
    return {
        "cascade": result.to_dict(),
        "contributions": {g: s.tolist() for g, s in scores.scores.items()},
        "ablations": ablation.accuracy,
        "reconstruction": recon,
    }


def same_numbers(numbers: dict, reference: dict) -> bool:
    """Cascade and ablation accuracies equal; contribution scores and reconstruction metrics
    equal to float rounding (rtol 1e-6: the shared pass reuses per-layer codes)."""
    if json.dumps([numbers[k] for k in ("cascade", "ablations")]) != json.dumps(
        [reference[k] for k in ("cascade", "ablations")]
    ):
        return False
    for key in ("contributions", "reconstruction"):
        a, b = _flatten(numbers[key]), _flatten(reference[key])
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=True):
            return False
    return True


def _flatten(value) -> np.ndarray:
    if isinstance(value, dict):
        parts = [_flatten(value[k]) for k in sorted(value)]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(value, dtype=float).ravel()


def run(quick: bool = False) -> list[dict]:
    """Time the evaluation suite's metrics with four teacher passes and with the shared one.

    Args:
        quick: Tiny shapes and one repeat (a smoke run).

    Returns:
        Rows {name, seconds, wall_seconds, ratio, matches_four_passes, threads, n_images,
        shape}.
    """
    shape = QUICK if quick else FULL
    repeats = 1 if quick else 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            teacher = bench_teacher(shape, Path(folder))
        generator = torch.Generator().manual_seed(0)
        n, size = shape["n_images"], shape["image_size"]
        images = torch.randn(n, 3, size, size, generator=generator)
        labels = torch.randint(0, N_CLASSES, (n,), generator=generator)
        batches = [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, n, BATCH)]
        classifier = torch.nn.functional.normalize(
            torch.randn(32, N_CLASSES, generator=generator), dim=0
        )
        clt = bench_clt(teacher, shape["k"])
        args = (teacher, clt, batches, classifier, torch.tensor(4.6))
        timed = {
            "four_passes": best_of(lambda: _four_passes(*args), repeats),
            "shared_pass": best_of(lambda: _shared_pass(*args), repeats),
        }
    finally:
        torch.set_num_threads(threads)
    base_seconds, _, base_numbers = timed["four_passes"]
    return [
        {
            "name": f"suite_{name}",
            "seconds": seconds,
            "wall_seconds": wall,
            "ratio": seconds / base_seconds,
            "matches_four_passes": same_numbers(numbers, base_numbers),
            "threads": 1,
            "n_images": shape["n_images"],
            "shape": {
                **shape,
                "n_latents": 16 * shape["width"],
                "tokens": teacher.tokens_per_image,
            },
        }
        for name, (seconds, wall, numbers) in timed.items()
    ]


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))  # noqa: T201 - a script's output
