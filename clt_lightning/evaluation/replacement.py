"""Cascaded replacement: the teacher with its MLPs replaced by the CLT from layer s on.

"Replace s -> L-1 for tokens M" (docs/metrics.md, "Cascaded replacement"): run the frozen teacher; at every layer
l >= s the MLP output of the tokens in M is replaced by the CLT's y_hat_l, whose inputs
x_i (i <= l) are read from the run being modified; other tokens keep their true MLP
output. Token modes are the token groups of `clt_lightning.tokens` the model has: "cls",
"registers", "patches", "all" (SigLIP has no "cls").

Design decisions:

- The clean prefix is computed once per image batch and shared by every start and mode:
  the residual h entering each layer, the clean codes z_l of the union of the modes'
  tokens, and the teacher-forced reconstruction y_hat_l of those tokens. The run for start
  s then continues from the clean residual at layer s. Up to and including layer s's MLP
  input the modified run *is* the clean run (same input, same ops), so x_s, z_s and y_hat_s
  are the clean ones and are reused; new codes are computed from layer s+1 on. Per start
  that saves s+1 blocks, s+1 encodes and one decode against recomputing from layer 0 (the
  naive way, `run_replaced`, kept as the reference and for single windows).
- Only the tokens in M are encoded and decoded (for "cls" that is 1 of T tokens).
- Accuracy is counted per batch (top-1 and top-5 correct counts), so images are streamed
  and never held; the final embeddings of chosen (start, mode) windows can be kept for
  the faithfulness metrics.
- `OracleCLT` has the CLT's interface but returns the teacher's own MLP output; with it
  every window and mode must reproduce the teacher exactly (the tests check this).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.evaluation._io import rows_to_markdown, write_csv, write_markdown
from clt_lightning.evaluation.zeroshot import zero_shot_logits
from clt_lightning.tokens import TokenLayout, group_arange, layout_of

logger = logging.getLogger(__name__)

TOKEN_MODES: tuple[str, ...] = ("cls", "patches", "all")
"""Default token modes of a CLIP: [CLS] only, patch tokens only, every token (any token
group of `clt_lightning.tokens.TOKEN_GROUPS` the model has is a valid mode)."""

TokenSpec = str | Sequence[int] | Tensor
"""A token mode name or explicit token positions."""


# ---------------------------------------------------------------------- tokens and checks


def token_positions(mode: TokenSpec, layout: TokenLayout | int) -> Tensor:
    """Token positions replaced in a mode.

    Args:
        mode: A token group ("cls", "registers", "patches", "all"), or explicit positions
            (may be empty).
        layout: The teacher's `TokenLayout` (or T, read as [CLS] + patches).

    Returns:
        int64 [T_M] sorted unique positions.

    Raises:
        ConfigError: Unknown mode name, a group the model lacks, or a position outside
            0..T-1.
    """
    layout = layout_of(layout)
    n_tokens = layout.n_tokens
    if isinstance(mode, str):
        return group_arange(layout, layout.check(mode, "token mode"))
    positions = torch.unique(torch.as_tensor(mode, dtype=torch.long).flatten())
    if positions.numel() and (positions.min() < 0 or positions.max() >= n_tokens):
        raise ConfigError(f"token positions must lie in 0..{n_tokens - 1}, got {positions}")
    return positions


def indexer(positions: Tensor) -> slice | Tensor:
    """A slice when the positions are a contiguous run (a view, no copy), else the tensor."""
    n = positions.numel()
    if n and int(positions[-1] - positions[0]) == n - 1:
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def check_compatible(teacher: Any, clt: Any) -> None:
    """Raise unless the CLT's shape fits the teacher.

    Args:
        teacher: Object with `n_layers` and `d_model`.
        clt: Object with `n_layers` and `d_model`.

    Raises:
        CheckpointMismatchError: Naming both (n_layers, d_model) pairs.
    """
    clt_shape = (int(clt.n_layers), int(clt.d_model))
    teacher_shape = (int(teacher.n_layers), int(teacher.d_model))
    if clt_shape != teacher_shape:
        raise CheckpointMismatchError(
            f"the CLT has n_layers={clt_shape[0]}, d_model={clt_shape[1]} but the teacher has "
            f"n_layers={teacher_shape[0]}, d_model={teacher_shape[1]}; use a CLT trained on "
            "this teacher"
        )


def _check_window(start: int, stop: int, n_layers: int) -> None:
    if not 0 <= start <= stop <= n_layers:
        raise ConfigError(
            f"replacement window needs 0 <= start <= stop <= {n_layers}, got start={start}, "
            f"stop={stop}"
        )


def clt_dtype(clt: Any) -> torch.dtype:
    """The dtype the CLT computes in (its `dtype` attribute, else its first parameter's)."""
    dtype = getattr(clt, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    params = getattr(clt, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.dtype if first is not None else torch.float32


# ---------------------------------------------------------------------- the override


class Replacer:
    """MLP override replacing tokens `index` by the CLT's reconstruction on a window.

    Codes of the replaced tokens are collected as the run goes, so the decoder of layer l
    reads z_0..z_l of the run being modified. Codes of layers before the run's first block
    (and optionally the reconstruction at the window's first layer) come from the clean
    prefix.

    Args:
        clt: Object with `encode_layer(layer, x)` and `decode_target(target, zs)`.
        index: Token indexer (slice or int64 positions) into the T axis.
        start: First replaced layer s.
        stop: One past the last replaced layer.
        codes: Codes z_0.. already known (clean prefix), each [N, T_M, F]; copied.
        first_y_hat: The reconstruction at layer `start` if already known, [N, T_M, d].
    """

    def __init__(
        self,
        clt: Any,
        index: slice | Tensor,
        start: int,
        stop: int,
        codes: Sequence[Tensor] = (),
        first_y_hat: Tensor | None = None,
    ) -> None:
        self.clt, self.index, self.start, self.stop = clt, index, start, stop
        self.codes = list(codes)
        self.first_y_hat = first_y_hat
        self.dtype = clt_dtype(clt)

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> Tensor:
        """The MLP output to use at `layer` (x, y [N, T, d]); see `MLPOverride`."""
        if layer >= self.stop:
            return y
        if layer == self.start and self.first_y_hat is not None:
            y_hat = self.first_y_hat
        else:
            if len(self.codes) == layer:
                self.codes.append(self.clt.encode_layer(layer, x[:, self.index].to(self.dtype)))
            if layer < self.start:
                return y
            y_hat = self.clt.decode_target(layer, self.codes[: layer + 1])
        y = y.clone()
        y[:, self.index] = y_hat.to(y.dtype)
        return y


# ---------------------------------------------------------------------- single window


@torch.no_grad()
def run_replaced(
    teacher: Any,
    clt: Any,
    images: Tensor,
    start: int,
    stop: int | None = None,
    mode: TokenSpec = "cls",
) -> Tensor:
    """Image embeddings with layers start..stop-1 replaced for the tokens of `mode`.

    The straightforward way: one run from layer 0, encoding every layer's tokens on the
    way. `cascade` gives the same numbers for many starts at a fraction of the cost.

    Args:
        teacher: Teacher (embed, run_blocks, head, n_layers, tokens_per_image).
        clt: CLT (encode_layer, decode_target, n_layers, d_model).
        images: [N, 3, H, W] preprocessed images.
        start: First replaced layer s (start == stop replaces nothing).
        stop: One past the last replaced layer (default L).
        mode: Token mode or explicit positions (empty replaces nothing).

    Returns:
        [N, E] image embeddings (not normalised), float32.
    """
    check_compatible(teacher, clt)
    stop = teacher.n_layers if stop is None else stop
    _check_window(start, stop, teacher.n_layers)
    h = teacher.embed(images)
    positions = token_positions(mode, layout_of(teacher))
    if start == stop or positions.numel() == 0:
        return teacher.head(teacher.run_blocks(h).h).float()
    replacer = Replacer(clt, indexer(positions), start, stop)
    return teacher.head(teacher.run_blocks(h, override=replacer).h).float()


# ---------------------------------------------------------------------- shared clean prefix


@dataclass
class CleanPrefix:
    """The clean run of one image batch, shared by every start and mode.

    Attributes:
        h: L + 1 residuals [N, T, d]; h[l] enters block l, h[L] leaves the last block.
        codes: L clean codes of the union tokens, [N, T_U, F].
        y_hat: L teacher-forced reconstructions of the union tokens, [N, T_U, d].
        positions: int64 [T_U] token positions of the union.
        x: L MLP inputs of every token [N, T, d] (`record_all=True`), else None.
        y: L MLP outputs of every token [N, T, d] (`record_all=True`), else None.
    """

    h: list[Tensor]
    codes: list[Tensor]
    y_hat: list[Tensor]
    positions: Tensor
    x: list[Tensor] | None = None
    y: list[Tensor] | None = None


@torch.no_grad()
def clean_prefix(
    teacher: Any,
    clt: Any,
    images: Tensor,
    positions: Tensor,
    n_code_layers: int | None = None,
    record_all: bool = False,
) -> CleanPrefix:
    """Run the clean teacher once, keeping what every replacement start needs.

    Args:
        teacher: Teacher.
        clt: CLT.
        images: [N, 3, H, W] preprocessed images.
        positions: int64 [T_U] token positions to encode (the union of the modes').
        n_code_layers: Encode and decode only layers below this (default: all L).
        record_all: Also keep every layer's MLP input and output for every token (what
            `Teacher.capture` returns), so other metrics need no second teacher run.

    Returns:
        The `CleanPrefix` (`codes` and `y_hat` hold `n_code_layers` entries).
    """
    dtype, index = clt_dtype(clt), indexer(positions)
    n_code_layers = teacher.n_layers if n_code_layers is None else n_code_layers
    h = teacher.embed(images)
    hs, codes, y_hats = [h], [], []
    xs: list[Tensor] | None = [] if record_all else None
    ys: list[Tensor] | None = [] if record_all else None
    for layer in range(teacher.n_layers):
        record = record_all or layer < n_code_layers
        out = teacher.run_blocks(h, layer, layer + 1, record=record)
        if layer < n_code_layers and positions.numel():
            codes.append(clt.encode_layer(layer, out.x[0][:, index].to(dtype)))
            y_hats.append(clt.decode_target(layer, codes))
        if record_all:
            xs.append(out.x[0])
            ys.append(out.y[0])
        h = out.h
        hs.append(h)
    return CleanPrefix(hs, codes, y_hats, positions, xs, ys)


def relative_index(union: Tensor, positions: Tensor) -> slice | Tensor:
    """Indexer of `positions` inside the union's T_U axis."""
    return indexer(torch.searchsorted(union, positions))


class IncrementalReplacer:
    """Replacement override for CLTs with an affine decoder, decoding only what changed.

    For start s, y_hat_l of the modified run differs from the clean teacher-forced
    reconstruction only through the codes that changed (layers s+1..l), and the decoder
    is affine (`y_hat_l = (b_dec[l] + sum_i z_i W_dec[i->l]) / output_scale[l]`), so

        y_hat_l = y_hat_l^clean + sum_{i=s+1}^{l} (z_i - z_i^clean) W_dec[i->l] / output_scale[l].

    Each new code is decoded once into every later target (one matmul per source), which
    costs (l - s) decoder blocks per target instead of l + 1.

    Args:
        clt: A CLT with `encode_layer`, `W_dec` (W_dec[s]: [F, L - s, d]) and
            `output_scale` [L], as `CrossLayerTranscoder`.
        index: Token indexer into the T axis.
        start: First replaced layer s (the window runs to L-1).
        clean_codes: L clean codes of the replaced tokens, [N, T_M, F].
        clean_y_hat: L clean reconstructions of the replaced tokens, [N, T_M, d].
    """

    def __init__(
        self,
        clt: Any,
        index: slice | Tensor,
        start: int,
        clean_codes: Sequence[Tensor],
        clean_y_hat: Sequence[Tensor],
    ) -> None:
        self.clt, self.index, self.start = clt, index, start
        self.clean_codes, self.clean_y_hat = clean_codes, clean_y_hat
        self.delta: Tensor | None = None  # scaled-space change [N, T_M, L, d]
        self.dtype = clt_dtype(clt)

    def _add_source(self, layer: int, x: Tensor) -> None:
        z = self.clt.encode_layer(layer, x[:, self.index].to(self.dtype))
        w_dec = self.clt.W_dec[layer]  # [F, L - layer, d]
        term = decode_rows(z - self.clean_codes[layer], w_dec.reshape(w_dec.shape[0], -1))
        term = term.unflatten(-1, tuple(w_dec.shape[1:]))  # [N, T_M, L - layer, d]
        if self.delta is None:
            n_layers = self.clt.n_layers
            self.delta = term.new_zeros(*term.shape[:2], n_layers, term.shape[-1])
        self.delta[:, :, layer:] += term

    def __call__(self, layer: int, x: Tensor, y: Tensor) -> Tensor:
        """The MLP output to use at `layer` (x, y [N, T, d]); see `MLPOverride`."""
        if layer < self.start:
            return y
        y_hat = self.clean_y_hat[layer]
        if layer > self.start:
            self._add_source(layer, x)
            y_hat = y_hat + self.delta[:, :, layer] / self.clt.output_scale[layer]
        y = y.clone()
        y[:, self.index] = y_hat.to(y.dtype)
        return y


SPARSE_RATIO = 8
"""`decode_rows` gathers rows when nnz * SPARSE_RATIO <= the dense matmul's row count."""


def decode_rows(codes: Tensor, table: Tensor) -> Tensor:
    """`codes @ table`, gathering only the table rows of non-zero codes when that is cheaper.

    A code difference z - z_clean of TopK codes has at most 2k non-zeros of F, so a
    weighted row gather (`F.embedding_bag`) does 2k/F of the dense matmul's work.

    Args:
        codes: [..., F] mostly-zero codes.
        table: [F, D] decoder rows.

    Returns:
        [..., D] in the table's dtype.
    """
    flat = codes.reshape(-1, codes.shape[-1]).to(table.dtype)
    rows, cols = torch.nonzero(flat, as_tuple=True)  # row-major: rows ascending
    if cols.numel() * SPARSE_RATIO > flat.numel():
        out = flat @ table
    else:
        counts = torch.bincount(rows, minlength=flat.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        weights = flat[rows, cols]
        out = F.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=weights)
    return out.reshape(*codes.shape[:-1], table.shape[-1])


def has_affine_decoder(clt: Any) -> bool:
    """Whether the CLT exposes the documented affine decoder (W_dec, b_dec, output_scale)."""
    return all(hasattr(clt, name) for name in ("W_dec", "b_dec", "output_scale"))


@torch.no_grad()
def replaced_from_prefix(
    teacher: Any,
    clt: Any,
    prefix: CleanPrefix,
    start: int,
    positions: Tensor,
    incremental: bool | None = None,
) -> Tensor:
    """Embeddings for window start..L-1 on `positions`, continuing a clean prefix.

    Args:
        teacher: Teacher.
        clt: CLT.
        prefix: The batch's clean prefix (its union must contain `positions`).
        start: First replaced layer s (L replaces nothing).
        positions: int64 [T_M] replaced token positions.
        incremental: Decode only the change in codes (`IncrementalReplacer`); None uses
            it whenever the CLT has an affine decoder (`has_affine_decoder`).

    Returns:
        [N, E] image embeddings, float32.
    """
    n_layers = teacher.n_layers
    if start >= n_layers or positions.numel() == 0:
        return teacher.head(prefix.h[n_layers]).float()
    rel = relative_index(prefix.positions, positions)
    index = indexer(positions)
    if incremental is None:
        incremental = has_affine_decoder(clt)
    if incremental:
        codes = [z[:, rel] for z in prefix.codes]
        y_hats = [y[:, rel] for y in prefix.y_hat]
        override: Any = IncrementalReplacer(clt, index, start, codes, y_hats)
    else:
        codes = [z[:, rel] for z in prefix.codes[: start + 1]]
        first = prefix.y_hat[start][:, rel]
        override = Replacer(clt, index, start, n_layers, codes=codes, first_y_hat=first)
    return teacher.head(teacher.run_blocks(prefix.h[start], start, override=override).h).float()


# ---------------------------------------------------------------------- the cascade


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
        token_positions(mode, layout_of(teacher))  # raises for names the model lacks
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
        modes: Sequence[str] = TOKEN_MODES,
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
        self.positions = {m: token_positions(m, layout) for m in self.modes}
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
    modes: Sequence[str] = TOKEN_MODES,
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


# ---------------------------------------------------------------------- oracle


class OracleCLT:
    """A CLT stand-in that returns the teacher's true MLP output (for tests).

    `encode_layer` stashes x itself as the "code" (z_l := x_l, so F = d) and
    `decode_target` applies the teacher's MLP to it (after LN2 when the teacher reads x at
    "ln2_in"). Replacing with it must reproduce the teacher for every window and mode.

    Args:
        teacher: The teacher whose MLPs to return.
    """

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher
        self.n_layers = int(teacher.n_layers)
        self.d_model = int(teacher.d_model)
        self.n_latents = self.d_model
        self.dtype = teacher.dtype

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """The code of layer `layer` is its input, unchanged: [..., d] -> [..., d]."""
        return x

    def decode_target(self, target: int, z: Sequence[Tensor]) -> Tensor:
        """The teacher's MLP output at `target` for the stashed input z[target]."""
        return self.teacher.mlp_output(target, z[target])


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


__all__ = [
    "TOKEN_MODES",
    "CascadeAccumulator",
    "CascadeResult",
    "CleanPrefix",
    "OracleCLT",
    "IncrementalReplacer",
    "Replacer",
    "cascade",
    "cascade_table",
    "check_compatible",
    "clean_prefix",
    "compare_table",
    "decode_rows",
    "has_affine_decoder",
    "indexer",
    "relative_index",
    "replaced_from_prefix",
    "rows_to_markdown",
    "run_replaced",
    "token_positions",
    "window_label",
    "write_cascade_tables",
]
