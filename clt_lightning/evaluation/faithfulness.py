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
returning fractions; `FaithfulnessReport.row` converts to the table's units. A metric
without a value for its input returns `Undefined(reason)` (`evaluation.undefined`),
decided on exact equality or counts before any division: a correlation with a constant
side (all templates equally accurate), a CKA of a constant representation, a geometry
Spearman of fewer than 3 images or of pairwise similarities that all tie, a cosine of a
zero embedding. JSON writes it as null with the reason, tables as "–".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.undefined import Undefined
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


def embedding_cosine(teacher_emb: Tensor, surrogate_emb: Tensor) -> float | Undefined:
    """Mean over images of cos(e_t, e_s).

    Args:
        teacher_emb: [N, E].
        surrogate_emb: [N, E].

    Returns:
        The mean; Undefined when an embedding is exactly zero (no direction).
    """
    _check_pair(teacher_emb, surrogate_emb, "embeddings")
    for name, emb in (("teacher", teacher_emb), ("surrogate", surrogate_emb)):
        zero = (emb == 0).all(dim=-1).nonzero().flatten().tolist()
        if zero:
            return Undefined(f"the {name} embedding of image {zero[0]} is exactly zero")
    return F.cosine_similarity(teacher_emb.double(), surrogate_emb.double(), dim=-1).mean().item()


def linear_cka(x: Tensor, y: Tensor) -> float | Undefined:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same images.

    CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred.

    Args:
        x: [N, E1].
        y: [N, E2].

    Returns:
        CKA in [0, 1]; Undefined when one representation is the same for every image
        (decided by exact equality: centring would leave rounding noise, not zero).
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"CKA needs the same non-zero number of rows, got {x.shape}, {y.shape}")
    for name, rep_ in (("first", x), ("second", y)):
        if bool((rep_ == rep_[:1]).all()):
            return Undefined(f"CKA: the {name} representation is the same for all {len(x)} images")
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return (cross / norm).item()


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=-1) / denom


def spearman_logits(teacher_logits: Tensor, surrogate_logits: Tensor) -> float | Undefined:
    """Mean over images of the Spearman correlation of the two logit vectors.

    Args:
        teacher_logits: [N, C].
        surrogate_logits: [N, C].

    Returns:
        Mean rho over images (ties get average ranks); images whose logits are all equal
        in either run are left out; Undefined when that is every image.
    """
    _check_pair(teacher_logits, surrogate_logits, "logits")
    ranks_t = rankdata(teacher_logits.double().cpu().numpy(), axis=-1)
    ranks_s = rankdata(surrogate_logits.double().cpu().numpy(), axis=-1)
    varies = ~(ranks_t == ranks_t[:, :1]).all(axis=-1) & ~(ranks_s == ranks_s[:, :1]).all(axis=-1)
    if not varies.any():
        return Undefined(f"every one of the {len(ranks_t)} images has constant logits")
    return float(_rowwise_pearson(ranks_t[varies], ranks_s[varies]).mean())


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
) -> float | Undefined:
    """Spearman correlation of the pairwise cosine similarities (i < j) of the two runs.

    Args:
        teacher_emb: [N, E].
        surrogate_emb: [N, E].
        max_pairs: Above this many pairs, use this many pairs sampled uniformly (with
            replacement, seeded) instead of all of them.
        seed: Seed of that subset.

    Returns:
        Spearman rho; Undefined for fewer than 3 images (fewer than 2 pairs) or when
        every pair has the same similarity in either run (all ranks tie).
    """
    _check_pair(teacher_emb, surrogate_emb, "embeddings")
    n = teacher_emb.shape[0]
    if n < 3:
        return Undefined(f"geometry Spearman needs at least 3 images, got {n}")
    i, j = _pair_indices(n, max_pairs, seed)
    ranks = []
    for name, emb in (("teacher", teacher_emb), ("surrogate", surrogate_emb)):
        unit = F.normalize(emb.double().cpu(), dim=-1).numpy()
        ranks.append(rankdata(np.einsum("pd,pd->p", unit[i], unit[j])))
        if (ranks[-1] == ranks[-1][0]).all():
            return Undefined(f"all {len(i)} pairwise {name} similarities are equal")
    return float(_rowwise_pearson(ranks[0], ranks[1]))


def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float | Undefined:
    """Pearson correlation of two vectors.

    Returns:
        r; Undefined when a vector has fewer than 2 entries or all its entries are
        exactly equal (its std would be rounding noise: r = -5.8e-14 for 355/360 on each
        of 6 templates).
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 2:
        return Undefined(f"Pearson r needs at least 2 values, got {len(a)}")
    for name, v in (("first", a), ("second", b)):
        if (v == v[0]).all():
            return Undefined(f"Pearson r: the {name} vector is constant ({v[0]!r} x {len(v)})")
    return float(_rowwise_pearson(a, b))


def prompt_sensitivity(
    teacher_emb: Tensor,
    surrogate_emb: Tensor,
    labels: Tensor,
    per_template_classifiers: Tensor,
    logit_scale: Tensor | float,
) -> tuple[float | Undefined, float]:
    """Pearson r of per-template accuracies and the KL averaged over templates.

    Args:
        teacher_emb: [N, E].
        surrogate_emb: [N, E].
        labels: [N].
        per_template_classifiers: [n_templates, E, C].
        logit_scale: The model's log temperature.

    Returns:
        (r, mean KL): r between [acc_t(j)]_j and [acc_s(j)]_j; mean_j KL_j. r is
        Undefined when either run is correct on the same number of images with every
        template (decided on those integer counts), or with fewer than 2 templates.
    """
    logits_t = zero_shot_logits(teacher_emb, per_template_classifiers, logit_scale)
    logits_s = zero_shot_logits(surrogate_emb, per_template_classifiers, logit_scale)
    labels = labels.to(logits_t.device)
    correct = {
        name: [int((lg.argmax(dim=-1) == labels).sum()) for lg in logits]
        for name, logits in (("teacher", logits_t), ("surrogate", logits_s))
    }
    kls = [kl_divergence(lt, ls) for lt, ls in zip(logits_t, logits_s, strict=True)]
    n, n_templates = int(labels.shape[0]), len(kls)
    if n_templates < 2:
        return Undefined(f"prompt r needs at least 2 templates, got {n_templates}"), float(kls[0])
    for name, counts in correct.items():
        if len(set(counts)) == 1:
            reason = (
                f"the {name}'s per-template accuracies are all equal "
                f"({counts[0]}/{n} on each of {n_templates} templates)"
            )
            return Undefined(reason), float(np.mean(kls))
    return pearson(correct["teacher"], correct["surrogate"]), float(np.mean(kls))


NO_TEMPLATES = Undefined("no per-template classifiers were given")


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
        prompt_r: Pearson r of per-template accuracies (Undefined without templates or
            when a run's per-template accuracies are all equal).
        prompt_kl: KL averaged over templates (Undefined without templates).

    `cosine`, `cka`, `spearman` and `spearman_logits` may also be `Undefined` (see the
    module docstring).
    """

    n_images: int
    teacher_accuracy: float
    surrogate_accuracy: float
    delta_accuracy: float
    flip_rate: float
    kl: float
    top1_agreement: float
    top5_agreement: float
    cosine: float | Undefined
    cka: float | Undefined
    spearman: float | Undefined
    spearman_logits: float | Undefined
    prompt_r: float | Undefined = NO_TEMPLATES
    prompt_kl: float | Undefined = NO_TEMPLATES

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

    def to_dict(self) -> dict[str, float | Undefined]:
        """All fields (write with `undefined.write_json`: Undefined becomes null)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    prompt: tuple[float | Undefined, float | Undefined] = (NO_TEMPLATES, NO_TEMPLATES)
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
    """Table 5 rows from labelled reports (write with `tables.write_markdown`/`write_csv`)."""
    return [report.row(label) for label, report in reports.items()]


TABLE5_WINDOWS: tuple[tuple[int, str], ...] = (
    (0, "cls"), (7, "cls"), (10, "cls"), (11, "cls"), (0, "patches"), (7, "patches"), (10, "patches"),
)  # fmt: skip
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
