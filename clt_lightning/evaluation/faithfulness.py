"""Surrogate faithfulness beyond accuracy (the paper's Table 5).

Every metric compares the teacher and the surrogate (teacher with a CLT replacement
window) on the same N images: their image embeddings e_t, e_s [N, E] and the zero-shot
logits computed from them. The formulas are in docs/metrics.md; in short:

- ΔAcc: top-1 accuracy of the surrogate minus the teacher's, in points.
- Flip: % of images whose top-1 class changes; Top-1 agreement = 100 - Flip.
- KL: mean over images of KL(softmax(logits_t) || softmax(logits_s)), natural log, with
  the model's own temperature (logits = exp(logit_scale) * cos).
- Top-5: mean over images of |top5_t ∩ top5_s| / 5, in %.
- Cos: mean over images of cos(e_t, e_s).
- CKA: linear CKA (Kornblith et al. 2019) of the two embedding matrices.
- Spear.: Spearman rank correlation between the teacher's and the surrogate's pairwise
  image-image cosine similarities (representational geometry; the table files it under
  "Embedding"). The per-image Spearman correlation of the logit vectors is also reported
  (`spearman_logits`).
- Prompt sensitivity: with one classifier per template, Pearson r between the teacher's
  and the surrogate's per-template accuracies, and the KL averaged over templates.

Design decisions: metrics are pure functions of tensors, computed in float64 on the CPU,
returning fractions; `FaithfulnessReport.row` converts to the table's units.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.zeroshot import zero_shot_logits

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAIRS = 2_000_000
"""Pairs of images sampled for the geometry Spearman when N(N-1)/2 is larger."""


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"teacher and surrogate {what} differ in shape: {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        raise ConfigError(f"no images: faithfulness needs at least one image ({what})")


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy as a fraction.

    Args:
        logits: [N, C].
        labels: [N] int64.
    """
    return (logits.argmax(dim=-1).cpu() == labels.cpu()).double().mean().item()


def delta_accuracy(teacher_logits: Tensor, surrogate_logits: Tensor, labels: Tensor) -> float:
    """Surrogate top-1 accuracy minus the teacher's (fraction; x100 for points).

    Args:
        teacher_logits: [N, C].
        surrogate_logits: [N, C].
        labels: [N].
    """
    _check_pair(teacher_logits, surrogate_logits, "logits")
    return accuracy(surrogate_logits, labels) - accuracy(teacher_logits, labels)


def flip_rate(teacher_logits: Tensor, surrogate_logits: Tensor) -> float:
    """Fraction of images whose top-1 class differs between teacher and surrogate.

    Args:
        teacher_logits: [N, C].
        surrogate_logits: [N, C].
    """
    _check_pair(teacher_logits, surrogate_logits, "logits")
    flips = teacher_logits.argmax(dim=-1) != surrogate_logits.argmax(dim=-1)
    return flips.double().mean().item()


def kl_divergence(teacher_logits: Tensor, surrogate_logits: Tensor) -> float:
    """Mean over images of KL(p_t || p_s), p = softmax(logits), natural log.

    Args:
        teacher_logits: [N, C] (already scaled by the temperature).
        surrogate_logits: [N, C].
    """
    _check_pair(teacher_logits, surrogate_logits, "logits")
    log_p = F.log_softmax(teacher_logits.double(), dim=-1)
    log_q = F.log_softmax(surrogate_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


def topk_agreement(teacher_logits: Tensor, surrogate_logits: Tensor, k: int = 5) -> float:
    """Mean over images of |top-k_t ∩ top-k_s| / k (fraction).

    Args:
        teacher_logits: [N, C].
        surrogate_logits: [N, C].
        k: Set size (clipped to C).
    """
    _check_pair(teacher_logits, surrogate_logits, "logits")
    k = min(k, teacher_logits.shape[-1])
    top_t = teacher_logits.topk(k, dim=-1).indices  # [N, k]
    top_s = surrogate_logits.topk(k, dim=-1).indices
    shared = (top_t[:, :, None] == top_s[:, None, :]).any(dim=-1).sum(dim=-1)
    return (shared.double() / k).mean().item()


def embedding_cosine(teacher_emb: Tensor, surrogate_emb: Tensor) -> float:
    """Mean over images of cos(e_t, e_s).

    Args:
        teacher_emb: [N, E].
        surrogate_emb: [N, E].
    """
    _check_pair(teacher_emb, surrogate_emb, "embeddings")
    return F.cosine_similarity(teacher_emb.double(), surrogate_emb.double(), dim=-1).mean().item()


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same images.

    CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred.

    Args:
        x: [N, E1].
        y: [N, E2].

    Returns:
        CKA in [0, 1]; NaN when one representation is constant.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"CKA needs the same non-zero number of rows, got {x.shape}, {y.shape}")
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return (cross / norm).item() if norm > 0 else float("nan")


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=-1) / denom


def spearman_logits(teacher_logits: Tensor, surrogate_logits: Tensor) -> float:
    """Mean over images of the Spearman correlation of the two logit vectors.

    Args:
        teacher_logits: [N, C].
        surrogate_logits: [N, C].

    Returns:
        Mean rho over images (ties get average ranks; constant rows are skipped).
    """
    _check_pair(teacher_logits, surrogate_logits, "logits")
    ranks_t = rankdata(teacher_logits.double().cpu().numpy(), axis=-1)
    ranks_s = rankdata(surrogate_logits.double().cpu().numpy(), axis=-1)
    return float(np.nanmean(_rowwise_pearson(ranks_t, ranks_s)))


def _pair_indices(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j: the whole upper triangle, or `max_pairs` sampled uniformly."""
    if n * (n - 1) // 2 <= max_pairs:
        return np.triu_indices(n, k=1)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=max_pairs)
    j = rng.integers(0, n - 1, size=max_pairs)
    j = j + (j >= i)  # uniform over j != i
    return i, j


def spearman_geometry(
    teacher_emb: Tensor, surrogate_emb: Tensor, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0
) -> float:
    """Spearman correlation of the pairwise cosine similarities (i < j) of the two runs.

    Args:
        teacher_emb: [N, E].
        surrogate_emb: [N, E].
        max_pairs: Above this many pairs, use this many pairs sampled uniformly (with
            replacement, seeded) instead of all of them.
        seed: Seed of that subset.

    Returns:
        Spearman rho; NaN for fewer than 3 images.
    """
    _check_pair(teacher_emb, surrogate_emb, "embeddings")
    n = teacher_emb.shape[0]
    if n < 3:
        return float("nan")
    i, j = _pair_indices(n, max_pairs, seed)
    sims = []
    for emb in (teacher_emb, surrogate_emb):
        unit = F.normalize(emb.double().cpu(), dim=-1).numpy()
        sims.append(np.einsum("pd,pd->p", unit[i], unit[j]))
    return float(_rowwise_pearson(rankdata(sims[0]), rankdata(sims[1])))


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN (with a warning) when one is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        logger.warning("Pearson r undefined: a constant vector (%s, %s)", a[:3], b[:3])
        return float("nan")
    return float(_rowwise_pearson(a, b))


def prompt_sensitivity(
    teacher_emb: Tensor,
    surrogate_emb: Tensor,
    labels: Tensor,
    per_template_classifiers: Tensor,
    logit_scale: Tensor | float,
) -> tuple[float, float]:
    """Pearson r of per-template accuracies and the KL averaged over templates.

    Args:
        teacher_emb: [N, E].
        surrogate_emb: [N, E].
        labels: [N].
        per_template_classifiers: [n_templates, E, C].
        logit_scale: The model's log temperature.

    Returns:
        (r, mean KL): r between [acc_t(j)]_j and [acc_s(j)]_j; mean_j KL_j.
    """
    logits_t = zero_shot_logits(teacher_emb, per_template_classifiers, logit_scale)
    logits_s = zero_shot_logits(surrogate_emb, per_template_classifiers, logit_scale)
    acc_t = [accuracy(lt, labels) for lt in logits_t]
    acc_s = [accuracy(ls, labels) for ls in logits_s]
    kls = [kl_divergence(lt, ls) for lt, ls in zip(logits_t, logits_s, strict=True)]
    return pearson(acc_t, acc_s), float(np.mean(kls))


@dataclass
class FaithfulnessReport:
    """Table 5's metrics for one replacement window (fractions unless noted).

    Attributes:
        n_images: Images compared.
        teacher_accuracy: Teacher top-1 (fraction).
        surrogate_accuracy: Surrogate top-1 (fraction).
        delta_accuracy: Surrogate minus teacher top-1 (fraction).
        flip_rate: Fraction of changed top-1 predictions.
        kl: Mean KL(teacher || surrogate).
        top1_agreement: 1 - flip_rate.
        top5_agreement: Mean |top5_t ∩ top5_s| / 5.
        cosine: Mean embedding cosine.
        cka: Linear CKA of the embeddings.
        spearman: Spearman rho of the pairwise image similarities (the table's "Spear.").
        spearman_logits: Mean per-image Spearman rho of the logit vectors.
        prompt_r: Pearson r of per-template accuracies (NaN without templates).
        prompt_kl: KL averaged over templates (NaN without templates).
    """

    n_images: int
    teacher_accuracy: float
    surrogate_accuracy: float
    delta_accuracy: float
    flip_rate: float
    kl: float
    top1_agreement: float
    top5_agreement: float
    cosine: float
    cka: float
    spearman: float
    spearman_logits: float
    prompt_r: float = float("nan")
    prompt_kl: float = float("nan")

    def row(self, label: str) -> dict[str, Any]:
        """The paper's Table 5 row: ΔAcc in points, Flip/Top-1/Top-5 in %, the rest raw."""
        return {
            "Layers": label,
            "ΔAcc": 100 * self.delta_accuracy,
            "Flip %": 100 * self.flip_rate,
            "KL": self.kl,
            "Top-1": 100 * self.top1_agreement,
            "Top-5": 100 * self.top5_agreement,
            "Cos": self.cosine,
            "CKA": self.cka,
            "Spear.": self.spearman,
            "r": self.prompt_r,
            "KL (prompts)": self.prompt_kl,
        }

    def to_dict(self) -> dict[str, float]:
        """All fields, JSON-able."""
        return asdict(self)


@torch.no_grad()
def faithfulness(
    teacher_emb: Tensor,
    surrogate_emb: Tensor,
    labels: Tensor,
    classifier: Tensor,
    logit_scale: Tensor | float,
    per_template_classifiers: Tensor | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> FaithfulnessReport:
    """Every Table 5 metric for one window, from the two runs' embeddings.

    Args:
        teacher_emb: [N, E] teacher image embeddings.
        surrogate_emb: [N, E] embeddings of the same images with the window replaced.
        labels: [N] int64.
        classifier: [E, C] (template-ensemble) zero-shot classifier.
        logit_scale: The model's log temperature.
        per_template_classifiers: [n_templates, E, C] for prompt sensitivity, or None.
        max_pairs: Pair budget of the geometry Spearman.

    Returns:
        The `FaithfulnessReport`.
    """
    _check_pair(teacher_emb, surrogate_emb, "embeddings")
    labels = labels.cpu()
    lt = zero_shot_logits(teacher_emb, classifier, logit_scale).cpu()
    ls = zero_shot_logits(surrogate_emb, classifier, logit_scale).cpu()
    flips = flip_rate(lt, ls)
    prompt = (float("nan"), float("nan"))
    if per_template_classifiers is not None:
        prompt = prompt_sensitivity(
            teacher_emb, surrogate_emb, labels, per_template_classifiers, logit_scale
        )
    return FaithfulnessReport(
        n_images=int(labels.shape[0]),
        teacher_accuracy=accuracy(lt, labels),
        surrogate_accuracy=accuracy(ls, labels),
        delta_accuracy=delta_accuracy(lt, ls, labels),
        flip_rate=flips,
        kl=kl_divergence(lt, ls),
        top1_agreement=1.0 - flips,
        top5_agreement=topk_agreement(lt, ls, 5),
        cosine=embedding_cosine(teacher_emb, surrogate_emb),
        cka=linear_cka(teacher_emb, surrogate_emb),
        spearman=spearman_geometry(teacher_emb, surrogate_emb, max_pairs),
        spearman_logits=spearman_logits(lt, ls),
        prompt_r=prompt[0],
        prompt_kl=prompt[1],
    )


def faithfulness_label(start: int, n_layers: int, mode: str) -> str:
    """Table 5's row label: "0-11 CLS", "11 CLS", "7-11 Patches", "0-11 All"."""
    last = n_layers - 1
    layers = f"{last}" if start == last else f"{start}-{last}"
    return f"{layers} {'CLS' if mode == 'cls' else mode.capitalize()}"


def faithfulness_from_cascade(
    result: Any,
    classifier: Tensor,
    logit_scale: Tensor | float,
    per_template_classifiers: Tensor | None = None,
    windows: Iterable[tuple[int, str]] | None = None,
) -> dict[str, FaithfulnessReport]:
    """Reports for windows whose embeddings a `cascade(..., keep=...)` call kept.

    Args:
        result: A `CascadeResult` with `embeddings`, `baseline_embeddings` and `labels`.
        classifier: [E, C].
        logit_scale: The model's log temperature.
        per_template_classifiers: [n_templates, E, C] or None.
        windows: (start, mode) pairs (default: every kept window).

    Returns:
        Row label (`faithfulness_label`) -> report, in window order.

    Raises:
        ConfigError: A requested window was not kept.
    """
    windows = list(result.embeddings) if windows is None else list(windows)
    missing = [w for w in windows if w not in result.embeddings]
    if missing or result.baseline_embeddings is None:
        raise ConfigError(
            f"cascade result lacks embeddings for windows {missing or windows}; pass them "
            "as cascade(..., keep=[(start, mode), ...])"
        )
    reports = {}
    for start, mode in windows:
        reports[faithfulness_label(start, result.n_layers, mode)] = faithfulness(
            result.baseline_embeddings,
            result.embeddings[(start, mode)],
            result.labels,
            classifier,
            logit_scale,
            per_template_classifiers,
        )
    return reports


def faithfulness_table(reports: Mapping[str, FaithfulnessReport]) -> list[dict[str, Any]]:
    """Table 5 rows from labelled reports (write with `_io.write_markdown`/`write_csv`)."""
    return [report.row(label) for label, report in reports.items()]


TABLE5_WINDOWS: tuple[tuple[int, str], ...] = (
    (0, "cls"),
    (7, "cls"),
    (10, "cls"),
    (11, "cls"),
    (0, "patches"),
    (7, "patches"),
    (10, "patches"),
)
"""The windows of the paper's Table 5 (for a 12-layer ViT); `table5_windows` maps them to
other depths."""

TABLE5_DEPTH = 12
"""Depth of the ViTs `TABLE5_WINDOWS` is written for (ViT-B/32 and ViT-B/16)."""


def table5_windows(n_layers: int, modes: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """The paper's Table 5 rows for an `n_layers`-deep ViT, by offset from the last layer.

    A window s -> 11 of the 12-layer table becomes s' -> L-1 with L-1-s' = 11-s (7-11 is
    L-5 -> L-1, 10-11 is L-2 -> L-1, 11 is L-1 alone); the full window 0-11 stays 0 -> L-1.
    Starts below 0 are clipped to 0 and repeated windows dropped, so a 4-layer ViT gets
    0-3, 2-3 and 3 for [CLS] and 0-3, 2-3 for patches.

    Args:
        n_layers: L, the teacher's depth (>= 1).
        modes: Keep only these token modes (default: the table's, "cls" and "patches").

    Returns:
        (start, mode) windows in the table's order.
    """
    keep = None if modes is None else set(modes)
    windows: list[tuple[int, str]] = []
    for start, mode in TABLE5_WINDOWS:
        mapped = 0 if start == 0 else max(0, n_layers - (TABLE5_DEPTH - start))
        if (keep is None or mode in keep) and (mapped, mode) not in windows:
            windows.append((mapped, mode))
    return windows
