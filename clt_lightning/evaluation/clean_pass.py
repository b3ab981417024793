"""One clean teacher pass feeding the cascade, the contribution scores and reconstruction.

Cascaded replacement, contribution scores and reconstruction metrics all start from the
clean (unmodified) teacher run of the same images: the cascade needs the residual entering
every layer and the clean codes z_l and reconstructions y_hat_l of the replaced tokens, the
other two need every token's z_l, y_hat_l and true MLP output y_l. Running the teacher
once per batch serves all three. When the cascade's modes cover every token (the default
cls, patches, all), its clean codes and reconstructions are those of every token, so the
contribution scores and the reconstruction metrics reuse them instead of encoding and
decoding again; otherwise they encode the recorded x_l themselves. Ablations rank sources
by the finished contribution scores, so they run a second pass
(`evaluation.ablations.ablate`). The numbers equal those of separate passes per metric
(`tests/unit/test_suite.py`: cascade and ablation counts exactly, the rest to float
rounding, since codes and reconstructions come from per-layer instead of whole-token
matrix products).

Memory per batch: the clean prefix (L + 1 residuals, dense clean codes of the replaced
tokens) plus x and y of every token, 2 * N * T * L * d values, the same as
`Teacher.capture`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_lightning.evaluation.cascade import CascadeAccumulator, split_batch
from clt_lightning.evaluation.contributions import ContributionAccumulator
from clt_lightning.evaluation.replacement import clean_prefix
from clt_lightning.evaluation.undefined import Undefined
from clt_lightning.metrics import ReconstructionMetrics
from clt_lightning.tokens import CLIP_LAYOUT, TokenLayout

log = logging.getLogger(__name__)


@dataclass
class ReconstructionAccumulator:
    """Per-layer reconstruction metrics of every token group the teacher has.

    The suite runs on one rank (the others wait at a barrier), so the metrics never
    all-gather.

    Args:
        n_layers: L.
        d_model: d.
        layout: The teacher's token layout (its groups are scored, `layout.mask` picks them).
    """

    n_layers: int
    d_model: int
    layout: TokenLayout = CLIP_LAYOUT
    metrics: dict[str, ReconstructionMetrics] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.metrics = {
            g: ReconstructionMetrics(self.n_layers, self.d_model, sync_on_compute=False)
            for g in self.layout.groups
        }

    def add(self, y_hat: Tensor, y: Tensor, l0: Tensor, token: Tensor) -> None:
        """Add tokens: y_hat, y [B, L, d] raw, l0 [B, L], token [B] position in the image."""
        for group, metric in self.metrics.items():
            mask = self.layout.mask(group, token)
            metric.update(y_hat[mask], y[mask], l0[mask])

    def payload(self) -> dict[str, dict]:
        """group -> metric ("mse", "r2", "cosine", "l0") -> per-layer list; a metric the
        group's token count leaves undefined (0 tokens; R^2 with fewer than 2) is
        `Undefined`."""
        return {g: defined_reconstruction(m) for g, m in self.metrics.items()}


def defined_reconstruction(metric: ReconstructionMetrics) -> dict[str, list]:
    """metric -> per-layer list of `metric.compute()`, `Undefined` where the token count
    says so: every metric with 0 tokens, R^2 (a variance) with fewer than 2."""
    n = int(metric.count)
    values = {k: v.tolist() for k, v in metric.compute().items()}
    for name, per_layer in values.items():
        if n == 0 or (name == "r2" and n < 2):
            reason = f"{name} needs {'2 tokens' if name == 'r2' else 'a token'}, the group has {n}"
            values[name] = [Undefined(reason)] * len(per_layer)
    return values


@torch.no_grad()
def update_reconstruction(
    metrics: ReconstructionAccumulator, clt: Any, x: Tensor, y: Tensor
) -> None:
    """Add whole images' teacher-forced reconstructions to the per-group metrics.

    Args:
        metrics: The accumulator.
        clt: The CLT (its forward: raw x [B, L, d] -> output with `y_hat`, `encoding.z`).
        x: MLP inputs [N, T, L, d] (any float dtype; read in float32).
        y: MLP outputs [N, T, L, d].
    """
    device = next(clt.parameters()).device
    n, t = x.shape[:2]
    x, y = x.flatten(0, 1).to(device).float(), y.flatten(0, 1).to(device).float()
    out = clt(x)
    l0 = (out.encoding.z != 0).sum(-1)
    metrics.add(out.y_hat, y, l0, torch.arange(t, device=device).repeat(n))


@torch.no_grad()
def update_reconstruction_from_codes(
    metrics: ReconstructionAccumulator,
    codes: list[Tensor],
    y_hat: list[Tensor],
    y: list[Tensor],
) -> None:
    """`update_reconstruction` from already computed codes and reconstructions.

    Args:
        metrics: The accumulator.
        codes: L codes of every token, each [N, T, F].
        y_hat: L raw reconstructions of every token, each [N, T, d].
        y: L true MLP outputs, each [N, T, d].
    """
    device = y_hat[0].device
    n, t = y_hat[0].shape[:2]
    l0 = torch.stack([(z != 0).sum(-1) for z in codes], dim=2).flatten(0, 1)  # [N*T, L]
    y_hat_all = torch.stack(y_hat, dim=2).flatten(0, 1).float()  # [N*T, L, d]
    y_all = torch.stack(y, dim=2).flatten(0, 1).to(device).float()
    metrics.add(y_hat_all, y_all, l0, torch.arange(t, device=device).repeat(n))


@torch.no_grad()
def shared_clean_pass(
    teacher: Any,
    clt: Any,
    batches: Iterable[Any],
    cascade: CascadeAccumulator,
    contributions: ContributionAccumulator,
    reconstruction: ReconstructionAccumulator,
    progress: bool = False,
) -> None:
    """Run the clean teacher once per batch and feed all three accumulators.

    Args:
        teacher: The frozen `Teacher`.
        clt: The CLT (eval mode), fitting the teacher.
        batches: (images [N, 3, H, W], labels [N], ...) batches.
        cascade: Counts the cascaded replacement (its `union` tokens are encoded).
        contributions: Sums the contribution scores of every token.
        reconstruction: Reconstruction metrics per token group.
        progress: Show a progress bar over batches.
    """
    for batch in tqdm(batches, desc="clean teacher pass", unit="batch", disable=not progress):
        images, labels = split_batch(batch)
        if labels.shape[0] == 0:
            continue
        prefix = clean_prefix(teacher, clt, images, cascade.union, record_all=True)
        cascade.update(prefix, labels.cpu())
        if prefix.positions.numel() == prefix.h[0].shape[1]:  # every token already encoded
            contributions.update_image_codes(clt, prefix.codes, prefix.y_hat)
            update_reconstruction_from_codes(reconstruction, prefix.codes, prefix.y_hat, prefix.y)
        else:  # a mode subset ([CLS] only, say): encode every token here
            x, y = torch.stack(prefix.x, dim=2), torch.stack(prefix.y, dim=2)  # [N, T, L, d]
            contributions.update_images(clt, x)
            update_reconstruction(reconstruction, clt, x, y)
