"""Cascaded replacement: zero-shot accuracy with layers s..L-1 replaced by the CLT, for
every start s and token mode (docs/metrics.md, "Cascaded replacement").

The replacement itself is `replacement` (the MLP overrides and the shared clean prefix);
this module sweeps the windows and modes over an image stream. Accuracy is counted per
batch (top-1 and top-5 correct counts), so images are streamed and never held; the final
embeddings of chosen (start, mode) windows can be kept for the faithfulness metrics. The
tables are the paper's layout (one row per window, one column per mode or per CLT).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.replacement import (
    CleanPrefix,
    check_compatible,
    clean_prefix,
    replaced_from_prefix,
)
from clt_lightning.evaluation.tables import write_csv, write_markdown
from clt_lightning.evaluation.token_modes import DEFAULT_MODES, mode_positions
from clt_lightning.evaluation.zeroshot import zero_shot_logits
from clt_lightning.tokens import layout_of

logger = logging.getLogger(__name__)


@dataclass
class CascadeResult:
    """Zero-shot accuracy under cascaded replacement, for every start and token mode.

    Attributes:
        n_layers: L.
        starts: Start layers s evaluated (window s..L-1; s = L replaces nothing).
        modes: Token modes evaluated.
        n_images: Images evaluated.
        baseline: The unmodified teacher's {"top1": %, "top5": %}.
        accuracy: mode -> {"top1": [%, per start], "top5": [%, per start]}.
        embeddings: (start, mode) -> [N, E] float32 embeddings, for the kept windows.
        baseline_embeddings: [N, E] the teacher's embeddings (when any window is kept).
        labels: [N] int64 labels (when any window is kept).
    """

    n_layers: int
    starts: list[int]
    modes: list[str]
    n_images: int
    baseline: dict[str, float]
    accuracy: dict[str, dict[str, list[float]]]
    embeddings: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    baseline_embeddings: Tensor | None = None
    labels: Tensor | None = None

    def top1(self, mode: str, start: int) -> float:
        """Top-1 accuracy (%) for window start..L-1 on `mode`."""
        return self.accuracy[mode]["top1"][self.starts.index(start)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no tensors)."""
        return {
            "n_layers": self.n_layers,
            "starts": list(self.starts),
            "modes": list(self.modes),
            "n_images": self.n_images,
            "baseline": dict(self.baseline),
            "accuracy": {m: {k: list(v) for k, v in d.items()} for m, d in self.accuracy.items()},
        }


def correct_counts(logits: Tensor, labels: Tensor) -> Tensor:
    """[2] int64: top-1 and top-5 (top-C when C < 5) correct predictions in the batch."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices.cpu()
    hits = top == labels.view(-1, 1)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(images, labels) from an (images, labels, ...) tuple or a dict with images/labels keys."""
    if isinstance(batch, Mapping):
        return batch["images"], batch["labels"]
    images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels)


def _validate_cascade(
    teacher: Any, clt: Any, starts: Sequence[int] | None, modes: Sequence[str]
) -> list[int]:
    check_compatible(teacher, clt)
    n_layers = teacher.n_layers
    starts = list(range(n_layers)) if starts is None else [int(s) for s in starts]
    bad = [s for s in starts if not 0 <= s <= n_layers]
    if bad:
        raise ConfigError(
            f"cascade starts (evaluation.starts) must lie in 0..{n_layers}, got {bad}"
        )
    for mode in modes:
        mode_positions(mode, layout_of(teacher))  # raises for names the model lacks
    if not starts or not modes:
        raise ConfigError("cascade needs at least one start and one token mode")
    return starts


class CascadeAccumulator:
    """Streaming top-1/top-5 counts of a cascade, fed one clean prefix per image batch.

    `cascade` is this accumulator over a loader; the evaluation suite feeds it from its one
    clean teacher pass (`evaluation.clean_pass`), whose prefixes must encode `union`.

    Args:
        teacher: Teacher (embed, run_blocks, head, n_layers, d_model, tokens_per_image).
        clt: CLT (encode_layer, decode_target, n_layers, d_model).
        classifier: [E, C] zero-shot classifier.
        logit_scale: The model's log temperature.
        starts: Start layers (default 0..L-1); L means no replacement.
        modes: Token modes among "cls", "patches", "all".
        keep: (start, mode) windows whose final embeddings to keep (for faithfulness).
        incremental: Decode only changed codes (None: when the CLT's decoder is affine).

    Raises:
        CheckpointMismatchError: The CLT does not fit the teacher.
        ConfigError: Bad starts or modes.
    """

    def __init__(
        self,
        teacher: Any,
        clt: Any,
        classifier: Tensor,
        logit_scale: Tensor | float,
        starts: Sequence[int] | None = None,
        modes: Sequence[str] = DEFAULT_MODES,
        keep: Iterable[tuple[int, str]] = (),
        incremental: bool | None = None,
    ) -> None:
        self.teacher, self.clt = teacher, clt
        self.starts = _validate_cascade(teacher, clt, starts, modes)
        self.modes = list(modes)
        self.keep = frozenset((int(s), str(m)) for s, m in keep)
        self.head = (classifier, torch.as_tensor(logit_scale).float())
        self.incremental = incremental
        layout = layout_of(teacher)
        self.positions = {m: mode_positions(m, layout) for m in self.modes}
        self.union = torch.unique(torch.cat(list(self.positions.values())))
        """int64 [T_U]: the token positions a prefix must encode (`clean_prefix`)."""
        self.counts: dict[tuple[int, str], Tensor] = {}
        self.baseline = torch.zeros(2, dtype=torch.long)
        self.kept: dict[tuple[int, str], list[Tensor]] = {}
        self.kept_baseline: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.n_images = 0

    def update(self, prefix: CleanPrefix, labels: Tensor) -> None:
        """Count one image batch.

        Args:
            prefix: The batch's clean prefix, made with `positions=self.union`.
            labels: [N] int64 class labels (CPU).
        """
        baseline = self.teacher.head(prefix.h[-1]).float()
        self.baseline += correct_counts(zero_shot_logits(baseline, *self.head), labels)
        for mode in self.modes:
            for start in self.starts:
                emb = replaced_from_prefix(
                    self.teacher, self.clt, prefix, start, self.positions[mode], self.incremental
                )
                key = (start, mode)
                counts = correct_counts(zero_shot_logits(emb, *self.head), labels)
                self.counts[key] = self.counts.get(key, 0) + counts
                if key in self.keep:
                    self.kept.setdefault(key, []).append(emb.cpu())
        if self.keep:
            self.kept_baseline.append(baseline.cpu())
            self.labels.append(labels)
        self.n_images += labels.shape[0]

    def compute(self) -> CascadeResult:
        """The `CascadeResult` (accuracies in %).

        Raises:
            ConfigError: No image was counted.
        """
        if self.n_images == 0:
            raise ConfigError(
                "the evaluation set is empty (0 images): cascaded replacement needs at least "
                "one labelled image; check the dataset root, split and max_images"
            )

        def pct(counts: Tensor) -> list[float]:
            """Correct counts -> accuracies in %."""
            return [100.0 * int(c) / self.n_images for c in counts]

        accuracy = {}
        for mode in self.modes:
            rows = torch.stack([self.counts[(s, mode)] for s in self.starts])  # [S, 2]
            accuracy[mode] = {"top1": pct(rows[:, 0]), "top5": pct(rows[:, 1])}
        top1, top5 = pct(self.baseline)
        n_layers = self.teacher.n_layers
        result = CascadeResult(
            n_layers, self.starts, self.modes, self.n_images, {"top1": top1, "top5": top5}, accuracy
        )
        result.embeddings = {k: torch.cat(v) for k, v in self.kept.items()}
        if self.kept_baseline:
            result.baseline_embeddings = torch.cat(self.kept_baseline)
            result.labels = torch.cat(self.labels)
        logger.info("cascade on %d images: baseline top-1 %.2f%%", self.n_images, top1)
        return result


def cascade(
    teacher: Any,
    clt: Any,
    images_batches: Iterable[Any],
    classifier: Tensor,
    logit_scale: Tensor | float,
    starts: Sequence[int] | None = None,
    modes: Sequence[str] = DEFAULT_MODES,
    keep: Iterable[tuple[int, str]] = (),
    progress: bool = False,
    incremental: bool | None = None,
) -> CascadeResult:
    """Zero-shot accuracy with layers s..L-1 replaced, for every start s and token mode.

    Args:
        teacher: Teacher (embed, run_blocks, head, n_layers, d_model, tokens_per_image).
        clt: CLT (encode_layer, decode_target, n_layers, d_model), on the teacher's device.
        images_batches: Iterable of (images [N, 3, H, W], labels [N]) batches, e.g. a
            DataLoader over the validation split.
        classifier: [E, C] zero-shot classifier (`build_classifier`).
        logit_scale: The model's log temperature.
        starts: Start layers (default 0..L-1); L means no replacement.
        modes: Token modes among "cls", "patches", "all".
        keep: (start, mode) windows whose final embeddings to keep (for faithfulness).
        progress: Show a progress bar over batches.
        incremental: Decode only changed codes (None: when the CLT's decoder is affine).

    Returns:
        The `CascadeResult` (accuracies in %).

    Raises:
        CheckpointMismatchError: The CLT does not fit the teacher.
        ConfigError: Bad starts/modes, or no images at all.
    """
    acc = CascadeAccumulator(
        teacher, clt, classifier, logit_scale, starts, modes, keep, incremental
    )
    for batch in tqdm(images_batches, desc="cascade", unit="batch", disable=not progress):
        images, labels = split_batch(batch)
        if labels.shape[0]:
            acc.update(clean_prefix(teacher, clt, images, acc.union), labels.cpu())
    return acc.compute()


# ---------------------------------------------------------------------- tables


def window_label(start: int, n_layers: int) -> str:
    """The paper's row label for window start..L-1, e.g. "0→11"; "none" for start = L."""
    return "none" if start >= n_layers else f"{start}→{n_layers - 1}"


def cascade_table(result: CascadeResult, metric: str = "top1") -> list[dict[str, Any]]:
    """One row per start with one column per token mode, then a baseline row.

    Args:
        result: A cascade result.
        metric: "top1" or "top5".

    Returns:
        Rows {"range": "0→11", "cls": %, "patches": %, "all": %}.
    """
    rows = []
    for i, start in enumerate(result.starts):
        row: dict[str, Any] = {"range": window_label(start, result.n_layers)}
        row.update({m: result.accuracy[m][metric][i] for m in result.modes})
        rows.append(row)
    rows.append({"range": "baseline", **{m: result.baseline[metric] for m in result.modes}})
    return rows


def compare_table(
    results: Mapping[str, CascadeResult], mode: str, metric: str = "top1"
) -> list[dict[str, Any]]:
    """The paper's Tables 6-23 layout: one column per CLT (e.g. JR, RTK, ATK) for one mode.

    Args:
        results: Column name -> cascade result (same starts).
        mode: Token mode.
        metric: "top1" or "top5".

    Returns:
        Rows {"range": "0→11", "JR": %, "RTK": %, "ATK": %}, then a baseline row.
    """
    first = next(iter(results.values()))
    rows = []
    for i, start in enumerate(first.starts):
        row: dict[str, Any] = {"range": window_label(start, first.n_layers)}
        row.update({name: r.accuracy[mode][metric][i] for name, r in results.items()})
        rows.append(row)
    rows.append({"range": "baseline", **{n: r.baseline[metric] for n, r in results.items()}})
    return rows


def write_cascade_tables(result: CascadeResult, folder: str | Path) -> dict[str, Path]:
    """Write the cascade table as Markdown and CSV (top-1 and top-5).

    Args:
        result: A cascade result.
        folder: Output folder.

    Returns:
        {"top1_md", "top1_csv", "top5_md", "top5_csv"} -> written paths.
    """
    folder = Path(folder)
    paths = {}
    for metric in ("top1", "top5"):
        rows = cascade_table(result, metric)
        paths[f"{metric}_md"] = write_markdown(rows, folder / f"cascade_{metric}.md")
        paths[f"{metric}_csv"] = write_csv(rows, folder / f"cascade_{metric}.csv")
    return paths
