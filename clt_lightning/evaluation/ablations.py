"""Necessity and sufficiency of source layers for the last layer's reconstruction.

Protocol (the paper's exact one is unpublished; see docs/metrics.md, "Ablations"):

1. Rank the sources s <= l* of the target l* = L-1 by their contribution score C[s, l*]
   (signed, largest first) of the token group matching the mode: [CLS] scores for "cls",
   patch scores for "patches", all-token scores for "all".
2. Run the clean teacher; at layer l* only, replace the MLP output of the tokens in M by
   the CLT reconstruction decoded from a subset S of sources (the others' codes set to
   zero, i.e. decode with a source mask); the bias b_dec[l*] is always kept. Every x_i is
   clean (nothing upstream is modified), so z_i are the teacher-forced codes.
3. Report zero-shot accuracy for S = all sources ("full", the same as the cascade's
   window l*→l*), S = all but the top-1 source ("drop top-1", necessity) and S = the
   top-k sources ("keep top-k", sufficiency; k = 4 by default), next to the baseline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.cascade import correct_counts, split_batch
from clt_lightning.evaluation.contributions import ContributionScores
from clt_lightning.evaluation.replacement import check_compatible, clean_prefix
from clt_lightning.evaluation.token_modes import (
    DEFAULT_MODES,
    indexer,
    mode_positions,
    relative_index,
)
from clt_lightning.evaluation.undefined import Undefined
from clt_lightning.evaluation.zeroshot import zero_shot_logits
from clt_lightning.tokens import layout_of

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("full", "drop_top1", "keep_topk")
"""Source subsets evaluated: all sources, all but the top-1, only the top-k."""


def rank_sources(scores: ContributionScores, group: str, target: int) -> list[int]:
    """Sources 0..target ordered by C[s, target], largest first (ties: lower s first).

    Args:
        scores: Contribution scores.
        group: Token group ("cls", "registers", "patches", "all").
        target: Target layer.

    Returns:
        Source layer indices, most contributing first.

    Raises:
        ConfigError: `scores` has no entry for `group`.
    """
    if group not in scores.scores:
        raise ConfigError(
            f"contribution scores have no token group {group!r} (have "
            f"{sorted(scores.scores)}); compute them with that group"
        )
    column = [float(v) for v in scores.sources(group)[: target + 1, target]]
    return sorted(range(target + 1), key=lambda s: (math.isnan(column[s]), -column[s], s))


def undefined_ranking(scores: ContributionScores, group: str, target: int) -> Undefined | None:
    """Undefined when no source score of `target` exists (no image of the group has a
    nonzero reconstruction of that layer, an exact count): the top sources are then
    arbitrary and the necessity / sufficiency variants undefined; else None."""
    column = scores.sources(group)[: target + 1, target]
    if bool(torch.isnan(torch.as_tensor(column)).all()):
        return Undefined(
            f"no contribution score of layer {target} for {group} tokens (no image has a "
            "nonzero reconstruction there): the sources cannot be ranked"
        )
    return None


def source_subsets(ranking: Sequence[int], k: int) -> dict[str, list[int]]:
    """The kept sources of each variant, sorted.

    Args:
        ranking: Sources, most contributing first.
        k: Sources kept by "keep_topk" (clipped to the number of sources).

    Returns:
        variant -> sorted kept source indices.
    """
    return {
        "full": sorted(ranking),
        "drop_top1": sorted(ranking[1:]),
        "keep_topk": sorted(ranking[:k]),
    }


@dataclass
class AblationResult:
    """Zero-shot top-1 accuracy (%) with the last layer decoded from source subsets.

    Attributes:
        target: The replaced layer l* (L-1 by default).
        k: Sources kept by "keep_topk".
        n_images: Images evaluated.
        baseline: The unmodified teacher's top-1 (%).
        accuracy: mode -> variant -> top-1 (%).
        kept_sources: mode -> variant -> kept source layers.
    """

    target: int
    k: int
    n_images: int
    baseline: float
    accuracy: dict[str, dict[str, float]]
    kept_sources: dict[str, dict[str, list[int]]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per token mode, in the poster's layout (accuracies in %)."""
        rows = []
        for mode, acc in self.accuracy.items():
            kept = self.kept_sources[mode]
            dropped = sorted(set(kept["full"]) - set(kept["drop_top1"]))
            rows.append(
                {
                    "tokens": mode,
                    "baseline": self.baseline,
                    "full": acc["full"],
                    "drop top-1": acc["drop_top1"],
                    f"keep top-{self.k}": acc["keep_topk"],
                    "dropped source": " ".join(map(str, dropped)),
                    "kept sources": " ".join(map(str, kept["keep_topk"])),
                }
            )
        return rows


class _TargetOverride:
    """Replace the MLP output of tokens `index` at one layer by a given y_hat."""

    def __init__(self, target: int, index: slice | Tensor, y_hat: Tensor) -> None:
        self.target, self.index, self.y_hat = target, index, y_hat

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> Tensor:
        if layer != self.target:
            return y
        y = y.clone()
        y[:, self.index] = self.y_hat.to(y.dtype)
        return y


@torch.no_grad()
def masked_reconstruction(
    clt: Any, target: int, codes: Sequence[Tensor], kept: Sequence[int]
) -> Tensor:
    """y_hat_target decoded from the kept sources only (others' codes zeroed; bias kept).

    Args:
        clt: CLT with `decode_target`.
        target: Target layer.
        codes: z_0..z_target, each [..., F].
        kept: Source layers whose codes are used.

    Returns:
        Raw y_hat_target [..., d].
    """
    keep = set(kept)
    masked = [z if s in keep else torch.zeros_like(z) for s, z in enumerate(codes[: target + 1])]
    return clt.decode_target(target, masked)


def _ablate_batch(
    teacher: Any,
    clt: Any,
    batch: tuple[Tensor, Tensor],
    head: tuple[Tensor, Tensor],
    target: int,
    subsets: dict[str, dict[str, list[int]]],
) -> tuple[Tensor, dict[tuple[str, str], Tensor]]:
    images, labels = batch
    layout = layout_of(teacher)
    positions = {m: mode_positions(m, layout) for m in subsets}
    union = torch.unique(torch.cat(list(positions.values())))
    prefix = clean_prefix(teacher, clt, images, union, n_code_layers=target + 1)
    baseline = correct_counts(zero_shot_logits(teacher.head(prefix.h[-1]), *head), labels)
    counts = {}
    for mode, variants in subsets.items():
        rel = relative_index(union, positions[mode])
        codes = [z[:, rel] for z in prefix.codes]
        for variant, kept in variants.items():
            y_hat = masked_reconstruction(clt, target, codes, kept)
            override = _TargetOverride(target, indexer(positions[mode]), y_hat)
            h = teacher.run_blocks(prefix.h[target], target, override=override).h
            logits = zero_shot_logits(teacher.head(h), *head)
            counts[(mode, variant)] = correct_counts(logits, labels)
    return baseline, counts


@torch.no_grad()
def ablate(
    teacher: Any,
    clt: Any,
    images_batches: Iterable[Any],
    classifier: Tensor,
    logit_scale: Tensor | float,
    scores: ContributionScores,
    modes: Sequence[str] = DEFAULT_MODES,
    k: int = 4,
    target: int | None = None,
    progress: bool = False,
) -> AblationResult:
    """Necessity (drop the top-1 source) and sufficiency (keep the top-k) at one layer.

    Args:
        teacher: Teacher.
        clt: CLT fitting the teacher.
        images_batches: Iterable of (images [N, 3, H, W], labels [N]).
        classifier: [E, C] zero-shot classifier.
        logit_scale: The model's log temperature.
        scores: Contribution scores used to rank the sources (group = token mode).
        modes: Token modes.
        k: Sources kept by "keep_topk".
        target: Replaced layer (default L-1, the paper's choice).
        progress: Show a progress bar.

    Returns:
        The `AblationResult`.

    Raises:
        CheckpointMismatchError: The CLT does not fit the teacher.
        ConfigError: Bad k/target/mode, missing score group, or no images.
    """
    check_compatible(teacher, clt)
    target = teacher.n_layers - 1 if target is None else int(target)
    if not 0 <= target < teacher.n_layers or k < 1:
        raise ConfigError(f"need 0 <= target < {teacher.n_layers} and k >= 1, got {target}, {k}")
    subsets = {m: source_subsets(rank_sources(scores, m, target), k) for m in modes}
    head = (classifier, torch.as_tensor(logit_scale).float())
    baseline, totals, n_images = torch.zeros(2, dtype=torch.long), {}, 0
    for batch in tqdm(images_batches, desc="ablations", disable=not progress):
        images, labels = split_batch(batch)
        if labels.shape[0] == 0:
            continue
        base, counts = _ablate_batch(teacher, clt, (images, labels.cpu()), head, target, subsets)
        baseline += base
        totals = {key: totals.get(key, 0) + c for key, c in counts.items()}
        n_images += labels.shape[0]
    if n_images == 0:
        raise ConfigError("the evaluation set is empty (0 images): ablations need images")
    accuracy = {m: {v: 100.0 * int(totals[(m, v)][0]) / n_images for v in VARIANTS} for m in modes}
    for mode in modes:
        undefined = undefined_ranking(scores, mode, target)
        if undefined is not None:
            accuracy[mode].update(drop_top1=undefined, keep_topk=undefined)
    return AblationResult(
        target, k, n_images, 100.0 * int(baseline[0]) / n_images, accuracy, subsets
    )
