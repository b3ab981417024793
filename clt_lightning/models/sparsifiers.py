"""Sparsifiers: the nonlinearity between a cross-layer transcoder's encoder and decoder.

A sparsifier turns pre-activations `pre` [B, L, F] into latent activations `z` [B, L, F]
(dense, mostly zero) and, where cheap, into `SparseCodes` (the k kept values and their
indices per token and layer) that a sparse decoder can consume. It also owns the extra
loss terms its sparsity mechanism needs (JumpReLU's sparsity penalty, TopK's AuxK) and the
dead-latent statistics.

Design decisions:
- One name -> class registry (`@register_sparsifier`), as in open_clip/timm, so the YAML
  picks a sparsifier by name and `list_sparsifiers()` tells what exists.
- Everything works on whole [B, L, F] tensors (one call per batch, no per-layer Python loop
  in training); `activate_layer` serves the layer-by-layer replacement path.
- JumpReLU's threshold is a raw parameter, not a log-threshold: under Adam every step moves
  a parameter by about the learning rate, so a log-threshold moves the threshold by a
  relative lr (~2e-4 of itself) per step and barely changes during training.
- The straight-through estimators follow Rajamanoharan et al. (2024), "Jumping Ahead:
  Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders": the rectangle
  kernel rect(u) = 1 for |u| < 1/2 gives the threshold a pseudo-derivative within
  bandwidth/2 of it; the gradient to the pre-activations is the true one (mask pre > threshold).
- AuxK follows Gao et al. (2024), "Scaling and evaluating sparse autoencoders".
- Dead-latent statistics are buffers, so they are checkpointed with the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from clt_lightning.errors import CheckpointMismatchError, ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "AbsTopK",
    "BatchTopK",
    "JumpReLU",
    "LossContext",
    "ReLUTopK",
    "SparseCodes",
    "Sparsifier",
    "SparsifierConfig",
    "build_sparsifier",
    "codes_to_dense",
    "dense_to_codes",
    "jumprelu",
    "list_sparsifiers",
    "rectangle",
    "register_sparsifier",
    "step",
]


class SparseCodes(NamedTuple):
    """The active latents of every token and layer, k per (token, layer)."""

    values: Tensor
    """Activation values [B, L, k] (float); padding entries are 0."""
    indices: Tensor
    """Latent indices [B, L, k] (int64) into the F latents of that layer."""


@dataclass(frozen=True)
class SparsifierConfig:
    """Which sparsifier to use and its hyperparameters.

    Args:
        name: Registered sparsifier name (see `list_sparsifiers()`): `jumprelu`,
            `relu_topk`, `abs_topk` or `batch_topk`.
        k: Active latents per layer and token (TopK variants; JumpReLU ignores it).
        threshold_init: JumpReLU threshold at initialisation, in scaled pre-activation units.
        bandwidth: Width of the rectangle kernel of JumpReLU's straight-through estimator.
        sparsity_coeff: Final weight lambda of JumpReLU's sparsity penalty.
        tanh_c: Sharpness c of the tanh penalty `tanh(c * ||W_dec,i|| * z_i)`.
        sparsity_warmup_fraction: Fraction of training over which lambda ramps from 0.
        sparsity_loss: `tanh` (Anthropic's tanh penalty) or `l0` (Rajamanoharan et al.'s
            L0 penalty through a step function with a rectangle-kernel pseudo-derivative).
        preact_coeff: Weight of the pre-activation loss that revives dead JumpReLU latents
            (0 disables it).
        aux_k: Dead latents used by the AuxK loss per layer and token (clipped to F).
        aux_coeff: Weight of the AuxK loss (TopK variants).
        dead_tokens: A latent that has not fired in this many training tokens is dead.
        threshold_ema: EMA decay of batch_topk's running inference threshold during
            training (replaced by the calibration before validation and in checkpoints).
        calibration_batches: Training batches whose pre-activations, under the current
            weights, calibrate batch_topk's inference threshold (`calibrated_threshold`).
    """

    name: str = "relu_topk"
    k: int = 128
    threshold_init: float = 0.03
    bandwidth: float = 1.0
    sparsity_coeff: float = 1e-4
    tanh_c: float = 4.0
    sparsity_warmup_fraction: float = 0.1
    sparsity_loss: Literal["tanh", "l0"] = "tanh"
    preact_coeff: float = 0.0
    aux_k: int = 512
    aux_coeff: float = 1 / 32
    dead_tokens: int = 10_000_000
    threshold_ema: float = 0.99
    calibration_batches: int = 16

    def __post_init__(self) -> None:
        checks = {
            "k": self.k >= 1,
            "aux_k": self.aux_k >= 1,
            "dead_tokens": self.dead_tokens >= 1,
            "bandwidth": self.bandwidth > 0,
            "tanh_c": self.tanh_c > 0,
            "threshold_init": self.threshold_init >= 0,
            "sparsity_coeff": self.sparsity_coeff >= 0,
            "preact_coeff": self.preact_coeff >= 0,
            "aux_coeff": self.aux_coeff >= 0,
            "sparsity_warmup_fraction": 0 <= self.sparsity_warmup_fraction <= 1,
            "threshold_ema": 0 <= self.threshold_ema < 1,
            "calibration_batches": self.calibration_batches >= 1,
            "sparsity_loss": self.sparsity_loss in ("tanh", "l0"),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"sparsifier.{key}={getattr(self, key)!r} is invalid; valid: "
                    f"{_VALID_RANGES[key]}"
                )


_VALID_RANGES = {
    "k": "an integer >= 1",
    "aux_k": "an integer >= 1",
    "dead_tokens": "an integer >= 1",
    "bandwidth": "a float > 0",
    "tanh_c": "a float > 0",
    "threshold_init": "a float >= 0",
    "sparsity_coeff": "a float >= 0",
    "preact_coeff": "a float >= 0",
    "aux_coeff": "a float >= 0",
    "sparsity_warmup_fraction": "a float in [0, 1]",
    "threshold_ema": "a float in [0, 1)",
    "calibration_batches": "an integer >= 1",
    "sparsity_loss": "'tanh' or 'l0'",
}


@dataclass
class LossContext:
    """What a sparsifier's `losses` may use; built by `CrossLayerTranscoder.auxiliary_losses`.

    Everything is in the model's scaled space.
    """

    pre: Tensor | None
    """Pre-activations [B, L, F]; None on the fused TopK training path (see `aux_codes`)."""
    z: Tensor | None
    """Latent activations [B, L, F] (what was decoded); None on the fused TopK path."""
    codes: SparseCodes | None
    """The sparse form of `z`, when the sparsifier produced one."""
    y_scaled: Tensor
    """Targets [B, L, d] in scaled space."""
    y_hat_scaled: Tensor
    """Reconstruction [B, L, d] in scaled space."""
    decoder_norms: Tensor | None
    """Norm of each latent's decoder over all its targets [L, F]; None for sparsifiers
    whose `needs_decoder_norms` is False (computing them reads the whole decoder)."""
    decode_fn: Callable[[SparseCodes], Tensor]
    """Decodes codes [B, L, k] into [B, L, d] through the CLT decoders, without b_dec."""
    progress: float
    """Fraction of training done, in [0, 1]."""
    aux_codes: SparseCodes | None = None
    """AuxK codes chosen by the fused TopK encoder (`sparse_decode.topk_encode`), which
    keeps no `pre`; None elsewhere (TopK then picks them from `pre`)."""


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Sparsifier]] = {}


def register_sparsifier(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator that registers a `Sparsifier` subclass under `name`.

    Args:
        name: The name the YAML uses (`sparsifier.name`).

    Returns:
        The decorator; it sets `cls.name` and returns the class unchanged.
    """

    def decorator(cls: type[Sparsifier]) -> type[Sparsifier]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"sparsifier name {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_sparsifiers() -> list[str]:
    """Names of the registered sparsifiers, sorted.

    Returns:
        The valid values of `SparsifierConfig.name`.
    """
    return sorted(_REGISTRY)


def build_sparsifier(config: SparsifierConfig, n_layers: int, n_latents: int) -> Sparsifier:
    """Build the sparsifier named in `config`.

    Args:
        config: Sparsifier name and hyperparameters.
        n_layers: L, the number of layers.
        n_latents: F, latents per layer.

    Returns:
        The sparsifier module.

    Raises:
        ConfigError: Unknown name (the message lists the valid names), or k > n_latents
            for a TopK variant.
    """
    if config.name not in _REGISTRY:
        raise ConfigError(
            f"unknown sparsifier.name={config.name!r}; valid names: {', '.join(list_sparsifiers())}"
        )
    cls = _REGISTRY[config.name]
    if cls.uses_k and config.k > n_latents:
        raise ConfigError(
            f"sparsifier.k={config.k} exceeds n_latents={n_latents}; "
            f"k must be between 1 and n_latents"
        )
    return cls(config, n_layers, n_latents)


# --------------------------------------------------------------------------- pure functions


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


def codes_to_dense(codes: SparseCodes, n_latents: int) -> Tensor:
    """Scatter sparse codes into a dense tensor (differentiable in `codes.values`).

    Args:
        codes: values/indices [B, L, k].
        n_latents: F.

    Returns:
        z [B, L, F]; duplicate indices add up (padding entries carry 0).
    """
    shape = (*codes.values.shape[:-1], n_latents)
    dense = codes.values.new_zeros(shape)
    return dense.scatter_add(-1, codes.indices, codes.values)


def dense_to_codes(z: Tensor) -> SparseCodes:
    """Sparse codes of a dense activation tensor, as wide as its densest (token, layer).

    Args:
        z: Activations [B, L, F].

    Returns:
        SparseCodes with k = max number of non-zeros per (token, layer), at least 1;
        (token, layer) pairs with fewer non-zeros are padded with zero values.
    """
    width = max(1, int((z != 0).sum(-1).max())) if z.numel() else 1
    indices = z.detach().abs().topk(width, dim=-1).indices
    return SparseCodes(z.gather(-1, indices), indices)


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


def _wide(t: Tensor) -> Tensor:
    """`t` in at least float32 (bf16/fp16 losses are accumulated in fp32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normalised_aux_error(aux_recon: Tensor, residual: Tensor) -> Tensor:
    """Sum over targets of ||aux_recon_l - residual_l||^2 / ||residual_l||^2.

    Args:
        aux_recon: [B, L, d].
        residual: [B, L, d] (detached).

    Returns:
        Scalar; a target whose residual is exactly zero contributes 0.
    """
    err = (_wide(aux_recon) - _wide(residual)).pow(2).sum(dim=(0, 2))
    denom = _wide(residual).pow(2).sum(dim=(0, 2))
    ratio = err / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, ratio, torch.zeros_like(ratio)).sum()


# --------------------------------------------------------------------------- base class


class Sparsifier(nn.Module):
    """Base class of the registry: pre-activations [B, L, F] -> activations [B, L, F].

    Buffers (checkpointed): `tokens_since_fired` [L, F] int64, training tokens since each
    latent last fired; `n_tokens_seen` scalar int64. Both update in training-mode
    `activate` calls only.

    Args:
        config: Hyperparameters.
        n_layers: L.
        n_latents: F.
    """

    name: ClassVar[str] = ""
    uses_k: ClassVar[bool] = False
    """Whether `config.k` applies (and must be <= F)."""
    codes_are_cheap: ClassVar[bool] = False
    """Whether SparseCodes come for free, so `auto` decoding should use them."""
    needs_decoder_norms: ClassVar[bool] = False
    """Whether `losses` reads `LossContext.decoder_norms` (JumpReLU's penalties do)."""
    calibrates: ClassVar[bool] = False
    """Whether the inference threshold is refit to the weights (`calibrated_threshold`)."""
    sparse_grad_exact: ClassVar[bool] = True
    """Whether decoding the codes gives pre the same gradient as decoding dense z. False
    for JumpReLU: its threshold pseudo-derivative needs dLoss/dz at latents just below the
    threshold, which are absent from the codes."""

    def __init__(self, config: SparsifierConfig, n_layers: int, n_latents: int) -> None:
        super().__init__()
        self.config = config
        self.n_layers = n_layers
        self.n_latents = n_latents
        self.register_buffer(
            "tokens_since_fired", torch.zeros(n_layers, n_latents, dtype=torch.int64)
        )
        self.register_buffer("n_tokens_seen", torch.zeros((), dtype=torch.int64))

    def _apply_sparsity(
        self, pre: Tensor, layers: slice, want_codes: bool
    ) -> tuple[Tensor, SparseCodes | None]:
        """Pure computation: pre [B, L', F] for `layers` -> (z [B, L', F], codes or None)."""
        raise NotImplementedError

    def activate(self, pre: Tensor, want_codes: bool = False) -> tuple[Tensor, SparseCodes | None]:
        """Sparsify all layers; in training mode also update the dead-latent statistics.

        Args:
            pre: Pre-activations [B, L, F].
            want_codes: Also return SparseCodes when that costs extra work.

        Returns:
            (z [B, L, F], codes [B, L, k] or None).
        """
        z, codes = self._apply_sparsity(pre, slice(None), want_codes)
        if self.training:
            self._update_statistics(z)
        return z, codes

    def activate_layer(self, layer: int, pre: Tensor) -> Tensor:
        """Sparsify one layer (replacement path); never updates statistics.

        Args:
            layer: Layer index.
            pre: Pre-activations of that layer [..., F].

        Returns:
            z [..., F].
        """
        flat = pre.reshape(-1, 1, pre.shape[-1])
        z, _ = self._apply_sparsity(flat, slice(layer, layer + 1), False)
        return z.reshape(pre.shape)

    def forward(self, pre: Tensor) -> Tensor:
        """Dense activations z [B, L, F] of pre-activations `pre` [B, L, F]."""
        return self.activate(pre)[0]

    def sparse(self, pre: Tensor, force: bool = False) -> SparseCodes | None:
        """Sparse codes of `pre` [B, L, F]; no statistics update.

        Args:
            pre: Pre-activations [B, L, F].
            force: Also build codes for JumpReLU (whose active count is not bounded).

        Returns:
            SparseCodes [B, L, k] for the TopK family (batch_topk: k = the largest count of
            any (token, layer), shorter rows padded with 0); JumpReLU: None unless `force`.
        """
        return self._apply_sparsity(pre, slice(None), force or self.uses_k)[1]

    def losses(self, ctx: LossContext) -> dict[str, Tensor]:
        """Extra loss terms, already weighted (summed into the training loss by the module).

        Args:
            ctx: Everything the terms may need.

        Returns:
            Name -> scalar tensor.
        """
        return {}

    @torch.no_grad()
    def _update_statistics(self, z: Tensor) -> None:
        """Count tokens since each latent fired, from activations z [B, L, F]."""
        self.record_fired((z != 0).any(dim=0), z.shape[0])

    def calibrated_threshold(self, pre_batches: Iterable[Tensor]) -> Tensor | None:
        """Inference threshold fitted to the current weights, or None (nothing to fit).

        Args:
            pre_batches: Pre-activation batches [B, L, F] of training tokens.

        Returns:
            [L] float32 for sparsifiers whose inference rule differs from training
            (batch_topk); None for the others (the default).
        """
        return None

    def set_threshold(self, threshold: Tensor) -> None:
        """Install a `calibrated_threshold` result (only sparsifiers that return one)."""
        raise NotImplementedError(f"{self.name} has no calibrated threshold")

    @torch.no_grad()
    def record_fired(self, fired: Tensor, n_tokens: int) -> None:
        """Update the dead-latent statistics after a training batch.

        Args:
            fired: [L, F] bool, latents non-zero for at least one token of the batch.
            n_tokens: Tokens in the batch.
        """
        fired, n_tokens = _across_ranks(fired, n_tokens)
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.n_tokens_seen.add_(n_tokens)

    def dead_mask(self) -> Tensor:
        """Latents that did not fire in the last `dead_tokens` training tokens, [L, F] bool."""
        return self.tokens_since_fired >= self.config.dead_tokens

    def export_threshold(self) -> Tensor | None:
        """Per-latent thresholds [L, F] for a JumpReLU-style export, or None if not threshold-based."""
        return None

    def load_threshold(self, threshold: Tensor) -> None:
        """Set the thresholds from an exported [L, F] tensor (threshold-based sparsifiers only).

        Args:
            threshold: [L, F] thresholds on pre-activations.
        """
        raise NotImplementedError(f"sparsifier {self.name!r} has no thresholds")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_layers={self.n_layers}, n_latents={self.n_latents}"


# --------------------------------------------------------------------------- TopK family


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

    def _apply_sparsity(
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
                return _wide(ctx.y_hat_scaled.new_zeros(()))
        else:
            dead = self.dead_mask()
            if self.config.aux_coeff == 0 or not bool(dead.any()):
                return _wide(ctx.pre.new_zeros(()))
            codes = self.aux_codes(ctx.pre, dead)
        residual = (ctx.y_scaled - ctx.y_hat_scaled).detach()
        aux_recon = ctx.decode_fn(codes)
        return self.config.aux_coeff * normalised_aux_error(aux_recon, residual)


@register_sparsifier("relu_topk")
class ReLUTopK(_TopKBase):
    """The k largest ReLU(pre) per layer and token; the rest are 0."""

    signed = False


@register_sparsifier("abs_topk")
class AbsTopK(_TopKBase):
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

    def _apply_sparsity(
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
    def _update_statistics(self, z: Tensor) -> None:
        super()._update_statistics(z)
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


# --------------------------------------------------------------------------- JumpReLU


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

    def _apply_sparsity(
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
        return lam * _wide(per_latent).sum(dim=(1, 2)).mean()

    def preact_loss(self, ctx: LossContext) -> Tensor:
        """preact_coeff * mean over tokens of sum_{l,i} relu(threshold - pre) * ||W_dec||."""
        gap = torch.relu(self.threshold.detach() - ctx.pre)
        weighted = gap * ctx.decoder_norms.detach().to(gap.dtype)
        return self.config.preact_coeff * _wide(weighted).sum(dim=(1, 2)).mean()


def _across_ranks(fired: Tensor, n_tokens: int) -> tuple[Tensor, int]:
    """Under DDP: fired on any rank, and the tokens of every rank (one small all-reduce)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fired, n_tokens
    packed = torch.cat(
        [fired.flatten().to(torch.int64), fired.new_tensor([n_tokens], dtype=torch.int64)]
    )
    dist.all_reduce(packed)  # sum: fired count per latent, and the total tokens
    return packed[:-1].view_as(fired) > 0, int(packed[-1])
