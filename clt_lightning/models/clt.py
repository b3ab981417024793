"""CrossLayerTranscoder: a sparse, interpretable stand-in for every MLP of a frozen ViT.

For layers l = 0..L-1, with x_l the MLP input and y_l the MLP output:

    x_s,l   = x_l * input_scale[l]                      (scaled space)
    pre_l   = x_s,l @ W_enc[l] + b_enc[l]               [B, F]
    z_l     = sparsify(pre_l)                           [B, F]
    yh_s,l  = b_dec[l] + sum_{s <= l} z_s @ W_dec[s][:, l - s]
    y_hat_l = yh_s,l / output_scale[l]                  (raw space)

Design decisions (equations, initialisation and the export format are in docs/model.md):
- The model computes in a per-layer scaled space where E||x_l||^2 = E||y_l||^2 = d, so one
  learning rate, one threshold init and one sparsity coefficient fit every layer; the
  scales are buffers and inputs/outputs stay raw, so callers never see the scaling.
- Encoders are one [L, d, F] parameter (one batched einsum). Decoders are stored per source
  layer as W_dec[s]: [F, L - s, d] (index j is target s + j), circuit-tracer's layout, so
  the triangle costs L(L+1)/2 blocks and export needs no reshuffling.
- Sparse decoding lives in `models/sparse_decode.py` and is imported lazily; without it,
  codes are scattered into a dense tensor and decoded densely (same result).
- `save_pretrained` folds the scales into the weights so the exported CLT reads raw
  activations, with circuit-tracer's tensor names. The folder is committed as a unit
  (`files.commit_folder`: written beside it, then swapped in), and config.json records the
  weights' sha256, so a reader never pairs one export's config with another's weights.
  Non-finite weights are refused on export and on load, naming the tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from clt_lightning.checkpoint_contents import raise_non_finite
from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.files import (
    atomic_write_bytes,
    commit_folder,
    previous_folder,
    recover_folder,
)
from clt_lightning.hashing import file_sha256
from clt_lightning.models.sparsifiers import (
    AbsTopK,
    LossContext,
    ReLUTopK,
    SparseCodes,
    SparsifierConfig,
    build_sparsifier,
    codes_to_dense,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "clt.safetensors"
DECODE_MODES = ("dense", "sparse", "auto")
AUTO_SPARSE_RATIO = 8
"""`auto` decodes sparsely when k * AUTO_SPARSE_RATIO <= F (gathers beat a dense matmul)."""
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
"""Per-parameter state tensors kept by each optimizer (for `memory_estimate`)."""

SparseDecodeFn = Callable[[SparseCodes, Sequence[Tensor], Tensor], Tensor]


class Encoding(NamedTuple):
    """What `CrossLayerTranscoder.encode` returns (scaled space)."""

    pre: Tensor | None
    """Pre-activations x_s @ W_enc + b_enc, [B, L, F]; None on the fused TopK path."""
    z: Tensor | None
    """Latent activations [B, L, F] (dense, mostly zero); None on the fused TopK path."""
    codes: SparseCodes | None
    """The active latents as values/indices [B, L, k], when the sparsifier made them."""
    aux_codes: SparseCodes | None = None
    """AuxK codes of dead latents, chosen by the fused TopK encoder (None elsewhere)."""


class CLTOutput(NamedTuple):
    """What `CrossLayerTranscoder.forward` returns."""

    y_hat: Tensor
    """Reconstructed MLP outputs in raw space [B, L, d] (compare with the teacher's y)."""
    y_hat_scaled: Tensor
    """The same in scaled space [B, L, d] (compare with y * output_scale; the loss uses it)."""
    encoding: Encoding
    """Pre-activations, activations and codes of this forward."""


def scale_from_mean_sq_norm(mean_sq_norm: Tensor, d_model: int) -> Tensor:
    """Per-layer scale that maps activations to E||scaled||^2 = d_model.

    Args:
        mean_sq_norm: E||v_l||^2 per layer [L] (cache statistics).
        d_model: d.

    Returns:
        sqrt(d_model / mean_sq_norm) as float32 [L].
    """
    return torch.sqrt(d_model / torch.as_tensor(mean_sq_norm, dtype=torch.float64)).float()


def _is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _aux_fields(result: Any) -> dict[str, Tensor]:
    return {"aux_values": result.aux_values, "aux_indices": result.aux_indices}


def _load_topk_encode() -> Callable[..., Any] | None:
    """`topk_encode` from `models/sparse_decode.py`, or None when that module is absent."""
    if _load_sparse_decode() is None:
        return None
    from clt_lightning.models.sparse_decode import topk_encode

    return topk_encode


@functools.lru_cache(maxsize=1)
def _load_sparse_decode() -> SparseDecodeFn | None:
    """`sparse_decode` from `models/sparse_decode.py`, or None when that module is absent."""
    try:
        from clt_lightning.models.sparse_decode import sparse_decode
    except ModuleNotFoundError as err:
        if err.name != "clt_lightning.models.sparse_decode":
            raise
        log.warning("clt_lightning.models.sparse_decode is missing; decoding codes densely")
        return None
    return sparse_decode


class CrossLayerTranscoder(nn.Module):
    """Cross-layer transcoder over L layers of width d with F latents per layer.

    Initialisation (justified in docs/model.md):
    - W_dec[s] ~ U(-1/sqrt(F (L - s)), +1/sqrt(F (L - s))): every latent's whole decoder
      (all its L - s targets concatenated) has the same expected squared norm d / (3F)
      whatever its source layer, so the decoder-norm-weighted sparsity penalty treats all
      layers alike at the start; 1/sqrt(F) is the fan-in scale of a map that reads F latents.
    - W_enc[s] = transpose of W_dec[s][:, 0, :] (the latent's write direction at its own
      layer), rescaled to unit-norm columns: a latent first reads what it writes (tied
      init, Gao et al. 2024), and pre-activations start at unit scale in scaled space.
    - b_enc = 0; b_dec = 0, or the scaled target mean via `set_normalisation(...,
      output_mean=...)`; JumpReLU thresholds = `sparsifier.threshold_init`.

    Args:
        n_layers: L, layers of the teacher covered.
        d_model: d, width of the residual stream.
        n_latents: F, latents per layer (expansion * d_model; the paper uses 16 * d).
        sparsifier: Sparsifier name and hyperparameters (default: relu_topk, k=128).
        decode: `dense` (dense matmuls), `sparse` (sparse_decode on codes, forcing codes
            from every sparsifier) or `auto` (sparse when the sparsifier's codes are cheap
            and k * 8 <= F). `forward` decodes JumpReLU densely whenever gradients are
            enabled, because its threshold gradient needs dLoss/dz of inactive latents.
    """

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_latents: int,
        sparsifier: SparsifierConfig | None = None,
        decode: Literal["dense", "sparse", "auto"] = "auto",
    ) -> None:
        super().__init__()
        for key, value in (("n_layers", n_layers), ("d_model", d_model), ("n_latents", n_latents)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} is invalid; must be an integer >= 1")
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode={decode!r} is invalid; valid: {', '.join(DECODE_MODES)}")
        self.n_layers, self.d_model, self.n_latents = n_layers, d_model, n_latents
        self.decode_mode = decode
        self.sparsifier_config = sparsifier or SparsifierConfig()
        self.sparsifier = build_sparsifier(self.sparsifier_config, n_layers, n_latents)
        self.W_enc = nn.Parameter(torch.empty(n_layers, d_model, n_latents))
        self.b_enc = nn.Parameter(torch.empty(n_layers, n_latents))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(n_latents, n_layers - s, d_model)) for s in range(n_layers)]
        )
        self.b_dec = nn.Parameter(torch.empty(n_layers, d_model))
        self.register_buffer("input_scale", torch.ones(n_layers))
        self.register_buffer("output_scale", torch.ones(n_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights as described in the class docstring."""
        for s, w_dec in enumerate(self.W_dec):
            bound = 1.0 / math.sqrt(self.n_latents * (self.n_layers - s))
            w_dec.uniform_(-bound, bound)
            own = w_dec[:, 0, :]
            self.W_enc[s].copy_((own / own.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def set_normalisation(
        self, input_scale: Tensor, output_scale: Tensor, output_mean: Tensor | None = None
    ) -> None:
        """Set the per-layer scales (call before training; they are buffers, checkpointed).

        Args:
            input_scale: [L], x_scaled = x * input_scale (sqrt(d / E||x_l||^2)).
            output_scale: [L], y_scaled = y * output_scale (sqrt(d / E||y_l||^2)).
            output_mean: Optional raw mean of y [L, d]; if given, b_dec is set to the
                scaled mean (a better start than 0).

        Raises:
            CheckpointMismatchError: A tensor's shape does not match n_layers / d_model.
            ConfigError: A scale is not finite and positive.
        """
        scales = {"input_scale": input_scale, "output_scale": output_scale}
        for name, value in scales.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            self._check_shape(name, value, (self.n_layers,))
            if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
                raise ConfigError(f"{name} must be finite and > 0, got {value.tolist()}")
            getattr(self, name).copy_(value)
        if output_mean is not None:
            mean = torch.as_tensor(output_mean, dtype=torch.float32)
            self._check_shape("output_mean", mean, (self.n_layers, self.d_model))
            self.b_dec.copy_(mean.to(self.output_scale.device) * self.output_scale[:, None])

    @staticmethod
    def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointMismatchError(
                f"{name} has shape {list(tensor.shape)}, expected {list(expected)}"
            )

    def _check_activations(self, name: str, x: Tensor) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.n_layers, self.d_model):
            raise CheckpointMismatchError(
                f"{name} has shape {list(x.shape)}, expected [B, {self.n_layers}, {self.d_model}]"
                f" (n_layers={self.n_layers}, d_model={self.d_model})"
            )

    def scale_inputs(self, x: Tensor) -> Tensor:
        """Raw x [B, L, d] -> scaled x [B, L, d]."""
        return x * self.input_scale[:, None].to(x.dtype)

    def scale_targets(self, y: Tensor) -> Tensor:
        """Raw y [B, L, d] -> scaled y [B, L, d] (what the loss compares y_hat_scaled with)."""
        return y * self.output_scale[:, None].to(y.dtype)

    # ------------------------------------------------------------------ encode / decode

    def _want_codes(self) -> bool:
        if not self.sparsifier.sparse_grad_exact and torch.is_grad_enabled():
            return False  # `forward` decodes densely anyway (JumpReLU), codes would be wasted
        if self.decode_mode == "sparse":
            return True
        return self.decode_mode == "auto" and self.sparsifier.codes_are_cheap

    def encode(self, x: Tensor) -> Encoding:
        """Encode all layers at once (training mode also updates dead-latent statistics).

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            Encoding(pre [B, L, F], z [B, L, F], codes [B, L, k] or None).
        """
        pre = self.pre_activations(x)
        z, codes = self.sparsifier.activate(pre, want_codes=self._want_codes())
        return Encoding(pre, z, codes)

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations in scaled space, no sparsifier (and no statistics).

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            pre [B, L, F] = (x_l * input_scale_l) @ W_enc[l] + b_enc[l].
        """
        self._check_activations("x", x)
        return torch.einsum("bld,ldf->blf", self.scale_inputs(x), self.W_enc) + self.b_enc

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """Encode one layer (for layer-by-layer replacement); no statistics update.

        Args:
            layer: Source layer index.
            x: Raw MLP input of that layer [..., d].

        Returns:
            z_layer [..., F].
        """
        x_s = x * self.input_scale[layer].to(x.dtype)
        pre = x_s @ self.W_enc[layer] + self.b_enc[layer]
        return self.sparsifier.activate_layer(layer, pre)

    def _prefers_sparse(self, codes: SparseCodes | None) -> bool:
        if codes is None or self.decode_mode == "dense":
            return False
        if self.decode_mode == "auto" and codes.values.shape[-1] * AUTO_SPARSE_RATIO > (
            self.n_latents
        ):
            return False
        return _load_sparse_decode() is not None

    def decode_scaled(self, z: Tensor | SparseCodes, bias: bool = True) -> Tensor:
        """Decode in scaled space.

        Args:
            z: Dense activations [B, L, F] or SparseCodes [B, L, k].
            bias: Add b_dec (AuxK decodes without it).

        Returns:
            y_hat_scaled [B, L, d].
        """
        if isinstance(z, SparseCodes):
            if self._prefers_sparse(z):
                sparse_decode = _load_sparse_decode()
                b_dec = self.b_dec if bias else torch.zeros_like(self.b_dec)
                return sparse_decode(z, list(self.W_dec), b_dec)
            z = codes_to_dense(z, self.n_latents)
        return self._dense_decode(z, bias)

    def _dense_decode(self, z: Tensor, bias: bool) -> Tensor:
        """Scaled-space decode of dense z [B, L, F] -> [B, L, d], one matmul per source."""
        n_tokens = z.shape[0]
        shape = (n_tokens, self.n_layers, self.d_model)
        out = self.b_dec.expand(shape).clone() if bias else z.new_zeros(shape)
        for s, w_dec in enumerate(self.W_dec):
            term = z[:, s] @ w_dec.reshape(self.n_latents, -1)
            out[:, s:] += term.reshape(n_tokens, self.n_layers - s, self.d_model)
        return out

    def decode(self, z: Tensor | SparseCodes) -> Tensor:
        """Decode activations into raw-space MLP outputs.

        Args:
            z: Dense activations [B, L, F] or SparseCodes [B, L, k] (scaled space).

        Returns:
            y_hat [B, L, d] in raw space.
        """
        return self.decode_scaled(z) / self.output_scale[:, None]

    def _fused_topk_applies(self) -> bool:
        """Whether `forward` takes the fused TopK path (see `forward`)."""
        sparsifier = self.sparsifier
        if not (self.training and torch.is_grad_enabled()):
            return False
        if type(sparsifier) not in (ReLUTopK, AbsTopK):  # per-token TopK only (not BatchTopK)
            return False
        if self.decode_mode == "dense" or (
            self.decode_mode == "auto"
            and self.sparsifier_config.k * AUTO_SPARSE_RATIO > self.n_latents
        ):
            return False
        return _load_topk_encode() is not None and _load_sparse_decode() is not None

    def _encode_fused(self, x: Tensor) -> Encoding:
        """Training encode of relu/abs TopK through `sparse_decode.topk_encode`.

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            Encoding(None, None, codes [B, L, k], aux_codes [B, L, k_aux] or None); the
            dead-latent statistics are updated from the batch's fired latents.
        """
        self._check_activations("x", x)
        sparsifier, config = self.sparsifier, self.sparsifier_config
        topk_encode = functools.partial(
            _load_topk_encode(),
            self.scale_inputs(x),
            self.W_enc,
            self.b_enc,
            config.k,
            signed=sparsifier.signed,
            aux_k=min(config.aux_k, self.n_latents),
        )
        distributed = _is_distributed()
        # One pass picks the AuxK codes from this batch's fired latents. Under DDP "dead"
        # depends on every rank's batch (`record_fired` all-reduces), known only after the
        # pass: a second pass then picks them among the dead latents (only when some are).
        candidates = None if distributed else sparsifier.aux_candidates(x.shape[0])
        result = topk_encode(aux_candidates=candidates)
        sparsifier.record_fired(result.fired, x.shape[0])
        if distributed and config.aux_coeff > 0:
            dead = sparsifier.dead_mask()
            if bool(dead.any()):
                result = result._replace(**_aux_fields(topk_encode(aux_candidates=dead)))
        codes = SparseCodes(result.values, result.indices)
        aux = SparseCodes(result.aux_values, result.aux_indices)
        return Encoding(None, None, codes, aux if aux.values.shape[-1] else None)

    def forward(self, x: Tensor) -> CLTOutput:
        """Encode and decode every layer.

        Training ReLU-/Abs-TopK with sparse decoding (`decode="sparse"`, or `"auto"` with
        k * 8 <= F) and gradients enabled takes a fused path: `sparse_decode.topk_encode`
        computes the codes layer by layer and back-propagates only through the kept
        latents, so no [B, L, F] tensor is kept; `encoding.pre` and `encoding.z` are then
        None (the AuxK codes travel in `encoding.aux_codes`). Same values and gradients.

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            CLTOutput(y_hat raw [B, L, d], y_hat_scaled [B, L, d], encoding).
        """
        if self._fused_topk_applies():
            encoding = self._encode_fused(x)
            y_hat_scaled = self.decode_scaled(encoding.codes)
            return CLTOutput(y_hat_scaled / self.output_scale[:, None], y_hat_scaled, encoding)
        encoding = self.encode(x)
        use_codes = self._prefers_sparse(encoding.codes) and (
            self.sparsifier.sparse_grad_exact or not torch.is_grad_enabled()
        )
        source = encoding.codes if use_codes else encoding.z
        y_hat_scaled = self.decode_scaled(source)
        return CLTOutput(y_hat_scaled / self.output_scale[:, None], y_hat_scaled, encoding)

    def decode_target(self, target: int, zs: Sequence[Tensor]) -> Tensor:
        """Raw y_hat of one target layer from the activations of sources 0..target.

        Args:
            target: Target layer index l.
            zs: z_0 .. z_l, each [..., F] (extra entries after z_l are ignored).

        Returns:
            y_hat_l [..., d] in raw space.
        """
        if len(zs) < target + 1:
            raise ValueError(f"decode_target({target}) needs {target + 1} sources, got {len(zs)}")
        y = self.b_dec[target]
        for s in range(target + 1):
            y = y + zs[s] @ self.W_dec[s][:, target - s]
        return y / self.output_scale[target]

    def contributions(self, z: Tensor | SparseCodes) -> Tensor:
        """Every (source, target) term of the reconstruction, raw space.

        Args:
            z: Activations [B, L, F] or SparseCodes [B, L, k].

        Returns:
            [B, L_src, L_tgt, d]: entry (s, l) = z_s @ W_dec[s->l] / output_scale[l]; zero
            where s > l. Summed over sources plus b_dec / output_scale it equals y_hat.
        """
        if isinstance(z, SparseCodes):
            z = codes_to_dense(z, self.n_latents)
        n_tokens = z.shape[0]
        out = z.new_zeros(n_tokens, self.n_layers, self.n_layers, self.d_model)
        for s, w_dec in enumerate(self.W_dec):
            term = (z[:, s] @ w_dec.reshape(self.n_latents, -1)).reshape(
                n_tokens, self.n_layers - s, self.d_model
            )
            out[:, s, s:] = term / self.output_scale[s:, None]
        return out

    def decoder_norms(self) -> Tensor:
        """Norm of each latent's scaled-space decoder over all its targets, concatenated.

        Returns:
            [L, F]: entry (s, i) = ||W_dec[s][i]|| over the [L - s, d] block.
        """
        return torch.stack([torch.linalg.vector_norm(w, dim=(1, 2)) for w in self.W_dec])

    def auxiliary_losses(
        self, output: CLTOutput, y_scaled: Tensor, progress: float
    ) -> dict[str, Tensor]:
        """The sparsifier's extra loss terms (already weighted) for one forward.

        Args:
            output: This batch's forward output.
            y_scaled: Scaled targets [B, L, d] (`scale_targets(y)`).
            progress: Fraction of training done, in [0, 1].

        Returns:
            Name -> scalar tensor (`sparsity`/`preact` for JumpReLU, `auxk` for TopK).
        """
        enc = output.encoding
        ctx = LossContext(
            pre=enc.pre,
            z=enc.z,
            codes=enc.codes,
            y_scaled=y_scaled,
            y_hat_scaled=output.y_hat_scaled,
            decoder_norms=self.decoder_norms() if self.sparsifier.needs_decoder_norms else None,
            decode_fn=functools.partial(self.decode_scaled, bias=False),
            progress=progress,
            aux_codes=enc.aux_codes,
        )
        return self.sparsifier.losses(ctx)

    # ------------------------------------------------------------------ size

    def param_count(self) -> int:
        """Number of trainable parameters: L d F + L F + F d L(L+1)/2 + L d (+ L F thresholds)."""
        return sum(p.numel() for p in self.parameters())

    def memory_estimate(self, optimizer: str = "adamw", bytes_per_value: int = 4) -> int:
        """Bytes for parameters, gradients and optimizer states (activations excluded).

        Args:
            optimizer: `adamw`/`adam` (2 states), `sgd_momentum` (1) or `sgd` (0).
            bytes_per_value: 4 for fp32.

        Returns:
            param_count * bytes_per_value * (2 + states).
        """
        if optimizer not in OPTIMIZER_STATES:
            raise ConfigError(
                f"optimizer={optimizer!r} is unknown; valid: {', '.join(OPTIMIZER_STATES)}"
            )
        return self.param_count() * bytes_per_value * (2 + OPTIMIZER_STATES[optimizer])

    # ------------------------------------------------------------------ export

    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """Per-layer tensors with the scales folded in, named as circuit-tracer names them.

        Returns:
            W_enc_{i} [F, d], b_enc_{i} [F], W_dec_{i} [F, L - i, d], b_dec_{i} [d] and,
            for threshold-based sparsifiers, threshold_{i} [F]; all contiguous, on the CPU.
        """
        in_s, out_s = self.input_scale.float(), self.output_scale.float()
        threshold = self.sparsifier.export_threshold()
        tensors: dict[str, Tensor] = {}
        for i in range(self.n_layers):
            dtype = self.W_enc.dtype
            tensors[f"W_enc_{i}"] = (self.W_enc[i].float() * in_s[i]).T.to(dtype)
            tensors[f"b_enc_{i}"] = self.b_enc[i].clone()
            tensors[f"W_dec_{i}"] = (self.W_dec[i].float() / out_s[i:, None]).to(dtype)
            tensors[f"b_dec_{i}"] = (self.b_dec[i].float() / out_s[i]).to(dtype)
            if threshold is not None:
                tensors[f"threshold_{i}"] = threshold[i].detach().clone()
        return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    def export_config(self) -> dict[str, Any]:
        """The JSON-able description written to config.json."""
        has_threshold = self.sparsifier.export_threshold() is not None
        return {
            "format": "clt-lightning",
            "format_version": FORMAT_VERSION,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_latents": self.n_latents,
            "sparsifier": dataclasses.asdict(self.sparsifier_config),
            "decode": self.decode_mode,
            "activation_function": "jump_relu" if has_threshold else self.sparsifier_config.name,
            "weights_file": WEIGHTS_FILE,
            "tensor_shapes": {
                "W_enc_{i}": "[n_latents, d_model]",
                "b_enc_{i}": "[n_latents]",
                "W_dec_{i}": "[n_latents, n_layers - i, d_model] (index j = target i + j)",
                "b_dec_{i}": "[d_model]",
                "threshold_{i}": "[n_latents] (threshold-based sparsifiers only)",
            },
            "normalisation": {
                "folded": True,
                "input_scale": self.input_scale.tolist(),
                "output_scale": self.output_scale.tolist(),
            },
        }

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json and clt.safetensors (scales folded in; reads raw activations).

        The folder is replaced as a whole (old export or new, never a mix, even when killed).

        Args:
            path: Output directory (created if missing; an existing export is replaced).

        Returns:
            The directory.

        Raises:
            CheckpointMismatchError: A weight is NaN or Inf (names the tensor).
            ConfigError: `path` is a file or holds files other than an export's.
        """
        path = Path(path)
        tensors = self.export_tensors()
        raise_non_finite(tensors, "the CLT to export")
        metadata = {"format": "clt-lightning", "format_version": str(FORMAT_VERSION)}
        weights = save(tensors, metadata=metadata)
        config = {**self.export_config(), "weights_sha256": hashlib.sha256(weights).hexdigest()}
        with commit_folder(path, _export_owned, "a CLT export") as staging:
            atomic_write_bytes(staging / WEIGHTS_FILE, weights)
            atomic_write_bytes(
                staging / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode()
            )
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> CrossLayerTranscoder:
        """Load a directory written by `save_pretrained` (scales = 1, weights raw-space).

        Args:
            path: Directory with config.json and clt.safetensors.
            map_location: Device for the loaded model.

        Returns:
            The model, in eval mode; its raw-space outputs equal the exported model's.

        Raises:
            DataNotFoundError: The directory or one of its files does not exist.
            CheckpointMismatchError: Unreadable file, unsupported version, missing tensor,
                a tensor whose shape does not match config.json, NaN/Inf weights, or
                weights whose sha256 differs from config.json's (another export's).
        """
        path = Path(path)
        with contextlib.suppress(OSError):  # read-only storage: read what is there
            recover_folder(path)
        config = _read_config(path / CONFIG_FILE)
        try:
            sparsifier = SparsifierConfig(**config["sparsifier"])
        except TypeError as err:
            raise CheckpointMismatchError(f"{path / CONFIG_FILE}: bad sparsifier: {err}") from err
        model = cls(
            config["n_layers"],
            config["d_model"],
            config["n_latents"],
            sparsifier=sparsifier,
            decode=config.get("decode", "auto"),
        )
        weights = path / WEIGHTS_FILE
        model.load_exported(_read_tensors(weights), source=str(weights))
        _check_weights_hash(weights, config.get("weights_sha256"), path / CONFIG_FILE)
        return model.to(map_location).eval()

    def _expected_export_shapes(self) -> dict[str, tuple[int, ...]]:
        F, d, L = self.n_latents, self.d_model, self.n_layers
        has_threshold = self.sparsifier.export_threshold() is not None
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(L):
            shapes |= {f"W_enc_{i}": (F, d), f"b_enc_{i}": (F,)}
            shapes |= {f"W_dec_{i}": (F, L - i, d), f"b_dec_{i}": (d,)}
            if has_threshold:
                shapes[f"threshold_{i}"] = (F,)
        return shapes

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor], source: str = "exported tensors") -> None:
        """Load raw-space tensors from `export_tensors`' naming; sets both scales to 1.

        Args:
            tensors: Name -> tensor, as written by `export_tensors`.
            source: Where they came from (for error messages).

        Raises:
            CheckpointMismatchError: A tensor is missing, has the wrong shape, or holds
                NaN or Inf.
        """
        expected = self._expected_export_shapes()
        for name, shape in expected.items():
            if name not in tensors:
                raise CheckpointMismatchError(f"{source}: tensor {name} is missing")
            found = tuple(tensors[name].shape)
            if found != shape:
                raise CheckpointMismatchError(
                    f"{source}: tensor {name} has shape {list(found)}, expected {list(shape)}"
                    f" (n_layers={self.n_layers}, d_model={self.d_model},"
                    f" n_latents={self.n_latents})"
                )
        raise_non_finite({name: tensors[name] for name in expected}, source)
        extra = sorted(set(tensors) - set(expected))
        if extra:
            log.warning("%s: ignoring unexpected tensors %s", source, extra)
        for i in range(self.n_layers):
            self.W_enc[i].copy_(tensors[f"W_enc_{i}"].T)
            self.b_enc[i].copy_(tensors[f"b_enc_{i}"])
            self.W_dec[i].copy_(tensors[f"W_dec_{i}"])
            self.b_dec[i].copy_(tensors[f"b_dec_{i}"])
        if f"threshold_{0}" in expected:
            self.sparsifier.load_threshold(
                torch.stack([tensors[f"threshold_{i}"] for i in range(self.n_layers)])
            )
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)


def _export_owned(entry: Path) -> bool:
    """Entries of an export folder (the two files, and temp files of an earlier write)."""
    return entry.name in (CONFIG_FILE, WEIGHTS_FILE) or (
        entry.name.startswith(".") and entry.name.endswith(".tmp")
    )


def _check_weights_hash(weights: Path, expected: str | None, config: Path) -> None:
    """Exports since config.json recorded `weights_sha256`: the pair must belong together."""
    if expected is not None and file_sha256(weights) != expected:
        raise CheckpointMismatchError(
            f"{weights} is not the weights file {config} was written with (sha256 differs): "
            "the folder mixes two exports, or the weights were edited; export the checkpoint "
            "again (or delete weights_sha256 from config.json to accept edited weights)"
        )


def _read_config(path: Path) -> dict[str, Any]:
    """Read and check config.json of an exported CLT."""
    if not path.is_file():
        if previous_folder(path.parent).is_dir():
            raise DataNotFoundError(
                f"{path} does not exist: an interrupted export left the previous one in "
                f"{previous_folder(path.parent)}; rerun the export (or rename that folder back)"
            )
        raise DataNotFoundError(
            f"{path} does not exist; expected a directory written by "
            "CrossLayerTranscoder.save_pretrained (config.json + clt.safetensors)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: not valid JSON: {err}") from err
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path}: format_version={version!r} is not supported (this package reads <= "
            f"{FORMAT_VERSION})"
        )
    for key in ("n_layers", "d_model", "n_latents", "sparsifier"):
        if key not in config:
            raise CheckpointMismatchError(f"{path}: key {key!r} is missing")
    for key in ("n_layers", "d_model", "n_latents"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointMismatchError(f"{path}: {key} is {value!r}, not a positive integer")
    if not isinstance(config["sparsifier"], dict):
        raise CheckpointMismatchError(f"{path}: sparsifier is not an object")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, naming it in any error."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist (written by save_pretrained)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: cannot be read as safetensors: {err}") from err
