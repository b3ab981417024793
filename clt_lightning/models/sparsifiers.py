"""The sparsifier interface: configuration, registry and base class.

A sparsifier is the nonlinearity between a cross-layer transcoder's encoder and decoder.
It turns the encoder's inputs into latent activations z [B, L, F] (dense, mostly zero)
and, where cheap, into `SparseCodes` (the k kept values and their indices per token and
layer) that the sparse decoder consumes. It owns the training encode (`encode`: unfused
by default, fused with the encoder where a sparsifier can do better), the extra loss terms
its sparsity mechanism needs (JumpReLU's sparsity penalty, TopK's AuxK) and the
dead-latent statistics. The built-in sparsifiers live in `models/topk.py` (`relu_topk`,
`abs_topk`, `batch_topk`) and `models/jumprelu.py` (`jumprelu`).

Design decisions:
- One name -> class registry (`@register_sparsifier`), as in open_clip/timm, so the YAML
  picks a sparsifier by name and `list_sparsifiers()` tells what exists. A new sparsifier
  is one registered class: the CLT only computes pre-activations and decodes, and asks the
  sparsifier for everything in between (`encode`, `activate`, `losses`).
- The built-in sparsifier modules are imported by `clt_lightning/models/__init__.py`, so
  they are registered whenever any part of `clt_lightning.models` is imported.

Adding a sparsifier (docs/architecture.md, "models/sparsifiers.py"):
1. A new module in `clt_lightning/models/` with one `Sparsifier` subclass decorated with
   `@register_sparsifier("name")`, implementing `apply_sparsity` (and `losses` if it has
   loss terms; the class attributes below say what else applies to it).
2. Import that module in `clt_lightning/models/__init__.py` (that import registers it),
   and give it its line in the README file tree.
3. Settings it needs beyond the shared ones are fields of `SparsifierConfig` with their
   check in `__post_init__` and their valid range in `_VALID_RANGES`.
A sparsifier defined outside the package registers the same way: its module must be
imported before the config is built (e.g. by the script that starts the run).
- Everything works on whole [B, L, F] tensors (one call per batch, no per-layer Python loop
  in training); `activate_layer` serves the layer-by-layer replacement path.
- Dead-latent statistics are buffers, so they are checkpointed with the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from clt_lightning.errors import ConfigError
from clt_lightning.models.encoding import DecodeRequest, EncoderInput, Encoding, SparseCodes

log = logging.getLogger(__name__)


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
    """AuxK codes chosen by the fused TopK encoder (`topk_encode.topk_encode`), which
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


def sparsifier_class(name: str) -> type[Sparsifier]:
    """The registered class of a sparsifier name.

    Raises:
        ConfigError: Unknown name (the message lists the valid names).
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown sparsifier.name={name!r}; valid names: {', '.join(list_sparsifiers())}"
        )
    return _REGISTRY[name]


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
    cls = sparsifier_class(config.name)
    if cls.uses_k and config.k > n_latents:
        raise ConfigError(
            f"sparsifier.k={config.k} exceeds n_latents={n_latents}; "
            f"k must be between 1 and n_latents"
        )
    return cls(config, n_layers, n_latents)


def at_least_float32(t: Tensor) -> Tensor:
    """`t` in at least float32 (bf16/fp16 losses are accumulated in fp32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------- base class


class Sparsifier(nn.Module):
    """Base class of the registry: pre-activations [B, L, F] -> activations [B, L, F].

    A new sparsifier implements `apply_sparsity` (the pure map, one call for all layers)
    and, if it has extra loss terms, `losses`; it overrides `encode` only to fuse the
    encoder with its selection.

    Buffers (checkpointed): `tokens_since_fired` [L, F] int64, training tokens since each
    latent last fired; `n_tokens_seen` scalar int64. Both update in training-mode
    `activate` calls (and fused training encodes, through `record_fired`) only.

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

    def apply_sparsity(
        self, pre: Tensor, layers: slice, want_codes: bool
    ) -> tuple[Tensor, SparseCodes | None]:
        """Pure computation: pre [B, L', F] for `layers` -> (z [B, L', F], codes or None)."""
        raise NotImplementedError

    def encode(self, inputs: EncoderInput, request: DecodeRequest) -> Encoding:
        """The encode of `CrossLayerTranscoder.forward`, training mode included.

        The default forms the pre-activations and sparsifies them (`activate`, which
        updates the statistics in training mode), with codes when `wants_codes`. A
        sparsifier that can do better overrides it (TopK fuses the encoder with its
        selection, `fuses`) and may then leave `pre` and `z` None; the CLT decodes the
        codes when `z` is None.

        Args:
            inputs: Scaled inputs [B, L, d] and the encoder's weights.
            request: How the CLT will decode the result.

        Returns:
            Encoding(pre [B, L, F], z [B, L, F], codes [B, L, k] or None).
        """
        pre = inputs.pre_activations()
        z, codes = self.activate(pre, want_codes=self.wants_codes(request))
        return Encoding(pre, z, codes)

    def wants_codes(self, request: DecodeRequest) -> bool:
        """Whether an encode for `request` should also build SparseCodes.

        Codes are built in `sparse` mode, and in `auto` mode when they are cheap
        (`codes_are_cheap`); never when gradients are enabled and decoding codes would
        change them (`sparse_grad_exact` False: the decode is dense then).

        Args:
            request: How the CLT will decode.

        Returns:
            True when the codes are worth building.
        """
        if not self.sparse_grad_exact and torch.is_grad_enabled():
            return False  # the CLT decodes densely anyway (JumpReLU), codes would be wasted
        return request.mode == "sparse" or (request.mode == "auto" and self.codes_are_cheap)

    def fuses(self, request: DecodeRequest) -> bool:
        """Whether `encode` takes a fused path (no `pre`, no `z`) for `request` now.

        Args:
            request: How the CLT will decode.

        Returns:
            False for the default encode (the benchmarks report this per step).
        """
        return False

    def activate(self, pre: Tensor, want_codes: bool = False) -> tuple[Tensor, SparseCodes | None]:
        """Sparsify all layers; in training mode also update the dead-latent statistics.

        Args:
            pre: Pre-activations [B, L, F].
            want_codes: Also return SparseCodes when that costs extra work.

        Returns:
            (z [B, L, F], codes [B, L, k] or None).
        """
        z, codes = self.apply_sparsity(pre, slice(None), want_codes)
        if self.training:
            self.update_statistics(z)
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
        z, _ = self.apply_sparsity(flat, slice(layer, layer + 1), False)
        return z.reshape(pre.shape)

    def losses(self, ctx: LossContext) -> dict[str, Tensor]:
        """Extra loss terms, already weighted (summed into the training loss by the module).

        Args:
            ctx: Everything the terms may need.

        Returns:
            Name -> scalar tensor.
        """
        return {}

    @torch.no_grad()
    def update_statistics(self, z: Tensor) -> None:
        """Count tokens since each latent fired, from activations z [B, L, F] (training-mode
        `activate` calls only). A sparsifier that learns from the batch's activations
        (BatchTopK's running threshold) extends it, calling this one first."""
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
