"""What a cross-layer transcoder's encoder produces, and the request that shapes it.

Shared by the CLT (`models/clt.py`), the sparsifiers (`models/sparsifiers.py`,
`models/topk.py`, `models/jumprelu.py`) and the sparse decoder: the encoder inputs
(`EncoderInput`), the latent activations in dense form (z [B, L, F]) or sparse form
(`SparseCodes`, k values and indices per token and layer), the `Encoding` of one forward
and the `DecodeRequest` with which the CLT tells a sparsifier how it will decode it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SparseCodes(NamedTuple):
    """The active latents of every token and layer, k per (token, layer)."""

    values: Tensor
    """Activation values [B, L, k] (float); padding entries are 0."""
    indices: Tensor
    """Latent indices [B, L, k] (int64) into the F latents of that layer."""


class Encoding(NamedTuple):
    """What `CrossLayerTranscoder.encode` and `Sparsifier.encode` return (scaled space)."""

    pre: Tensor | None
    """Pre-activations x_s @ W_enc + b_enc, [B, L, F]; None on a fused path."""
    z: Tensor | None
    """Latent activations [B, L, F] (dense, mostly zero); None on a fused path."""
    codes: SparseCodes | None
    """The active latents as values/indices [B, L, k], when the sparsifier made them."""
    aux_codes: SparseCodes | None = None
    """AuxK codes of dead latents, chosen by the fused TopK encoder (None elsewhere)."""


class EncoderInput(NamedTuple):
    """The encoder's operands; a sparsifier forms the pre-activations or fuses them."""

    x: Tensor
    """Scaled inputs [B, L, d]."""
    W_enc: Tensor
    """Encoders [L, d, F]."""
    b_enc: Tensor
    """Encoder biases [L, F]."""

    def pre_activations(self) -> Tensor:
        """pre [B, L, F] = x_l @ W_enc[l] + b_enc[l] for every layer (one einsum)."""
        return torch.einsum("bld,ldf->blf", self.x, self.W_enc) + self.b_enc


class DecodeRequest(NamedTuple):
    """How the CLT will decode an encoding (built by `CrossLayerTranscoder.decode_request`)."""

    mode: str
    """The CLT's `decode`: `dense`, `sparse` or `auto`."""
    auto_max_width: int
    """In `auto` mode, codes at most this wide are decoded sparsely (F // 8)."""

    def decodes_sparsely(self, width: int) -> bool:
        """Whether codes of `width` slots per (token, layer) go through the sparse decoder.

        Args:
            width: k, the codes' last dimension.

        Returns:
            True in `sparse` mode, and in `auto` mode when width <= auto_max_width.
        """
        return self.mode == "sparse" or (self.mode == "auto" and width <= self.auto_max_width)


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
