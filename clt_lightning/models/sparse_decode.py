"""Sparse decoding: touch only the k active latents of each (token, source layer).

`sparse_decode` computes ``y_hat[:, l] = b_dec[l] + sum_{s<=l} z_s @ W_dec[s][:, l - s]``
from the k active (value, index) pairs per (token, source) instead of dense z. It is used
by `CrossLayerTranscoder` when it decodes sparsely (`decode="sparse"`, or `"auto"` with
k * 8 <= F); in training, ReLU-/Abs-TopK pair it with the fused encoder
(`models/topk_encode.py`), and both take their large gradients from
`gradient_recycler.GRAD_RECYCLER`.

The dense decoder costs ``2 * F * d * L(L+1)/2`` FLOP per token (~1.5 GFLOP forward,
~4.4 GFLOP forward+backward at L=12, d=768, F=12,288); with TopK codes the same sum is a
weighted sum of ``k`` decoder rows per (token, source), ``k / F`` of the work (1/96).

Design decisions:

- One call per *source* layer: ``W_dec[s]`` [F, L - s, d] is viewed as a table
  ``[F, (L - s) * d]``, so a single weighted row gather yields the contribution of source
  ``s`` to every target ``l >= s`` at once; it is added into ``y_hat[:, s:]``
  (`accumulate_sources`).
- Backends: ``"embedding_bag"`` (the default, ``"torch"``; `models/embedding_bag_decode.py`)
  and ``"triton"``, an optional fused CUDA forward (`models/triton_decode.py`) that
  ``backend="auto"`` picks only when CUDA and Triton are available *and* the environment
  variable ``CLT_FUSED_DECODE=1`` is set; otherwise ``auto`` means ``torch``. A plain
  ``index_select`` + ``bmm`` gather, the baseline the decode benchmark compares with,
  lives in ``benchmarks/gather_decode.py``.
- Cost model: the sparse decode is memory-bound, not FLOP-bound. Each active latent
  reads its whole ``(L - s) * d`` decoder row, ~30 MB per token at the paper shape in fp32
  for the forward, as much again for the ``values`` gradient and twice that for the
  read-modify-write of the gradient rows. The speed-up is therefore set by the machine's
  FLOP/byte ratio and by how often rows repeat within a batch, not by F / k = 96.
- Measured with ``benchmarks/bench_train_step.py`` (whole training step, paper shape,
  B=128, fp32, 1 thread, shared 2-core CPU, 2026-11-30): ReLU-TopK ~6.0x and Abs-TopK
  ~5.6x the tokens/s of the dense step (1.79 s and 1.85 s per step), with the same loss,
  1.5x the encoder-only plus AdamW-only steps; ``benchmarks/bench_memory.py``: 0.17x the
  dense step's activation memory. See ``docs/benchmarks.md`` for the current numbers.
- No backend builds a dense [B, L, F] code tensor or its gradient: the codes' gradient is
  [B, L, k]. The ``W_dec`` gradient is dense (it is the parameter's gradient, and AdamW
  needs dense gradients), but only the active rows receive non-zero values. A row-sparse
  gradient with a lazy AdamW was considered and not done: at B * k >= F (B >= 96 here)
  most rows are touched every step (74% at B=128 for random codes), so it would save
  little, and lazy updates change AdamW's semantics.
- Dense codes are accepted (converted by :func:`dense_to_sparse`), but their gradient
  reaches only the non-zero entries of ``z``; the dense decoder's gradient is non-zero
  everywhere. That is exact for TopK sparsifiers (nothing flows back through an
  unselected latent), but not for JumpReLU, whose threshold pseudo-derivative reads
  ``dL/dz`` at latents just below the threshold: decode JumpReLU codes densely.
- Duplicate indices within one (token, source) row are allowed and summed, as in the
  dense reference. Top-k never produces them, but :func:`dense_to_sparse` pads short
  rows with index 0 (value 0), which may repeat an active index 0.
- Values are cast to the decoder's dtype (``embedding_bag`` requires equal dtypes); the
  result has the decoder's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from clt_lightning.errors import ConfigError
from clt_lightning.models.embedding_bag_decode import EmbeddingBagDecode
from clt_lightning.models.triton_decode import TritonDecode, triton_available

BACKENDS = ("torch", "auto", "embedding_bag", "triton")
"""Valid ``backend`` names for :func:`sparse_decode`."""

FUSED_ENV_VAR = "CLT_FUSED_DECODE"
"""Set to ``1`` to let ``backend="auto"`` use the Triton kernel (see `models/triton_decode.py`)."""

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Upper bound on the ``value * grad`` rows the backward adds into a decoder gradient at
once, for dtypes without a sparse matrix product (bytes; see `embedding_bag_decode`)."""

SourceDecoder = Callable[[Tensor, Tensor, Tensor], Tensor]
"""One source's decode: values [B, k], indices [B, k], W_dec[s] [F, L - s, d] ->
[B, (L - s) d]."""


def dense_to_sparse(z: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Convert dense codes to (values, indices) of their non-zero entries.

    Rows with fewer than ``k`` non-zeros are padded with index 0 and value 0. Gradients
    flow from ``values`` back to the non-zero entries of ``z`` only (padding slots pass
    none). On CUDA, ``k=None``
    costs one device synchronisation (the maximum count is read on the host).

    Args:
        z: Dense codes [..., F] (for example [B, L, F]).
        k: Number of slots per row. ``None`` uses the largest non-zero count of any row
            (at least 1). A row with more than ``k`` non-zeros is an error.

    Returns:
        ``(values, indices)``, both [..., k]: ``values`` in ``z``'s dtype, ``indices``
        int64. The same fields, in the same order, as ``SparseCodes``.

    Raises:
        ValueError: If ``k`` is smaller than a row's non-zero count or larger than F.
    """
    n_latents = z.shape[-1]
    active = z != 0
    n_active = int(active.sum(-1).max()) if z.numel() else 0
    if k is None:
        k = max(1, n_active)
    elif n_active > k:
        raise ValueError(f"dense_to_sparse: a row has {n_active} non-zeros but k={k}")
    if k > n_latents:
        raise ValueError(f"dense_to_sparse: k={k} exceeds the number of latents {n_latents}")
    # Non-zeros have |z| > 0, so the k largest magnitudes include all of them.
    order = z.detach().abs().topk(k, dim=-1, sorted=False).indices
    keep = active.gather(-1, order)
    indices = torch.where(keep, order, 0)
    values = torch.where(keep, z.gather(-1, order), 0)
    return values, indices


def sparse_decode(
    codes: Any,
    W_dec: Sequence[Tensor],
    b_dec: Tensor,
    backend: str = "torch",
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Decode sparse codes: ``y[..., l, :] = b_dec[l] + sum_{s<=l} z_s @ W_dec[s][:, l - s]``.

    Args:
        codes: ``SparseCodes`` (or any object with ``values``/``indices`` attributes, or a
            ``(values, indices)`` pair) with values [..., L, k] float and indices
            [..., L, k] int; or dense codes [..., L, F], converted by
            :func:`dense_to_sparse` (with ``k=None``); their gradient then reaches only
            the non-zero entries (right for TopK, wrong for JumpReLU, see the module
            docstring).
        W_dec: Per-source decoders; ``W_dec[s]`` is [F, L - s, d] (index 0 along dim 1
            is target ``s``).
        b_dec: Decoder bias [L, d].
        backend: One of :data:`BACKENDS`. ``"torch"`` is ``"embedding_bag"``; ``"auto"``
            is ``"triton"`` only on CUDA with Triton installed and ``CLT_FUSED_DECODE=1``,
            else ``"torch"``.
        chunk_bytes: Cap on the ``value * grad`` rows that the backward adds into the
            decoder gradient at once, for dtypes other than float32/float64 (bytes).

    Returns:
        Reconstruction ``y_hat`` [..., L, d] in ``W_dec``'s dtype.

    Raises:
        ConfigError: For an unknown backend, or ``"triton"`` where it cannot run.
        ValueError: If the shapes of codes, decoders and bias do not agree.
    """
    values, indices = _unpack_codes(codes)
    n_layers, d_model = _check_shapes(values, indices, W_dec, b_dec)
    resolved = _resolve_backend(backend, W_dec[0])
    function = TritonDecode if resolved == "triton" else EmbeddingBagDecode
    lead_shape = values.shape[:-2]
    k = values.shape[-1]
    values = values.reshape(-1, n_layers, k).to(W_dec[0].dtype)
    indices = indices.reshape(-1, n_layers, k)

    def decode_source(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        return function.apply(values, indices, weight, chunk_bytes)

    y = accumulate_sources(values, indices, W_dec, b_dec, decode_source)
    return y.reshape(*lead_shape, n_layers, d_model)


def accumulate_sources(
    values: Tensor,
    indices: Tensor,
    W_dec: Sequence[Tensor],
    b_dec: Tensor,
    decode_source: SourceDecoder,
) -> Tensor:
    """``y[:, l] = b_dec[l] + sum_{s<=l} decode_source(values[:, s], indices[:, s], W_dec[s])``.

    The per-source loop of every backend: source ``s``'s [B, (L - s) d] contribution is
    added into ``y[:, s:]``.

    Args:
        values: Codes' values [B, L, k] in ``W_dec``'s dtype.
        indices: Their latent indices [B, L, k].
        W_dec: Per-source decoders, ``W_dec[s]`` [F, L - s, d].
        b_dec: Decoder bias [L, d].
        decode_source: One source's weighted row sum (`SourceDecoder`).

    Returns:
        y [B, L, d]; just ``b_dec`` per token when k = 0.
    """
    n_tokens, n_layers, k = values.shape
    d_model = b_dec.shape[1]
    y = b_dec.expand(n_tokens, n_layers, d_model).clone()
    if k == 0:
        return y
    for source in range(n_layers):
        contribution = decode_source(values[:, source], indices[:, source], W_dec[source])
        y[:, source:] += contribution.view(n_tokens, n_layers - source, d_model)
    return y


def _unpack_codes(codes: Any) -> tuple[Tensor, Tensor]:
    """Return (values, indices) from SparseCodes, a pair, or dense codes."""
    if isinstance(codes, Tensor):
        return dense_to_sparse(codes)
    if hasattr(codes, "values") and hasattr(codes, "indices"):
        return codes.values, codes.indices
    values, indices = codes
    return values, indices


def _check_shapes(
    values: Tensor, indices: Tensor, W_dec: Sequence[Tensor], b_dec: Tensor
) -> tuple[int, int]:
    """Validate shapes; return (L, d)."""
    n_layers, d_model = b_dec.shape
    if values.shape != indices.shape or values.dim() < 2 or values.shape[-2] != n_layers:
        raise ValueError(
            f"sparse_decode: values {tuple(values.shape)} and indices {tuple(indices.shape)} "
            f"must both be [..., L={n_layers}, k]"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sparse_decode: indices must be int64 or int32, got {indices.dtype}")
    if len(W_dec) != n_layers:
        raise ValueError(f"sparse_decode: {len(W_dec)} decoders for L={n_layers} layers")
    n_latents = W_dec[0].shape[0]
    for source, weight in enumerate(W_dec):
        if tuple(weight.shape) != (n_latents, n_layers - source, d_model):
            raise ValueError(
                f"sparse_decode: W_dec[{source}] is {tuple(weight.shape)}, expected "
                f"({n_latents}, {n_layers - source}, {d_model})"
            )
    return n_layers, d_model


def _resolve_backend(backend: str, like: Tensor) -> str:
    """Map ``torch``/``auto`` to a concrete backend and check ``triton`` can run."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown sparse decode backend {backend!r}; valid: {list(BACKENDS)}")
    fused_ok = like.is_cuda and triton_available()
    if backend == "auto":
        return "triton" if fused_ok and os.environ.get(FUSED_ENV_VAR) == "1" else "embedding_bag"
    if backend == "torch":
        return "embedding_bag"
    if backend == "triton" and not fused_ok:
        raise ConfigError(
            "sparse decode backend 'triton' needs the decoder on a CUDA device and the "
            f"'triton' package (decoder device: {like.device}); use 'torch' instead"
        )
    return backend
