"""The reference paper's published numbers, transcribed exactly, for side-by-side tables.

Sources (both in `shared/paper/`, beside the repository):

- `supplementary.txt`: Tables 6-23 (top-1 accuracy under cascaded CLT replacement s->11),
  the frozen baselines quoted in their captions, and Table 5 (faithfulness, CIFAR-100,
  ViT-B/32; the sparsifier is not stated).
- `facts.md` (the poster and project page): necessity/sufficiency ablations (ViT-B/32),
  layer-averaged reconstruction (read off a plot, so only ~2 significant digits), and the
  [CLS] / patch contribution values of the poster's heatmaps.

Every number is kept exactly as printed (points of accuracy stay points, "10.4%" flip rate
stays 10.4 percent) so that `tests/unit/test_paper_numbers.py` can compare this module
with a fresh parse of the text. Keys use the project's names: datasets `cifar100`, `coco`,
`imagenet100`; backbones `b32`, `b16`; token modes `cls`, `patches`, `all`; sparsifiers
`jumprelu`, `relu_topk`, `abs_topk`.

Oddities of the published numbers, kept as printed:
- The 11->11 rows of the [CLS] and all-tokens tables are identical for every
  (dataset, backbone): replacing layer 11 acts on [CLS] alone as far as top-1 goes.
- The patches 11->11 rows equal the baseline everywhere except COCO ViT-B/16 (Table 16:
  43.50 for all three sparsifiers; the baseline in the caption is 43.56).
- The poster's patch "diagonal" has 11 values for 12 layers; which cells they are is not
  stated (the list is kept in order, as printed).
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS: tuple[str, ...] = ("cifar100", "coco", "imagenet100")
BACKBONES: tuple[str, ...] = ("b32", "b16")
SPARSIFIERS: tuple[str, ...] = ("jumprelu", "relu_topk", "abs_topk")
MODES: tuple[str, ...] = ("cls", "patches", "all")
N_LAYERS = 12

DATASET_NAMES: dict[str, str] = {
    "cifar100": "CIFAR-100",
    "coco": "COCO",
    "imagenet100": "ImageNet-100",
}
BACKBONE_NAMES: dict[str, str] = {"b32": "ViT-B/32", "b16": "ViT-B/16"}
MODE_NAMES: dict[str, str] = {"cls": "[CLS] tokens", "patches": "patch tokens", "all": "all tokens"}
SPARSIFIER_ABBREVIATIONS: dict[str, str] = {
    "jumprelu": "JR",
    "relu_topk": "RTK",
    "abs_topk": "ATK",
    "batch_topk": "BTK",
}

# Frozen CLIP zero-shot top-1 (%), from the captions of Tables 6-23.
BASELINE_TOP1: dict[tuple[str, str], float] = {
    ("cifar100", "b32"): 61.65,
    ("coco", "b32"): 43.12,
    ("imagenet100", "b32"): 80.42,
    ("cifar100", "b16"): 65.97,
    ("coco", "b16"): 43.56,
    ("imagenet100", "b16"): 84.34,
}


@dataclass(frozen=True)
class CascadeTable:
    """One of Tables 6-23: top-1 (%) after replacing layers s..11 by the CLT.

    Attributes:
        number: The table's number in the supplementary material.
        dataset: `cifar100`, `coco` or `imagenet100`.
        backbone: `b32` or `b16`.
        mode: Tokens replaced: `cls`, `patches` or `all`.
        rows: Row s (s = 0..11, "s->11") holds (JumpReLU, ReLU-TopK, Abs-TopK).
    """

    number: int
    dataset: str
    backbone: str
    mode: str
    rows: tuple[tuple[float, float, float], ...]

    def column(self, sparsifier: str) -> tuple[float, ...]:
        """Top-1 (%) for starts s = 0..11 of one sparsifier (`jumprelu`, `relu_topk`, `abs_topk`)."""
        index = SPARSIFIERS.index(sparsifier)
        return tuple(row[index] for row in self.rows)


CASCADE_TABLES: tuple[CascadeTable, ...] = (
    CascadeTable(
        6,
        "cifar100",
        "b32",
        "cls",
        (
            (61.33, 61.74, 61.43),  # 0→11
            (61.43, 61.76, 61.56),  # 1→11
            (61.39, 61.72, 61.61),  # 2→11
            (61.38, 61.69, 61.58),  # 3→11
            (61.20, 61.76, 61.66),  # 4→11
            (61.21, 61.59, 61.48),  # 5→11
            (61.43, 61.58, 61.39),  # 6→11
            (61.41, 61.86, 61.26),  # 7→11
            (61.62, 61.90, 61.23),  # 8→11
            (61.31, 61.85, 61.10),  # 9→11
            (61.06, 61.39, 61.16),  # 10→11
            (61.23, 61.31, 61.03),  # 11→11
        ),
    ),
    CascadeTable(
        7,
        "cifar100",
        "b32",
        "patches",
        (
            (49.63, 51.12, 48.68),  # 0→11
            (49.92, 51.61, 52.40),  # 1→11
            (51.95, 52.86, 53.46),  # 2→11
            (53.65, 54.20, 55.83),  # 3→11
            (56.59, 57.02, 58.86),  # 4→11
            (58.89, 59.52, 61.38),  # 5→11
            (60.39, 61.16, 63.06),  # 6→11
            (61.51, 61.69, 63.18),  # 7→11
            (61.83, 62.04, 63.53),  # 8→11
            (61.82, 61.73, 62.57),  # 9→11
            (61.49, 61.25, 61.56),  # 10→11
            (61.65, 61.65, 61.65),  # 11→11
        ),
    ),
    CascadeTable(
        8,
        "cifar100",
        "b32",
        "all",
        (
            (49.40, 51.12, 48.41),  # 0→11
            (49.90, 51.91, 51.97),  # 1→11
            (51.84, 53.51, 53.16),  # 2→11
            (54.10, 54.84, 55.69),  # 3→11
            (56.62, 57.32, 58.23),  # 4→11
            (59.21, 59.96, 61.19),  # 5→11
            (60.54, 61.60, 62.95),  # 6→11
            (61.54, 62.08, 62.85),  # 7→11
            (61.69, 62.32, 63.01),  # 8→11
            (61.63, 61.83, 62.07),  # 9→11
            (61.01, 61.20, 61.11),  # 10→11
            (61.23, 61.31, 61.03),  # 11→11
        ),
    ),
    CascadeTable(
        9,
        "cifar100",
        "b16",
        "cls",
        (
            (66.04, 65.92, 65.38),  # 0→11
            (66.05, 65.82, 65.62),  # 1→11
            (66.02, 65.78, 65.73),  # 2→11
            (66.10, 65.81, 65.39),  # 3→11
            (66.05, 65.87, 65.61),  # 4→11
            (66.15, 65.80, 65.65),  # 5→11
            (66.16, 66.08, 65.71),  # 6→11
            (66.15, 66.15, 65.86),  # 7→11
            (66.12, 65.98, 66.02),  # 8→11
            (66.12, 65.93, 66.01),  # 9→11
            (66.06, 65.90, 65.90),  # 10→11
            (65.87, 66.00, 65.65),  # 11→11
        ),
    ),
    CascadeTable(
        10,
        "cifar100",
        "b16",
        "patches",
        (
            (62.40, 58.57, 56.59),  # 0→11
            (62.58, 59.40, 60.68),  # 1→11
            (63.15, 60.07, 61.97),  # 2→11
            (63.54, 60.76, 63.31),  # 3→11
            (64.29, 62.32, 64.85),  # 4→11
            (65.24, 63.50, 66.11),  # 5→11
            (65.72, 64.76, 66.85),  # 6→11
            (66.05, 65.48, 67.24),  # 7→11
            (65.68, 65.79, 66.79),  # 8→11
            (65.65, 65.50, 66.06),  # 9→11
            (65.97, 65.82, 66.13),  # 10→11
            (65.97, 65.97, 65.97),  # 11→11
        ),
    ),
    CascadeTable(
        11,
        "cifar100",
        "b16",
        "all",
        (
            (62.45, 58.82, 56.72),  # 0→11
            (62.70, 59.23, 60.30),  # 1→11
            (62.95, 59.74, 61.54),  # 2→11
            (63.71, 60.75, 62.87),  # 3→11
            (64.14, 62.16, 64.57),  # 4→11
            (65.20, 63.60, 65.86),  # 5→11
            (66.08, 64.73, 66.31),  # 6→11
            (66.22, 65.56, 67.08),  # 7→11
            (65.72, 65.84, 66.65),  # 8→11
            (65.77, 65.51, 66.05),  # 9→11
            (65.91, 65.98, 65.89),  # 10→11
            (65.87, 66.00, 65.65),  # 11→11
        ),
    ),
    CascadeTable(
        12,
        "coco",
        "b32",
        "cls",
        (
            (43.12, 43.36, 43.00),  # 0→11
            (43.14, 43.32, 43.08),  # 1→11
            (43.10, 43.26, 42.96),  # 2→11
            (43.08, 43.22, 43.12),  # 3→11
            (43.18, 43.22, 43.06),  # 4→11
            (43.22, 43.30, 43.06),  # 5→11
            (43.30, 43.24, 43.22),  # 6→11
            (43.26, 43.24, 43.20),  # 7→11
            (43.32, 43.40, 43.26),  # 8→11
            (43.16, 43.34, 42.92),  # 9→11
            (43.04, 43.10, 42.90),  # 10→11
            (43.24, 43.26, 43.00),  # 11→11
        ),
    ),
    CascadeTable(
        13,
        "coco",
        "b32",
        "patches",
        (
            (39.04, 38.94, 39.68),  # 0→11
            (39.38, 39.44, 40.02),  # 1→11
            (39.54, 40.24, 40.42),  # 2→11
            (40.58, 40.92, 41.48),  # 3→11
            (41.38, 41.88, 42.10),  # 4→11
            (42.06, 42.28, 42.28),  # 5→11
            (42.48, 42.58, 42.60),  # 6→11
            (42.98, 43.14, 42.80),  # 7→11
            (43.14, 43.02, 42.92),  # 8→11
            (43.14, 42.92, 42.92),  # 9→11
            (43.14, 43.18, 43.06),  # 10→11
            (43.12, 43.12, 43.12),  # 11→11
        ),
    ),
    CascadeTable(
        14,
        "coco",
        "b32",
        "all",
        (
            (38.60, 39.12, 40.06),  # 0→11
            (39.02, 39.62, 40.54),  # 1→11
            (39.98, 40.10, 40.44),  # 2→11
            (41.00, 41.34, 41.46),  # 3→11
            (41.62, 41.68, 41.92),  # 4→11
            (41.88, 42.28, 42.26),  # 5→11
            (42.88, 42.60, 42.82),  # 6→11
            (43.14, 43.10, 42.76),  # 7→11
            (43.26, 43.26, 42.86),  # 8→11
            (43.28, 43.20, 42.74),  # 9→11
            (42.78, 43.10, 42.92),  # 10→11
            (43.24, 43.26, 43.00),  # 11→11
        ),
    ),
    CascadeTable(
        15,
        "coco",
        "b16",
        "cls",
        (
            (43.62, 43.62, 42.76),  # 0→11
            (43.56, 43.62, 42.40),  # 1→11
            (43.60, 43.64, 42.34),  # 2→11
            (43.68, 43.64, 42.64),  # 3→11
            (43.66, 43.72, 42.64),  # 4→11
            (43.58, 43.80, 42.98),  # 5→11
            (43.56, 43.66, 43.50),  # 6→11
            (43.52, 43.64, 43.34),  # 7→11
            (43.72, 43.66, 43.68),  # 8→11
            (43.82, 43.84, 43.24),  # 9→11
            (43.52, 43.88, 43.38),  # 10→11
            (43.50, 43.62, 43.28),  # 11→11
        ),
    ),
    CascadeTable(
        16,
        "coco",
        "b16",
        "patches",
        (
            (42.72, 42.00, 35.46),  # 0→11
            (42.84, 41.98, 37.28),  # 1→11
            (42.68, 42.20, 38.36),  # 2→11
            (43.00, 42.34, 39.46),  # 3→11
            (43.00, 42.96, 40.86),  # 4→11
            (42.98, 43.00, 42.58),  # 5→11
            (43.38, 43.16, 42.98),  # 6→11
            (43.26, 43.36, 43.30),  # 7→11
            (43.44, 43.56, 43.86),  # 8→11
            (43.62, 43.70, 43.76),  # 9→11
            (43.62, 43.64, 43.72),  # 10→11
            (43.50, 43.50, 43.50),  # 11→11
        ),
    ),
    CascadeTable(
        17,
        "coco",
        "b16",
        "all",
        (
            (43.00, 42.08, 34.16),  # 0→11
            (42.92, 42.08, 36.06),  # 1→11
            (42.74, 42.20, 36.82),  # 2→11
            (42.78, 42.66, 38.18),  # 3→11
            (42.84, 43.10, 39.80),  # 4→11
            (43.04, 43.12, 42.22),  # 5→11
            (43.44, 43.56, 43.04),  # 6→11
            (43.62, 43.58, 43.48),  # 7→11
            (43.72, 43.70, 43.66),  # 8→11
            (43.66, 43.96, 43.56),  # 9→11
            (43.42, 43.92, 43.60),  # 10→11
            (43.50, 43.62, 43.28),  # 11→11
        ),
    ),
    CascadeTable(
        18,
        "imagenet100",
        "b32",
        "cls",
        (
            (80.92, 80.86, 80.26),  # 0→11
            (80.84, 80.82, 80.32),  # 1→11
            (80.82, 80.86, 80.24),  # 2→11
            (80.86, 80.78, 80.16),  # 3→11
            (80.80, 80.86, 80.24),  # 4→11
            (80.74, 80.86, 80.44),  # 5→11
            (80.68, 80.84, 79.92),  # 6→11
            (80.64, 80.72, 80.16),  # 7→11
            (80.66, 80.68, 80.06),  # 8→11
            (80.46, 80.60, 80.10),  # 9→11
            (80.56, 80.72, 80.18),  # 10→11
            (80.54, 80.54, 80.36),  # 11→11
        ),
    ),
    CascadeTable(
        19,
        "imagenet100",
        "b32",
        "patches",
        (
            (71.96, 68.74, 60.26),  # 0→11
            (72.34, 70.10, 64.80),  # 1→11
            (73.10, 72.24, 67.54),  # 2→11
            (75.58, 75.26, 72.46),  # 3→11
            (77.86, 77.18, 75.88),  # 4→11
            (78.92, 79.10, 77.54),  # 5→11
            (79.80, 79.78, 79.56),  # 6→11
            (80.34, 80.18, 80.64),  # 7→11
            (80.60, 80.38, 80.86),  # 8→11
            (80.62, 80.50, 80.76),  # 9→11
            (80.52, 80.46, 80.46),  # 10→11
            (80.42, 80.42, 80.42),  # 11→11
        ),
    ),
    CascadeTable(
        20,
        "imagenet100",
        "b32",
        "all",
        (
            (71.60, 68.90, 60.26),  # 0→11
            (71.92, 70.10, 63.82),  # 1→11
            (72.88, 72.32, 66.72),  # 2→11
            (75.12, 75.36, 71.44),  # 3→11
            (77.56, 77.10, 74.68),  # 4→11
            (78.74, 78.84, 77.30),  # 5→11
            (79.50, 79.86, 78.82),  # 6→11
            (80.18, 80.44, 79.38),  # 7→11
            (80.52, 80.24, 80.32),  # 8→11
            (80.72, 80.48, 80.46),  # 9→11
            (80.38, 80.58, 80.18),  # 10→11
            (80.54, 80.54, 80.36),  # 11→11
        ),
    ),
    CascadeTable(
        21,
        "imagenet100",
        "b16",
        "cls",
        (
            (84.54, 84.02, 83.28),  # 0→11
            (84.50, 84.04, 83.52),  # 1→11
            (84.44, 83.98, 83.50),  # 2→11
            (84.56, 84.08, 83.74),  # 3→11
            (84.44, 84.04, 83.82),  # 4→11
            (84.42, 84.10, 84.20),  # 5→11
            (84.52, 84.04, 84.24),  # 6→11
            (84.66, 84.16, 84.40),  # 7→11
            (84.60, 84.30, 84.46),  # 8→11
            (84.62, 84.30, 84.42),  # 9→11
            (84.56, 84.38, 84.34),  # 10→11
            (84.46, 84.36, 84.36),  # 11→11
        ),
    ),
    CascadeTable(
        22,
        "imagenet100",
        "b16",
        "patches",
        (
            (83.04, 81.40, 73.06),  # 0→11
            (83.00, 81.44, 76.74),  # 1→11
            (83.18, 81.88, 77.54),  # 2→11
            (83.16, 82.76, 79.36),  # 3→11
            (83.56, 83.34, 80.98),  # 4→11
            (83.78, 83.88, 82.50),  # 5→11
            (84.20, 84.12, 83.26),  # 6→11
            (83.94, 84.24, 83.84),  # 7→11
            (84.02, 84.24, 84.26),  # 8→11
            (84.20, 84.22, 84.72),  # 9→11
            (84.20, 84.22, 84.58),  # 10→11
            (84.34, 84.34, 84.34),  # 11→11
        ),
    ),
    CascadeTable(
        23,
        "imagenet100",
        "b16",
        "all",
        (
            (83.12, 80.94, 70.78),  # 0→11
            (83.08, 81.58, 74.70),  # 1→11
            (83.28, 81.90, 76.30),  # 2→11
            (83.00, 82.64, 78.08),  # 3→11
            (83.62, 83.08, 80.12),  # 4→11
            (84.16, 83.86, 81.76),  # 5→11
            (84.46, 83.92, 82.56),  # 6→11
            (84.28, 84.32, 83.34),  # 7→11
            (84.38, 84.10, 84.08),  # 8→11
            (84.20, 84.22, 84.74),  # 9→11
            (84.40, 84.36, 84.74),  # 10→11
            (84.46, 84.36, 84.36),  # 11→11
        ),
    ),
)

_TABLES_BY_KEY: dict[tuple[str, str, str], CascadeTable] = {
    (table.dataset, table.backbone, table.mode): table for table in CASCADE_TABLES
}


def cascade_table(dataset: str, backbone: str, mode: str) -> CascadeTable | None:
    """The paper's table for (dataset, backbone, token mode), or None if it has none.

    Args:
        dataset: `cifar100`, `coco` or `imagenet100` (anything else gives None).
        backbone: `b32` or `b16`.
        mode: `cls`, `patches` or `all`.
    """
    return _TABLES_BY_KEY.get((dataset, backbone, mode))


def paper_top1(dataset: str, backbone: str, mode: str, sparsifier: str) -> tuple[float, ...] | None:
    """Published top-1 (%) for starts s = 0..11, or None where the paper has no such column.

    Args:
        dataset: Dataset name.
        backbone: Backbone name.
        mode: Token mode.
        sparsifier: Sparsifier name; only `jumprelu`, `relu_topk`, `abs_topk` have numbers.
    """
    table = cascade_table(dataset, backbone, mode)
    if table is None or sparsifier not in SPARSIFIERS:
        return None
    return table.column(sparsifier)


# Table 5: faithfulness of the CLT surrogate, CIFAR-100, ViT-B/32 (sparsifier not stated).
# Units as printed: delta_acc in points, flip_pct in percent, agreements in percent.
# `window` is the paper's label ("11" is the single last layer); `start` is s of s->11.
FAITHFULNESS_METRICS: tuple[str, ...] = (
    "delta_acc",
    "flip_pct",
    "kl",
    "top1_agreement",
    "top5_agreement",
    "cosine",
    "cka",
    "spearman",
    "prompt_r",
    "prompt_kl",
)
FAITHFULNESS_SETTING: tuple[str, str] = ("cifar100", "b32")
FAITHFULNESS: tuple[dict[str, float | int | str], ...] = (
    {"window": "0-11", "start": 0, "mode": "cls", "delta_acc": +0.07, "flip_pct": 10.4,
     "kl": 0.034, "top1_agreement": 89.6, "top5_agreement": 88.5, "cosine": 0.984,
     "cka": 0.948, "spearman": 0.929, "prompt_r": 0.995, "prompt_kl": 0.036},
    {"window": "7-11", "start": 7, "mode": "cls", "delta_acc": +0.01, "flip_pct": 9.5,
     "kl": 0.030, "top1_agreement": 90.5, "top5_agreement": 89.0, "cosine": 0.985,
     "cka": 0.954, "spearman": 0.937, "prompt_r": 0.992, "prompt_kl": 0.031},
    {"window": "10-11", "start": 10, "mode": "cls", "delta_acc": -0.07, "flip_pct": 7.2,
     "kl": 0.018, "top1_agreement": 92.8, "top5_agreement": 91.2, "cosine": 0.991,
     "cka": 0.979, "spearman": 0.973, "prompt_r": 0.994, "prompt_kl": 0.019},
    {"window": "11", "start": 11, "mode": "cls", "delta_acc": -0.04, "flip_pct": 5.4,
     "kl": 0.010, "top1_agreement": 94.6, "top5_agreement": 93.2, "cosine": 0.996,
     "cka": 0.991, "spearman": 0.991, "prompt_r": 0.997, "prompt_kl": 0.010},
    {"window": "0-11", "start": 0, "mode": "patches", "delta_acc": -11.1, "flip_pct": 35.2,
     "kl": 0.412, "top1_agreement": 64.8, "top5_agreement": 70.0, "cosine": 0.957,
     "cka": 0.817, "spearman": 0.759, "prompt_r": 0.942, "prompt_kl": 0.383},
    {"window": "7-11", "start": 7, "mode": "patches", "delta_acc": +0.05, "flip_pct": 15.0,
     "kl": 0.079, "top1_agreement": 85.0, "top5_agreement": 85.8, "cosine": 0.990,
     "cka": 0.972, "spearman": 0.957, "prompt_r": 0.989, "prompt_kl": 0.073},
    {"window": "10-11", "start": 10, "mode": "patches", "delta_acc": -0.13, "flip_pct": 2.5,
     "kl": 0.002, "top1_agreement": 97.5, "top5_agreement": 96.8, "cosine": 0.999,
     "cka": 0.999, "spearman": 0.998, "prompt_r": 0.996, "prompt_kl": 0.002},
)  # fmt: skip


@dataclass(frozen=True)
class AblationRow:
    """Poster: necessity (drop the top-1 source layer) and sufficiency (keep the top-4).

    Attributes:
        dataset: Dataset name.
        backbone: Always `b32` (the poster reports ViT-B/32 only).
        mode: `all` or `cls`.
        baseline: Frozen top-1 (%).
        drop_top1: Top-1 (%) without the most contributing source layer.
        keep_topk: Top-1 (%) keeping only the `ABLATION_K` most contributing source layers.
    """

    dataset: str
    backbone: str
    mode: str
    baseline: float
    drop_top1: float
    keep_topk: float


ABLATION_K = 4
ABLATIONS: tuple[AblationRow, ...] = (
    AblationRow("cifar100", "b32", "all", 61.65, 59.68, 59.96),
    AblationRow("cifar100", "b32", "cls", 61.65, 59.91, 60.72),
    AblationRow("coco", "b32", "all", 43.12, 42.98, 43.02),
    AblationRow("coco", "b32", "cls", 43.12, 42.78, 43.00),
    AblationRow("imagenet100", "b32", "all", 80.42, 74.94, 80.56),
    AblationRow("imagenet100", "b32", "cls", 80.42, 74.86, 80.48),
)

# Poster: reconstruction averaged over layers (all tokens), read off a plot:
# (dataset, backbone, sparsifier) -> (MSE, R^2, cosine).
RECONSTRUCTION_AVERAGES: dict[tuple[str, str, str], tuple[float, float, float]] = {
    ("cifar100", "b32", "jumprelu"): (0.0032, 0.889, 0.941),
    ("cifar100", "b32", "relu_topk"): (0.0024, 0.910, 0.953),
    ("cifar100", "b32", "abs_topk"): (0.0030, 0.889, 0.942),
    ("imagenet100", "b16", "jumprelu"): (0.0011, 0.951, 0.969),
    ("imagenet100", "b16", "relu_topk"): (0.0012, 0.945, 0.966),
    ("imagenet100", "b16", "abs_topk"): (0.0024, 0.908, 0.942),
}

# Poster heatmaps (dataset, backbone and sparsifier not stated; the poster's baselines are
# ViT-B/32). [CLS]: the column of the last target layer, sources 0..11 (sums to 1).
CLS_LAST_TARGET_CONTRIBUTIONS: tuple[float, ...] = (
    0.333, 0.104, 0.043, 0.065, 0.075, 0.051, 0.044, 0.020, 0.011, 0.002, 0.012, 0.240,
)  # fmt: skip
# Patches: "diagonal dominates", 11 values as printed, in order (cells not stated).
PATCHES_DIAGONAL_CONTRIBUTIONS: tuple[float, ...] = (
    0.365, 0.512, 0.490, 0.523, 0.595, 0.729, 0.851, 0.614, 0.528, 0.771, 0.287,
)  # fmt: skip
