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
- The CLT computes pre-activations and decodes; everything in between belongs to the
  sparsifier (`models/sparsifiers.py`): `forward` asks it for the encoding of the batch
  (`Sparsifier.encode`, which may fuse the encoder with its selection and return only
  codes) and decodes the codes sparsely (`models/sparse_decode.py`) when the decode mode
  asks for it, else the dense z. No code path depends on the sparsifier's class.
- `save_pretrained` folds the scales into the weights so the exported CLT reads raw
  activations, with circuit-tracer's tensor names (`models/clt_export.py`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.models import clt_export
from clt_lightning.models.encoding import (
    DecodeRequest,
    EncoderInput,
    Encoding,
    SparseCodes,
    codes_to_dense,
)
from clt_lightning.models.sparse_decode import sparse_decode
from clt_lightning.models.sparsifiers import LossContext, SparsifierConfig, build_sparsifier

log = logging.getLogger(__name__)

DECODE_MODES = ("dense", "sparse", "auto")
AUTO_SPARSE_RATIO = 8
"""`auto` decodes sparsely when k * AUTO_SPARSE_RATIO <= F (gathers beat a dense matmul)."""
OPTIMIZER_STATES = {"adamw": 2}
"""Per-parameter state tensors kept by the optimizer `CLTModule` trains with (AdamW's two
moments), for `memory_estimate`."""


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
    # ------------------------------------------------------------------ encode / decode

    def decode_request(self) -> DecodeRequest:
        """How this CLT decodes: its `decode` mode and the widest codes `auto` decodes
        sparsely (F // AUTO_SPARSE_RATIO); what `Sparsifier.encode` plans for."""
        return DecodeRequest(self.decode_mode, self.n_latents // AUTO_SPARSE_RATIO)

    def encode(self, x: Tensor) -> Encoding:
        """Encode all layers at once, unfused (training mode also updates dead-latent
        statistics).

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            Encoding(pre [B, L, F], z [B, L, F], codes [B, L, k] or None).
        """
        pre = self.pre_activations(x)
        wanted = self.sparsifier.wants_codes(self.decode_request())
        z, codes = self.sparsifier.activate(pre, want_codes=wanted)
        return Encoding(pre, z, codes)

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations in scaled space, no sparsifier (and no statistics).

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            pre [B, L, F] = (x_l * input_scale_l) @ W_enc[l] + b_enc[l].
        """
        self._check_activations("x", x)
        return self._encoder_input(x).pre_activations()

    def _encoder_input(self, x: Tensor) -> EncoderInput:
        return EncoderInput(self.scale_inputs(x), self.W_enc, self.b_enc)

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
        return codes is not None and self.decode_request().decodes_sparsely(codes.values.shape[-1])

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

    def forward(self, x: Tensor) -> CLTOutput:
        """Encode and decode every layer.

        The sparsifier encodes (`Sparsifier.encode`). Training ReLU-/Abs-TopK with sparse
        decoding (`decode="sparse"`, or `"auto"` with k * 8 <= F) and gradients enabled
        takes a fused path: the codes are computed layer by layer and back-propagate only
        through the kept latents, so no [B, L, F] tensor is kept; `encoding.pre` and
        `encoding.z` are then None (the AuxK codes travel in `encoding.aux_codes`). Same
        values and gradients. Codes are decoded sparsely when the decode mode asks for it
        (or when there is no z), else z densely.

        Args:
            x: Raw MLP inputs [B, L, d].

        Returns:
            CLTOutput(y_hat raw [B, L, d], y_hat_scaled [B, L, d], encoding).
        """
        self._check_activations("x", x)
        encoding = self.sparsifier.encode(self._encoder_input(x), self.decode_request())
        use_codes = encoding.z is None or self._prefers_sparse(encoding.codes)
        y_hat_scaled = self.decode_scaled(encoding.codes if use_codes else encoding.z)
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
            optimizer: `adamw` (2 states: the optimizer of `CLTModule`).
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

    def export_tensors(self) -> dict[str, Tensor]:
        """Per-layer tensors with the scales folded in, named as circuit-tracer names them.

        Returns:
            See `clt_export.export_tensors`: W_enc_{i} [F, d], b_enc_{i} [F],
            W_dec_{i} [F, L - i, d], b_dec_{i} [d] (+ threshold_{i} [F]), on the CPU.
        """
        return clt_export.export_tensors(self)

    def export_config(self) -> dict[str, Any]:
        """The JSON-able description written to config.json."""
        return clt_export.export_config(self)

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
        return clt_export.save_export(self, path)

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
        config, sparsifier = clt_export.read_export(path)
        model = cls(
            config["n_layers"],
            config["d_model"],
            config["n_latents"],
            sparsifier=sparsifier,
            decode=config.get("decode", "auto"),
        )
        clt_export.load_export_weights(model, path, config)
        return model.to(map_location).eval()

    def load_exported(self, tensors: dict[str, Tensor], source: str = "exported tensors") -> None:
        """Load raw-space tensors from `export_tensors`' naming; sets both scales to 1.

        Args:
            tensors: Name -> tensor, as written by `export_tensors`.
            source: Where they came from (for error messages).

        Raises:
            CheckpointMismatchError: A tensor is missing, has the wrong shape, or holds
                NaN or Inf.
        """
        clt_export.load_exported(self, tensors, source)
