"""The TopK sparsifiers: `relu_topk`, `abs_topk` (per token) and `batch_topk` (per batch).

Design decisions:
- ReLU-TopK and Abs-TopK keep the k largest ReLU(pre), or |pre| with their signs, per
  (token, layer). In training with sparse decoding they fuse the encoder with the selection
  (`PerTokenTopK.encode`, through `topk_encode.topk_encode`): no [B, L, F] tensor is kept
  and the backward touches the kept latents only (TopK passes no gradient to the others,
  so this is the exact gradient).
- AuxK follows Gao et al. (2024), "Scaling and evaluating sparse autoencoders": the top
  `aux_k` dead latents predict the detached residual. The fused encoder picks them in its
  single pass (`aux_candidates`); under DDP, where "dead" depends on every rank's batch, a
  second pass picks them after the all-reduced statistics update.
- BatchTopK (Bussmann et al. 2024) keeps the dense encoder: its selection spans the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from clt_lightning.errors import CheckpointMismatchError
from clt_lightning.models.encoding import (
    DecodeRequest,
    EncoderInput,
    Encoding,
    SparseCodes,
    codes_to_dense,
    dense_to_codes,
)
from clt_lightning.models.sparsifiers import (
    LossContext,
    Sparsifier,
    SparsifierConfig,
    at_least_float32,
    register_sparsifier,
)
from clt_lightning.models.topk_encode import topk_encode


def normalised_aux_error(aux_recon: Tensor, residual: Tensor) -> Tensor:
    """Sum over targets of ||aux_recon_l - residual_l||^2 / ||residual_l||^2.

    Args:
        aux_recon: [B, L, d].
        residual: [B, L, d] (detached).

    Returns:
        Scalar; a target whose residual is exactly zero contributes 0.
    """
    err = (at_least_float32(aux_recon) - at_least_float32(residual)).pow(2).sum(dim=(0, 2))
    denom = at_least_float32(residual).pow(2).sum(dim=(0, 2))
    ratio = err / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, ratio, torch.zeros_like(ratio)).sum()


class _TopKBase(Sparsifier):
    """Shared TopK machinery: per-(token, layer) top-k selection and the AuxK loss.

    `signed = False` ranks ReLU(pre) and keeps ReLU(pre) (zeros stay zeros);
    `signed = True` ranks |pre| and keeps pre with its sign.
    """

    uses_k = True
    codes_are_cheap = True
    signed: ClassVar[bool] = False

    def _rank(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(score used for ranking, value kept), both shaped like `pre`."""
        if self.signed:
            return pre.abs(), pre
        act = torch.relu(pre)
        return act, act

    def apply_sparsity(
        self, pre: Tensor, layers: slice, want_codes: bool
    ) -> tuple[Tensor, SparseCodes | None]:
        score, act = self._rank(pre)
        indices = score.topk(self.config.k, dim=-1, sorted=False).indices
        codes = SparseCodes(act.gather(-1, indices), indices)
        return codes_to_dense(codes, self.n_latents), codes

    def losses(self, ctx: LossContext) -> dict[str, Tensor]:
        """AuxK loss under the key `auxk` (zero when no latent is dead)."""
        return {"auxk": self.auxk_loss(ctx)}

    def aux_candidates(self, n_tokens: int) -> Tensor | None:
        """Latents dead after a batch of `n_tokens` unless they fire in it, [L, F] bool.

        None when AuxK is off (aux_coeff = 0) or no latent can be dead after the batch.
        The fused TopK encoder ANDs this with "did not fire" to get exactly the dead mask
        that `dead_mask()` gives after `record_fired` (it needs it before, to pick the
        AuxK codes while the layer's pre-activations are at hand).
        """
        if self.config.aux_coeff == 0:
            return None
        candidates = self.tokens_since_fired + n_tokens >= self.config.dead_tokens
        return candidates if bool(candidates.any()) else None

    def aux_codes(self, pre: Tensor, dead: Tensor) -> SparseCodes:
        """Top `aux_k` dead latents per (token, layer), with this sparsifier's sign rule.

        Args:
            pre: Pre-activations [B, L, F].
            dead: Dead mask [L, F] (at least one True).

        Returns:
            SparseCodes [B, L, k_aux], k_aux = min(aux_k, most dead latents in a layer);
            in layers with fewer dead latents the extra entries have value 0.
        """
        width = min(self.config.aux_k, int(dead.sum(-1).max()))
        score, act = self._rank(pre)
        dead_b = dead.expand_as(pre)
        # Scores are >= 0, so -1 ranks every live latent below every dead one.
        score = score.masked_fill(~dead_b, -1.0)
        indices = score.topk(width, dim=-1, sorted=False).indices
        values = act.gather(-1, indices) * dead_b.gather(-1, indices).to(act.dtype)
        return SparseCodes(values, indices)

    def auxk_loss(self, ctx: LossContext) -> Tensor:
        """AuxK (Gao et al. 2024): dead latents predict the detached residual.

        loss = aux_coeff * sum_l ||aux_recon_l - r_l||^2 / ||r_l||^2, r = y - y_hat
        (scaled space), aux_recon = decoders applied to `aux_codes` without b_dec.

        Args:
            ctx: Loss context (uses pre, y_scaled, y_hat_scaled, decode_fn).

        Returns:
            Scalar (at least float32); 0 when no latent is dead or aux_coeff is 0.
        """
        if ctx.pre is None:  # fused TopK path: the encoder already picked the AuxK codes
            codes = ctx.aux_codes
            if self.config.aux_coeff == 0 or codes is None or codes.values.shape[-1] == 0:
                return at_least_float32(ctx.y_hat_scaled.new_zeros(()))
        else:
            dead = self.dead_mask()
            if self.config.aux_coeff == 0 or not bool(dead.any()):
                return at_least_float32(ctx.pre.new_zeros(()))
            codes = self.aux_codes(ctx.pre, dead)
        residual = (ctx.y_scaled - ctx.y_hat_scaled).detach()
        aux_recon = ctx.decode_fn(codes)
        return self.config.aux_coeff * normalised_aux_error(aux_recon, residual)


class _PerTokenTopK(_TopKBase):
    """TopK per (token, layer), whose training encode fuses the encoder with the selection."""

    def fuses(self, request: DecodeRequest) -> bool:
        """Fused in training with gradients when the CLT decodes k-wide codes sparsely."""
        return self.training and torch.is_grad_enabled() and request.decodes_sparsely(self.config.k)

    def encode(self, inputs: EncoderInput, request: DecodeRequest) -> Encoding:
        """Fused training encode when `fuses(request)`, else the default (see the base).

        The fused path (`topk_encode.topk_encode`) computes the codes layer by layer and
        back-propagates only through the kept latents, so no [B, L, F] tensor is kept;
        same values and gradients as the unfused path.

        Args:
            inputs: Scaled inputs [B, L, d] and the encoder's weights.
            request: How the CLT will decode the result.

        Returns:
            Fused: Encoding(None, None, codes [B, L, k], aux_codes [B, L, k_aux] or
            None), the dead-latent statistics updated from the batch's fired latents.
            Otherwise Encoding(pre, z, codes).
        """
        if not self.fuses(request):
            return super().encode(inputs, request)
        config, n_tokens = self.config, inputs.x.shape[0]
        encode = functools.partial(
            topk_encode,
            inputs.x,
            inputs.W_enc,
            inputs.b_enc,
            config.k,
            signed=self.signed,
            aux_k=min(config.aux_k, self.n_latents),
        )
        distributed = _is_distributed()
        # One pass picks the AuxK codes from this batch's fired latents. Under DDP "dead"
        # depends on every rank's batch (`record_fired` all-reduces), known only after the
        # pass: a second pass then picks them among the dead latents (only when some are).
        candidates = None if distributed else self.aux_candidates(n_tokens)
        result = encode(aux_candidates=candidates)
        self.record_fired(result.fired, n_tokens)
        if distributed and config.aux_coeff > 0:
            dead = self.dead_mask()
            if bool(dead.any()):
                second = encode(aux_candidates=dead)
                result = result._replace(
                    aux_values=second.aux_values, aux_indices=second.aux_indices
                )
        codes = SparseCodes(result.values, result.indices)
        aux = SparseCodes(result.aux_values, result.aux_indices)
        return Encoding(None, None, codes, aux if aux.values.shape[-1] else None)


@register_sparsifier("relu_topk")
class ReLUTopK(_PerTokenTopK):
    """The k largest ReLU(pre) per layer and token; the rest are 0."""

    signed = False


@register_sparsifier("abs_topk")
class AbsTopK(_PerTokenTopK):
    """The k largest |pre| per layer and token, keeping their signs."""

    signed = True


@register_sparsifier("batch_topk")
class BatchTopK(_TopKBase):
    """BatchTopK (Bussmann et al. 2024): top k*B of ReLU(pre) across the batch, per layer.

    Training keeps, per layer, the k*B largest values of ReLU(pre) among all B tokens, so
    tokens get a variable number of latents with k on average. Inference cannot depend on
    the batch, so it uses a per-layer threshold: z = pre * (pre > threshold_l). The
    threshold buffer [L] runs during training as an EMA (decay `threshold_ema`) of the
    smallest value kept in each training batch (the first batch sets it directly), and
    is recalibrated on the current weights (`calibrated_threshold`) before each
    validation and in every checkpoint (`CLTModule.calibrate_threshold`), so inference
    and the export use a threshold of the final weights.

    Buffers: `threshold` [L] float32, `threshold_updates` [L] int64.
    """

    codes_are_cheap = False
    calibrates = True

    def __init__(self, config: SparsifierConfig, n_layers: int, n_latents: int) -> None:
        super().__init__(config, n_layers, n_latents)
        self.register_buffer("threshold", torch.zeros(n_layers))
        self.register_buffer("threshold_updates", torch.zeros(n_layers, dtype=torch.int64))

    def apply_sparsity(
        self, pre: Tensor, layers: slice, want_codes: bool
    ) -> tuple[Tensor, SparseCodes | None]:
        act = torch.relu(pre)
        if self.training:
            z = self._batch_select(act)
        else:
            threshold = self.threshold[layers].to(act.dtype)[:, None]
            z = act * (act > threshold).to(act.dtype)
        return z, (dense_to_codes(z) if want_codes else None)

    def _batch_select(self, act: Tensor) -> Tensor:
        """Keep the k*B largest entries of act [B, L, F] per layer; zero the rest."""
        n_tokens, n_layers, n_latents = act.shape
        flat = act.transpose(0, 1).reshape(n_layers, n_tokens * n_latents)
        n_keep = min(self.config.k * n_tokens, flat.shape[1])
        indices = flat.topk(n_keep, dim=-1, sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, indices, True)
        mask = mask.reshape(n_layers, n_tokens, n_latents).transpose(0, 1)
        return act * mask.to(act.dtype)

    @staticmethod
    def _kept_min(z: Tensor) -> Tensor:
        """Smallest kept (positive) value per layer of z [B, L, F]; inf where none."""
        zf = z.float()
        return torch.where(zf > 0, zf, torch.full_like(zf, float("inf"))).amin(dim=(0, 2))

    @torch.no_grad()
    def calibrated_threshold(self, pre_batches: Iterable[Tensor]) -> Tensor | None:
        """Mean, over batches, of the smallest value the batch top-(k*B) keeps per layer,
        under the current weights (Bussmann et al. 2024's inference threshold).

        The running EMA of training mixes in the values of early, very different
        weights (the first batch set it): its L0 at inference drifted to 2.6x k. This
        statistic of the final weights gives an L0 at inference close to k per layer.

        Args:
            pre_batches: Pre-activation batches [B, L, F] of training tokens.

        Returns:
            [L] float32; None when no batch was given. A layer where no batch kept a
            value keeps its current threshold.
        """
        total = torch.zeros(self.n_layers, dtype=torch.float64, device=self.threshold.device)
        count = torch.zeros_like(total)
        for pre in pre_batches:
            kept_min = self._kept_min(self._batch_select(torch.relu(pre))).to(total.device)
            valid = torch.isfinite(kept_min)
            total += torch.where(valid, kept_min.double(), 0.0)
            count += valid.double()
        if not bool(count.any()):
            return None
        mean = total / count.clamp_min(1)
        return torch.where(count > 0, mean, self.threshold.double()).float()

    @torch.no_grad()
    def set_threshold(self, threshold: Tensor) -> None:
        """Install a calibrated per-layer threshold [L]."""
        self.threshold.copy_(threshold)
        self.threshold_updates.clamp_(min=1)

    @torch.no_grad()
    def update_statistics(self, z: Tensor) -> None:
        super().update_statistics(z)
        kept_min = self._kept_min(z)
        valid = torch.isfinite(kept_min)
        ema = self.config.threshold_ema
        smoothed = ema * self.threshold + (1 - ema) * kept_min
        new = torch.where(self.threshold_updates == 0, kept_min, smoothed)
        self.threshold.copy_(torch.where(valid, new, self.threshold))
        self.threshold_updates.add_(valid.to(torch.int64))

    def export_threshold(self) -> Tensor:
        """The calibrated per-layer threshold broadcast to [L, F] (a JumpReLU at inference)."""
        return self.threshold[:, None].expand(self.n_layers, self.n_latents)

    @torch.no_grad()
    def load_threshold(self, threshold: Tensor) -> None:
        """Set the per-layer threshold from [L, F] (all latents of a layer share it).

        Args:
            threshold: [L, F], constant along F.
        """
        if not torch.equal(threshold, threshold[:, :1].expand_as(threshold)):
            raise CheckpointMismatchError(
                "batch_topk expects one threshold per layer, but threshold_{i} varies across "
                "latents; was this exported from a jumprelu CLT?"
            )
        self.threshold.copy_(threshold[:, 0])
        self.threshold_updates.fill_(1)


def _is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
