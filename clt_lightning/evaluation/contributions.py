"""Cross-layer contribution ("projection") scores C[s, l], per token group, with a bias row.

For token t, source s and target l (raw space, teacher-forced inputs):

    c_t[s->l] = z_s W_dec[s->l] / output_scale[l]          (`CrossLayerTranscoder.contributions`)
    b_t[l]    = y_hat_t[l] - sum_s c_t[s->l]                  (the bias, b_dec[l] / output_scale[l])
    p_t[s, l] = <c_t[s->l], y_hat_t[l]> / ||y_hat_t[l]||^2    (row L holds the bias' share)
    C[s, l]   = mean over images of (1/T_M) sum_{t in M} p_t[s, l]

Because sum_s c_t[s->l] + b_t[l] = y_hat_t[l], every column of p_t sums to 1, hence so does
every column of C. Negative entries are destructive contributions.

Design decisions:

- The bias is computed as y_hat minus the source terms rather than read from b_dec, so
  the identity "columns sum to 1" holds for any scaling convention and is testable.
- Dot products are taken in float64; tokens are processed in chunks so the
  [chunk, L, L, d] term tensor stays small.
- Tokens with ||y_hat_t[l]||^2 = 0 are undefined for target l and left out of that
  column's average (counted and logged); an image with no valid token for a target is
  left out of that target's image mean.
- Aggregation is keyed by image id, so shuffled token batches (the activation cache's
  token batch of docs/architecture.md) and whole-image batches (`Teacher.capture`) give the same numbers.
- Token groups are those of the teacher's `TokenLayout` ("cls", "registers", "patches",
  and "all", which ranks sources for the all-token ablation); a model without [CLS]
  (SigLIP) has no "cls" scores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.replacement import check_compatible, clt_dtype
from clt_lightning.evaluation.token_modes import GROUP_ORDER
from clt_lightning.tokens import CLIP_LAYOUT, TokenLayout, layout_of

logger = logging.getLogger(__name__)


@dataclass
class ContributionScores:
    """Contribution scores per token group.

    Attributes:
        n_layers: L.
        scores: group -> [L + 1, L] float64; rows = source layer s (row L = bias),
            columns = target layer l; zero where s > l (no decoder block).
        n_images: group -> [L] int64, images averaged in each target column (a column
            no image defines, because ||y_hat||^2 = 0 for all its tokens, is NaN).
        per_image: group -> [N, L + 1, L] float64 per-image values (NaN where an image has
            no valid token), when requested; row i is image id i.
    """

    n_layers: int
    scores: dict[str, Tensor]
    n_images: dict[str, Tensor]
    per_image: dict[str, Tensor] | None = None

    def sources(self, group: str) -> Tensor:
        """[L, L] source rows of `group` (bias row dropped)."""
        return self.scores[group][: self.n_layers]

    def bias(self, group: str) -> Tensor:
        """[L] the bias row of `group`."""
        return self.scores[group][self.n_layers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: {"n_layers", "scores": {group: rows}, "n_images": {group: list}}."""
        return {
            "n_layers": self.n_layers,
            "scores": {g: s.tolist() for g, s in self.scores.items()},
            "n_images": {g: n.tolist() for g, n in self.n_images.items()},
        }


@torch.no_grad()
def token_projection_scores(clt: Any, x: Tensor, chunk_size: int = 256) -> Tensor:
    """Per-token projection scores p_t[s, l] with the bias as row L.

    Args:
        clt: CLT with `n_layers`, `encode_layer`, `decode` and `contributions`.
        x: Teacher-forced raw MLP inputs [B, L, d].
        chunk_size: Tokens per chunk (memory ~ chunk * L^2 * d * 8 bytes).

    Returns:
        [B, L + 1, L] float64; NaN where ||y_hat_t[l]||^2 = 0; zero where s > l.
    """
    n_layers = clt.n_layers
    dtype = clt_dtype(clt)
    out = []
    for part in x.split(chunk_size):
        part = part.to(dtype)
        z = torch.stack([clt.encode_layer(i, part[:, i]) for i in range(n_layers)], dim=1)
        out.append(projection_scores(clt, z, clt.decode(z)))
    return torch.cat(out) if out else x.new_zeros(0, n_layers + 1, n_layers, dtype=torch.float64)


@torch.no_grad()
def projection_scores(clt: Any, z: Tensor, y_hat: Tensor) -> Tensor:
    """p_t[s, l] (bias as row L) from known codes and their reconstruction.

    Args:
        clt: CLT with `contributions`.
        z: Codes [B, L, F] of teacher-forced inputs.
        y_hat: Their raw reconstruction [B, L, d] (`clt.decode(z)`).

    Returns:
        [B, L + 1, L] float64; NaN where ||y_hat_t[l]||^2 = 0; zero where s > l.
    """
    terms = clt.contributions(z).double()  # [b, L_src, L_tgt, d]
    y_hat = y_hat.double()
    bias = y_hat - terms.sum(dim=1)
    norm2 = y_hat.pow(2).sum(dim=-1)  # [b, L_tgt]
    rows = torch.cat([terms, bias[:, None]], dim=1)  # [b, L + 1, L, d]
    proj = torch.einsum("bstd,btd->bst", rows, y_hat) / norm2[:, None, :]
    proj[(norm2 <= 0)[:, None, :].expand_as(proj)] = float("nan")
    return proj


@dataclass
class ContributionAccumulator:
    """Streaming per-image sums of projection scores, reduced by `compute`.

    Args:
        n_layers: L.
        groups: Token groups to score (default: every group the layout has).
        keep_per_image: Also return per-image values from `compute`.
        chunk_size: Tokens per chunk in `token_projection_scores`.
        layout: The teacher's token layout (default: `CLIP_LAYOUT`).
    """

    n_layers: int
    groups: tuple[str, ...] | None = None
    keep_per_image: bool = False
    chunk_size: int = 256
    layout: TokenLayout = CLIP_LAYOUT
    _sums: dict[str, Tensor] = field(default_factory=dict, init=False)
    _counts: dict[str, Tensor] = field(default_factory=dict, init=False)
    _next_image: int = field(default=0, init=False)
    _n_undefined: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = tuple(g for g in GROUP_ORDER if g in self.layout.groups)
        for group in self.groups:
            self.layout.check(group, "contribution token group")
        shape = (0, self.n_layers + 1, self.n_layers)
        for group in self.groups:
            self._sums[group] = torch.zeros(shape, dtype=torch.float64)
            self._counts[group] = torch.zeros(0, self.n_layers, dtype=torch.float64)

    def _grow(self, n_images: int) -> None:
        for group in self.groups:
            have = self._sums[group].shape[0]
            if n_images > have:
                extra = max(n_images, 2 * have) - have
                pad = self._sums[group].new_zeros(extra, *self._sums[group].shape[1:])
                self._sums[group] = torch.cat([self._sums[group], pad])
                pad = self._counts[group].new_zeros(extra, self.n_layers)
                self._counts[group] = torch.cat([self._counts[group], pad])

    def update(self, clt: Any, x: Tensor, token: Tensor, image: Tensor) -> None:
        """Add a token batch (docs/architecture.md: shuffled tokens of many images).

        Args:
            clt: The CLT.
            x: Raw MLP inputs [B, L, d] (teacher-forced).
            token: int64 [B] position in the image (0 = [CLS]).
            image: int64 [B] image index in its split.
        """
        if x.shape[0] == 0:
            return
        self.add_scores(token_projection_scores(clt, x, self.chunk_size), token, image)

    def add_scores(self, proj: Tensor, token: Tensor, image: Tensor) -> None:
        """Add per-token projection scores.

        Args:
            proj: [B, L + 1, L] from `token_projection_scores` / `projection_scores`.
            token: int64 [B] position in the image (0 = [CLS]).
            image: int64 [B] image index in its split.
        """
        if proj.shape[0] == 0:
            return
        proj = proj.cpu()
        valid = ~torch.isnan(proj[:, 0])  # [B, L]: the target is defined for this token
        self._n_undefined += int((~valid).sum())
        proj = torch.nan_to_num(proj, nan=0.0)
        token, image = token.cpu().long(), image.cpu().long()
        self._grow(int(image.max()) + 1)
        for group in self.groups:
            mask = self.layout.mask(group, token)
            self._sums[group].index_add_(0, image[mask], proj[mask])
            self._counts[group].index_add_(0, image[mask], valid[mask].double())
        self._next_image = max(self._next_image, int(image.max()) + 1)

    def update_images(self, clt: Any, x: Tensor) -> None:
        """Add whole images (e.g. `Teacher.capture(images).x`); ids continue from the last.

        Args:
            clt: The CLT.
            x: Raw MLP inputs [N, T, L, d].
        """
        n_images, n_tokens = x.shape[:2]
        token, image = self._image_ids(n_images, n_tokens)
        self.update(clt, x.reshape(n_images * n_tokens, *x.shape[2:]), token, image)

    def update_image_codes(self, clt: Any, codes: list[Tensor], y_hat: list[Tensor]) -> None:
        """Add whole images from their already computed codes; ids continue from the last.

        The same numbers as `update_images` on the inputs the codes were encoded from,
        without encoding and decoding again (`evaluation.clean_pass` has them).

        Args:
            clt: The CLT.
            codes: L codes of every token, each [N, T, F].
            y_hat: L raw reconstructions of every token, each [N, T, d].
        """
        n_images, n_tokens = codes[0].shape[:2]
        token, image = self._image_ids(n_images, n_tokens)
        flat_z = [z.reshape(n_images * n_tokens, -1) for z in codes]
        flat_y = [y.reshape(n_images * n_tokens, -1) for y in y_hat]
        for start in range(0, n_images * n_tokens, self.chunk_size):
            part = slice(start, start + self.chunk_size)
            z = torch.stack([c[part] for c in flat_z], dim=1)  # [b, L, F]
            proj = projection_scores(clt, z, torch.stack([y[part] for y in flat_y], dim=1))
            self.add_scores(proj, token[part], image[part])

    def _image_ids(self, n_images: int, n_tokens: int) -> tuple[Tensor, Tensor]:
        token = torch.arange(n_tokens).repeat(n_images)
        image = torch.arange(n_images).repeat_interleave(n_tokens) + self._next_image
        return token, image

    def compute(self) -> ContributionScores:
        """Mean over images of the per-image token means.

        Returns:
            The `ContributionScores` (groups without any token are left out).

        Raises:
            ConfigError: No token was ever added (empty evaluation set).
        """
        if self._n_undefined:
            logger.warning("%d (token, target) pairs had ||y_hat||^2 = 0", self._n_undefined)
        scores, n_images, per_image = {}, {}, {}
        for group in self.groups:
            counts = self._counts[group]  # [N, L]
            has = counts > 0
            if not bool(has.any()):
                logger.info("no tokens of group %r: its contribution scores are skipped", group)
                continue
            means = self._sums[group] / counts.clamp_min(1)[:, None, :]
            means[(~has)[:, None, :].expand_as(means)] = float("nan")
            n = has.sum(dim=0)  # [L]
            score = torch.nansum(means, dim=0) / n.clamp_min(1)
            score[:, n == 0] = float("nan")  # no image defines this target
            scores[group] = score
            n_images[group] = n
            per_image[group] = means
        if not scores:
            raise ConfigError(
                "no tokens were scored: the evaluation set is empty (0 images); check the "
                "dataset root, split and max_images"
            )
        keep = per_image if self.keep_per_image else None
        return ContributionScores(self.n_layers, scores, n_images, keep)


def _split_images(batch: Any) -> Tensor:
    if isinstance(batch, Mapping):
        return batch["images"]
    return batch[0] if isinstance(batch, list | tuple) else batch


@torch.no_grad()
def contribution_scores(
    teacher: Any,
    clt: Any,
    images_batches: Iterable[Any],
    groups: tuple[str, ...] | None = None,
    keep_per_image: bool = False,
    progress: bool = False,
) -> ContributionScores:
    """C[s, l] per token group over an image set, with teacher-forced inputs.

    Args:
        teacher: Teacher with `capture(images) -> (x [N, T, L, d], y)`.
        clt: The CLT (must fit the teacher).
        images_batches: Iterable of image batches [N, 3, H, W] or (images, labels, ...).
        groups: Token groups to score (default: every group the teacher has).
        keep_per_image: Keep per-image values.
        progress: Show a progress bar.

    Returns:
        The `ContributionScores`.

    Raises:
        CheckpointMismatchError: The CLT does not fit the teacher.
        ConfigError: The image set is empty.
    """
    check_compatible(teacher, clt)
    acc = ContributionAccumulator(clt.n_layers, groups, keep_per_image, layout=layout_of(teacher))
    for batch in tqdm(images_batches, desc="contributions", disable=not progress):
        acc.update_images(clt, teacher.capture(_split_images(batch)).x)
    return acc.compute()
