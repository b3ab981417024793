"""The JumpReLU sparsifier (`jumprelu`) and its straight-through estimators.

Design decisions:
- JumpReLU's threshold is a raw parameter, not a log-threshold: under Adam every step moves
  a parameter by about the learning rate, so a log-threshold moves the threshold by a
  relative lr (~2e-4 of itself) per step and barely changes during training.
- The straight-through estimators follow Rajamanoharan et al. (2024), "Jumping Ahead:
  Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders": the rectangle
  kernel rect(u) = 1 for |u| < 1/2 gives the threshold a pseudo-derivative within
  bandwidth/2 of it; the gradient to the pre-activations is the true one (mask pre > threshold).
- The number of active latents is not bounded, so codes are built only on request
  (`decode="sparse"`), and never while training: the threshold's pseudo-derivative needs
  dLoss/dz at latents just below the threshold, which are absent from the codes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from clt_lightning.models.encoding import SparseCodes, dense_to_codes
from clt_lightning.models.sparsifiers import (
    LossContext,
    Sparsifier,
    SparsifierConfig,
    at_least_float32,
    register_sparsifier,
)


def rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel: 1 where |u| < 1/2, else 0 (same dtype as `u`)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient over the leading dimensions down to `shape`."""
    lead = grad.dim() - len(shape)
    return grad.sum(dim=tuple(range(lead))) if lead > 0 else grad


class _JumpReLUFunction(torch.autograd.Function):
    """z = pre * H(pre - threshold) with a rectangle-kernel pseudo-derivative for threshold."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            kernel = rectangle((pre - threshold) / bw)
            g = -(threshold / bw) * kernel * grad
            grad_threshold = _sum_to(g, threshold.shape).to(threshold.dtype)
        return grad_pre, grad_threshold, None


class _StepFunction(torch.autograd.Function):
    """H(pre - threshold) with d/d threshold = -(1/bandwidth) rect((pre - threshold)/bandwidth)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = torch.zeros_like(pre) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            g = -(1.0 / bw) * rectangle((pre - threshold) / bw) * grad
            grad_threshold = _sum_to(g, threshold.shape).to(threshold.dtype)
        return grad_pre, grad_threshold, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU with straight-through gradients (Rajamanoharan et al. 2024).

    Forward: `pre * (pre > threshold)`. Backward: d z/d pre = 1[pre > threshold];
    d z/d threshold = -(threshold/bandwidth) * rect((pre - threshold)/bandwidth).

    Args:
        pre: Pre-activations [..., F].
        threshold: Thresholds broadcastable to `pre`, e.g. [L, F] for pre [B, L, F].
        bandwidth: Kernel width epsilon (> 0).

    Returns:
        z, shaped like `pre`.
    """
    return _JumpReLUFunction.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step H(pre - threshold) with a rectangle-kernel pseudo-derivative.

    Backward: d H/d threshold = -(1/bandwidth) * rect((pre - threshold)/bandwidth);
    no gradient to `pre` (as in Rajamanoharan et al. 2024).

    Args:
        pre: Pre-activations [..., F].
        threshold: Thresholds broadcastable to `pre`.
        bandwidth: Kernel width epsilon (> 0).

    Returns:
        0/1 tensor shaped like `pre`.
    """
    return _StepFunction.apply(pre, threshold, bandwidth)


def sparsity_coefficient(config: SparsifierConfig, progress: float) -> float:
    """Sparsity weight lambda at `progress`: linear ramp from 0 over the warm-up fraction.

    Args:
        config: Gives `sparsity_coeff` and `sparsity_warmup_fraction`.
        progress: Fraction of training done, in [0, 1].

    Returns:
        lambda = sparsity_coeff * min(1, progress / sparsity_warmup_fraction).
    """
    if config.sparsity_warmup_fraction <= 0:
        return config.sparsity_coeff
    return config.sparsity_coeff * min(1.0, max(0.0, progress) / config.sparsity_warmup_fraction)


@register_sparsifier("jumprelu")
class JumpReLU(Sparsifier):
    """JumpReLU: z = pre * (pre > threshold), one raw threshold per latent [L, F].

    Losses:
    - `sparsity`: lambda(progress) * sum_{l,i} tanh(c * ||W_dec,l,i|| * z_l,i), mean over
      tokens (`sparsity_loss="tanh"`); thresholds get gradient through JumpReLU's
      rectangle-kernel pseudo-derivative. With `sparsity_loss="l0"`:
      lambda * sum H(pre - threshold) through `step`, whose pseudo-derivative is the same
      kernel, -(1/bandwidth) rect((pre - threshold)/bandwidth).
    - `preact` (if preact_coeff > 0): preact_coeff * sum relu(threshold - pre) * ||W_dec||,
      mean over tokens; threshold and norms detached, so it only pushes pre-activations of
      latents below threshold upwards (reviving dead latents).
    """

    sparse_grad_exact = False
    needs_decoder_norms = True

    def __init__(self, config: SparsifierConfig, n_layers: int, n_latents: int) -> None:
        super().__init__(config, n_layers, n_latents)
        self.threshold = nn.Parameter(torch.full((n_layers, n_latents), config.threshold_init))

    def apply_sparsity(
        self, pre: Tensor, layers: slice, want_codes: bool
    ) -> tuple[Tensor, SparseCodes | None]:
        z = jumprelu(pre, self.threshold[layers], self.config.bandwidth)
        return z, (dense_to_codes(z) if want_codes else None)

    def export_threshold(self) -> Tensor:
        """The per-latent thresholds [L, F]."""
        return self.threshold

    @torch.no_grad()
    def load_threshold(self, threshold: Tensor) -> None:
        """Set the thresholds from [L, F].

        Args:
            threshold: [L, F] thresholds on pre-activations.
        """
        self.threshold.copy_(threshold)

    def losses(self, ctx: LossContext) -> dict[str, Tensor]:
        """`sparsity` always; `preact` when preact_coeff > 0."""
        out = {"sparsity": self.sparsity_penalty(ctx)}
        if self.config.preact_coeff > 0:
            out["preact"] = self.preact_loss(ctx)
        return out

    def sparsity_penalty(self, ctx: LossContext) -> Tensor:
        """lambda(progress) * mean over tokens of the per-token penalty summed over (l, i)."""
        lam = sparsity_coefficient(self.config, ctx.progress)
        if self.config.sparsity_loss == "tanh":
            norms = ctx.decoder_norms.to(ctx.z.dtype)
            per_latent = torch.tanh(self.config.tanh_c * norms * ctx.z)
        else:
            per_latent = step(ctx.pre, self.threshold, self.config.bandwidth)
        return lam * at_least_float32(per_latent).sum(dim=(1, 2)).mean()

    def preact_loss(self, ctx: LossContext) -> Tensor:
        """preact_coeff * mean over tokens of sum_{l,i} relu(threshold - pre) * ||W_dec||."""
        gap = torch.relu(self.threshold.detach() - ctx.pre)
        weighted = gap * ctx.decoder_norms.detach().to(gap.dtype)
        return self.config.preact_coeff * at_least_float32(weighted).sum(dim=(1, 2)).mean()
