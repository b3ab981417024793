"""One clean teacher pass feeding the cascade, the contribution scores and reconstruction.

Cascaded replacement, contribution scores and reconstruction metrics all start from the
clean (unmodified) teacher run of the same images: the cascade needs the residual entering
every layer, the other two need every layer's MLP input x_l and output y_l. Running the
teacher once per batch and handing the same tensors to all three gives the numbers of
three separate runs (the same operations on the same inputs; `tests/unit/test_suite.py`
checks equality) at a third of the teacher cost. Ablations rank sources by the
contribution scores, so they need the finished scores and run a second pass
(`evaluation.ablations.ablate`).

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
        x, y = torch.stack(prefix.x, dim=2), torch.stack(prefix.y, dim=2)  # [N, T, L, d]
        del prefix
        contributions.update_images(clt, x)
        update_reconstruction(reconstruction, clt, x, y)
