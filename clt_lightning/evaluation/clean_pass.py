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
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clt_lightning.evaluation.contributions import ContributionAccumulator
from clt_lightning.evaluation.replacement import CascadeAccumulator, clean_prefix, split_batch
from clt_lightning.metrics import ReconstructionMetrics

log = logging.getLogger(__name__)

RECONSTRUCTION_GROUPS: tuple[str, ...] = ("all", "cls", "patches")
"""Token groups of the reconstruction metrics: every token, [CLS] (token 0), patch tokens."""


def reconstruction_accumulators(n_layers: int, d_model: int) -> dict[str, ReconstructionMetrics]:
    """One `ReconstructionMetrics` per token group, computed on this process only.

    The suite runs on one rank (the others wait at a barrier), so the metrics never
    all-gather.
    """
    return {
        g: ReconstructionMetrics(n_layers, d_model, sync_on_compute=False)
        for g in RECONSTRUCTION_GROUPS
    }


@torch.no_grad()
def update_reconstruction(
    metrics: dict[str, ReconstructionMetrics], clt: Any, x: Tensor, y: Tensor
) -> None:
    """Add whole images' teacher-forced reconstructions to the per-group metrics.

    Args:
        metrics: `reconstruction_accumulators(...)`.
        clt: The CLT (its forward: raw x [B, L, d] -> output with `y_hat`, `encoding.z`).
        x: MLP inputs [N, T, L, d] (any float dtype; read in float32).
        y: MLP outputs [N, T, L, d].
    """
    device = next(clt.parameters()).device
    n, t = x.shape[:2]
    x, y = x.flatten(0, 1).to(device).float(), y.flatten(0, 1).to(device).float()
    out = clt(x)
    l0 = (out.encoding.z != 0).sum(-1)
    is_cls = (torch.arange(t, device=device) == 0).repeat(n)
    metrics["all"].update(out.y_hat, y, l0)
    metrics["cls"].update(out.y_hat[is_cls], y[is_cls], l0[is_cls])
    metrics["patches"].update(out.y_hat[~is_cls], y[~is_cls], l0[~is_cls])


@torch.no_grad()
def update_reconstruction_from_codes(
    metrics: dict[str, ReconstructionMetrics],
    codes: list[Tensor],
    y_hat: list[Tensor],
    y: list[Tensor],
) -> None:
    """`update_reconstruction` from already computed codes and reconstructions.

    Args:
        metrics: `reconstruction_accumulators(...)`.
        codes: L codes of every token, each [N, T, F].
        y_hat: L raw reconstructions of every token, each [N, T, d].
        y: L true MLP outputs, each [N, T, d].
    """
    device = y_hat[0].device
    n, t = y_hat[0].shape[:2]
    l0 = torch.stack([(z != 0).sum(-1) for z in codes], dim=2).flatten(0, 1)  # [N*T, L]
    y_hat_all = torch.stack(y_hat, dim=2).flatten(0, 1).float()  # [N*T, L, d]
    y_all = torch.stack(y, dim=2).flatten(0, 1).to(device).float()
    is_cls = (torch.arange(t, device=device) == 0).repeat(n)
    metrics["all"].update(y_hat_all, y_all, l0)
    metrics["cls"].update(y_hat_all[is_cls], y_all[is_cls], l0[is_cls])
    metrics["patches"].update(y_hat_all[~is_cls], y_all[~is_cls], l0[~is_cls])


def reconstruction_payload(metrics: dict[str, ReconstructionMetrics]) -> dict[str, dict]:
    """group -> metric ("mse", "r2", "cosine", "l0") -> per-layer list of floats."""
    return {g: {k: v.tolist() for k, v in m.compute().items()} for g, m in metrics.items()}


@torch.no_grad()
def shared_clean_pass(
    teacher: Any,
    clt: Any,
    batches: Iterable[Any],
    cascade: CascadeAccumulator,
    contributions: ContributionAccumulator,
    reconstruction: dict[str, ReconstructionMetrics],
    progress: bool = False,
) -> None:
    """Run the clean teacher once per batch and feed all three accumulators.

    Args:
        teacher: The frozen `Teacher`.
        clt: The CLT (eval mode), fitting the teacher.
        batches: (images [N, 3, H, W], labels [N], ...) batches.
        cascade: Counts the cascaded replacement (its `union` tokens are encoded).
        contributions: Sums the contribution scores of every token.
        reconstruction: `reconstruction_accumulators(...)`.
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
