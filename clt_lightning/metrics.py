"""Per-layer reconstruction metrics as torchmetrics, correct under DDP.

Every statistic is kept as a *sum* (float64) and reduced across ranks with `sum`, then the
ratios are formed once in `compute()`. Averaging per-rank R^2 values would be wrong: R^2 is
a ratio of sums, so it must be built from summed statistics.

Definitions (per layer l, over the N tokens seen; y and y_hat in the original space):
- mse    = sum ||y_hat - y||^2 / (N * d)                          (per element)
- r2     = 1 - sum ||y_hat - y||^2 / sum ||y - mean(y)||^2        (variance explained)
- cosine = mean_t cos(y_hat_t, y_t)
- l0     = mean_t #{i : z_ti != 0}                                (active latents per token)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

METRIC_NAMES = ("mse", "r2", "cosine", "l0")


class ReconstructionMetrics(Metric):
    """Streaming per-layer MSE, R^2, cosine and L0.

    Args:
        n_layers: Number of layers L.
        d_model: Width d of the reconstructed activations.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, n_layers: int, d_model: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_layers = n_layers
        self.d_model = d_model
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.add_state("count", zeros(()), dist_reduce_fx="sum")
        self.add_state("sse", zeros(n_layers), dist_reduce_fx="sum")
        self.add_state("sum_y", zeros(n_layers, d_model), dist_reduce_fx="sum")
        self.add_state("sum_sq_y", zeros(n_layers), dist_reduce_fx="sum")
        self.add_state("sum_cos", zeros(n_layers), dist_reduce_fx="sum")
        self.add_state("sum_l0", zeros(n_layers), dist_reduce_fx="sum")

    def update(self, y_hat: Tensor, y: Tensor, l0: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            y_hat: Reconstruction [B, L, d].
            y: Target [B, L, d].
            l0: Active latents per token and layer [B, L], or None.
        """
        if y.shape[0] == 0:
            return
        y_hat, y = y_hat.double(), y.double()
        self.count += y.shape[0]
        self.sse += (y_hat - y).pow(2).sum(dim=(0, 2))
        self.sum_y += y.sum(dim=0)
        self.sum_sq_y += y.pow(2).sum(dim=(0, 2))
        self.sum_cos += torch.nn.functional.cosine_similarity(y_hat, y, dim=-1, eps=1e-12).sum(0)
        if l0 is not None:
            self.sum_l0 += l0.double().sum(dim=0)

    def compute(self) -> dict[str, Tensor]:
        """Return {"mse", "r2", "cosine", "l0"}, each [L] float64 (NaN before any update)."""
        n = self.count
        total_var = self.sum_sq_y - self.sum_y.pow(2).sum(-1) / n
        return {
            "mse": self.sse / (n * self.d_model),
            "r2": 1.0 - self.sse / total_var,
            "cosine": self.sum_cos / n,
            "l0": self.sum_l0 / n,
        }


def flatten_layer_metrics(prefix: str, values: dict[str, Tensor], group: str | None = None) -> dict:
    """Turn {"r2": [L]} into {"val/r2/cls/layer_03": ..., "val/r2/cls/mean": ...}.

    Args:
        prefix: Stage namespace, e.g. "val".
        values: Metric name -> per-layer tensor [L].
        group: Token group ("cls", "registers", "patches") or None for all tokens.

    Returns:
        Flat dict of python floats keyed by namespaced metric name.
    """
    out: dict[str, float] = {}
    for name, per_layer in values.items():
        base = f"{prefix}/{name}" + (f"/{group}" if group else "")
        finite = per_layer[torch.isfinite(per_layer)]
        for layer, value in enumerate(per_layer.tolist()):
            out[f"{base}/layer_{layer:02d}"] = value
        out[f"{base}/mean"] = finite.mean().item() if finite.numel() else float("nan")
    return out
