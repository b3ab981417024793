"""Sparse training path of the cross-layer transcoder: touch only the k active latents.

Three pieces, used by `CrossLayerTranscoder.forward` when it trains ReLU-/Abs-TopK with
sparse decoding (`decode="sparse"`, or `"auto"` with k * 8 <= F):

1. :func:`sparse_decode`: ``y_hat[:, l] = b_dec[l] + sum_{s<=l} z_s @ W_dec[s][:, l - s]``
   from the k active (value, index) pairs per (token, source) instead of dense z.
2. :func:`topk_encode`: the TopK encoder fused with its selection, keeping no [B, L, F]
   tensor and back-propagating through the kept latents only.
3. :class:`GradientRecycler`: the multi-GB gradients of ``W_dec`` and ``W_enc`` reuse last
   step's memory instead of fresh, page-faulted memory (CPU).

The dense decoder costs ``2 * F * d * L(L+1)/2`` FLOP per token (~1.5 GFLOP forward,
~4.4 GFLOP forward+backward at L=12, d=768, F=12,288); with TopK codes the same sum is a
weighted sum of ``k`` decoder rows per (token, source), ``k / F`` of the work (1/96).

Design decisions:

- One call per *source* layer: ``W_dec[s]`` [F, L - s, d] is viewed as a table
  ``[F, (L - s) * d]``, so a single weighted row gather yields the contribution of source
  ``s`` to every target ``l >= s`` at once; it is added into ``y_hat[:, s:]``.
- Two pure-PyTorch decode backends compute that gather:

  * ``"embedding_bag"`` (the default, ``"torch"``): forward ``F.embedding_bag(indices,
    table, per_sample_weights=values, mode="sum")``, which never materialises the
    gathered rows (on the CPU in float32/float64: ``C @ table`` with ``C`` the sparse
    [B, F] code matrix stored latent-major, so a decoder row shared by several tokens is
    read from memory once). Backward (:class:`_EmbeddingBagDecode`): the signed ``values``
    gradient as per-slot dot products ``<grad_out, row>`` (CPU float32/float64:
    ``torch.sparse.sampled_addmm`` at the latent-sorted entries of ``C^T``, again one
    read per shared row, ~2x faster than ATen's per-slot embedding-bag kernel used
    elsewhere), and the table gradient as ``C^T @ grad_out`` with the same matrix
    (:func:`sparse_matrix`; MKL's sparse BLAS on the CPU, cuSPARSE on CUDA)
    written with ``beta=0`` into a recycled gradient, so it needs no zeroing pass (other
    dtypes than float32/float64: ``index_add_`` of ``value * grad_out`` into a zeroed
    gradient, in cache-sized blocks, :data:`ADD_CHUNK_BYTES`).
  * ``"gather"``: a custom ``autograd.Function`` (``index_select`` on the flattened table
    + ``bmm``; backward re-gathers the rows and ``index_add_`` s into them). It chunks
    over tokens so the gathered block stays under ``chunk_bytes``: an unchunked
    [B, k, (L - s) * d] gather would be ~19 GB at B=4096 and the paper shape. Kept as
    the second implementation the tests check and as the backward of the fused kernel.

- Cost model: the sparse decode is memory-bound, not FLOP-bound. Each active latent
  reads its whole ``(L - s) * d`` decoder row, ~30 MB per token at the paper shape in fp32
  for the forward, as much again for the ``values`` gradient and twice that for the
  read-modify-write of the gradient rows. The speed-up is therefore set by the machine's
  FLOP/byte ratio and by how often rows repeat within a batch, not by F / k = 96.
- The fused encoder (:func:`topk_encode`) computes ``pre_l = x_l W_enc[l] + b_enc[l]`` one
  layer at a time ([B, F] at most), keeps the top k (and the AuxK candidates, see below),
  and saves only x and the [B, L, k] codes. Its backward touches the kept latents only
  (TopK passes no gradient to unselected latents, so this is the exact gradient): the
  ``W_enc`` gradient is ``x_l^T @ G`` with ``G`` the sparse [B, F] matrix of the kept
  values' gradients (:func:`sparse_matrix`, cost ~ B * k * d per layer instead of the
  ~ B * d * F of a GEMM with a dense [B, F] gradient of ``pre``), the ``b_enc`` gradient
  an index-add, the ``x`` gradient a column gather. The unfused path keeps ``pre``,
  ``ReLU(pre)`` and ``z`` ([B, L, F] each) for the backward and builds two more in it.
- AuxK needs the top ``aux_k`` *dead* latents of ``pre``, and "dead" depends on this
  batch: a latent is dead after the batch if it was a candidate (``tokens_since_fired + B
  >= dead_tokens``) and did not fire in it. The fused encoder knows which latents fired
  in a layer as soon as it has selected that layer's top k, so it picks the AuxK codes
  in the same pass; same codes as `sparsifiers._TopKBase.aux_codes` after the statistics
  update, with shorter layers padded by (index 0, value 0) slots that pass no gradient.
- Gradient recycling (:class:`GradientRecycler`): on the CPU a fresh 2.9 GB ``W_dec``
  gradient is page-faulted in by the kernel every step (measured ~1 GB/s here, ~2.2 s per
  step, most of the sparse step), while zeroing resident memory runs at ~10 GB/s. Buffers
  are reused only when nothing else references them, so results never change; on CUDA
  the caching allocator already reuses memory and nothing is recycled.
- Measured with ``benchmarks/bench_train_step.py`` (whole training step, paper shape,
  B=128, fp32, 1 thread, shared 2-core CPU, 2026-11-30): ReLU-TopK ~6.0x and Abs-TopK
  ~5.6x the tokens/s of the dense step (1.79 s and 1.85 s per step), with the same loss,
  1.5x the encoder-only plus AdamW-only steps; ``benchmarks/bench_memory.py``: 0.17x the dense step's activation
  memory. See ``docs/benchmarks.md`` for the current numbers.
- Neither decode backend builds a dense [B, L, F] code tensor or its gradient: the codes'
  gradient is [B, L, k]. The ``W_dec`` gradient is dense (it is the parameter's gradient,
  and AdamW needs dense gradients), but only the active rows receive non-zero values.
  A row-sparse gradient with a lazy AdamW was considered and not done: at B * k >= F
  (B >= 96 here) most rows are touched every step (74% at B=128 for random codes), so
  it would save little, and lazy updates change AdamW's semantics.
- Dense codes are accepted (converted by :func:`dense_to_sparse`), but their gradient
  reaches only the non-zero entries of ``z``; the dense decoder's gradient is non-zero
  everywhere. That is exact for TopK sparsifiers (nothing flows back through an
  unselected latent), but not for JumpReLU, whose threshold pseudo-derivative reads
  ``dL/dz`` at latents just below the threshold: decode JumpReLU codes densely.
- Duplicate indices within one (token, source) row are allowed and summed, as in the
  dense reference. Top-k never produces them, but :func:`dense_to_sparse` pads short
  rows with index 0 (value 0), which may repeat an active index 0.
- Values are cast to the decoder's dtype (``embedding_bag`` requires equal dtypes); the
  result has the decoder's dtype. Under bf16 autocast the encoder's matmuls run in bf16
  (the codes are bf16), its backward in the parameters' dtype.
- ``backend="triton"`` is an optional fused CUDA forward (see :func:`_triton_available`).
  THERE WAS NO GPU WHEN IT WAS WRITTEN: it has only been run under the Triton CPU
  interpreter (``TRITON_INTERPRET=1``), never compiled for a GPU. ``backend="auto"``
  therefore picks it only when CUDA and Triton are available *and* the environment
  variable ``CLT_FUSED_DECODE=1`` is set; otherwise ``auto`` means ``torch``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from clt_lightning.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "auto", "embedding_bag", "gather", "triton")
"""Valid ``backend`` names for :func:`sparse_decode`."""

FUSED_ENV_VAR = "CLT_FUSED_DECODE"
"""Set to ``1`` to let ``backend="auto"`` use the (GPU-untested) Triton kernel."""

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Upper bound on the gathered-rows buffer of the ``gather``/``triton`` backward (bytes)."""


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
        chunk_bytes: Cap on the gathered-rows buffer of the ``gather``/``triton``
            backends and on the ``value * grad`` rows that the ``embedding_bag``
            backward adds into the decoder gradient at once (bytes).

    Returns:
        Reconstruction ``y_hat`` [..., L, d] in ``W_dec``'s dtype.

    Raises:
        ConfigError: For an unknown backend, or ``"triton"`` where it cannot run.
        ValueError: If the shapes of codes, decoders and bias do not agree.
    """
    values, indices = _unpack_codes(codes)
    n_layers, d_model = _check_shapes(values, indices, W_dec, b_dec)
    resolved = _resolve_backend(backend, W_dec[0])
    lead_shape = values.shape[:-2]
    k = values.shape[-1]
    values = values.reshape(-1, n_layers, k).to(W_dec[0].dtype)
    indices = indices.reshape(-1, n_layers, k)
    n_tokens = values.shape[0]

    y = b_dec.expand(n_tokens, n_layers, d_model).clone()
    if k == 0:
        return y.reshape(*lead_shape, n_layers, d_model)
    for source in range(n_layers):
        contribution = _decode_source(
            values[:, source], indices[:, source], W_dec[source], resolved, chunk_bytes
        )
        y[:, source:] += contribution.view(n_tokens, n_layers - source, d_model)
    return y.reshape(*lead_shape, n_layers, d_model)


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
    fused_ok = like.is_cuda and _triton_available()
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


def _decode_source(
    values: Tensor, indices: Tensor, weight: Tensor, backend: str, chunk_bytes: int
) -> Tensor:
    """Weighted row sum for one source: [B, k] codes x W_dec[s] [F, L - s, d] -> [B, (L - s) d]."""
    if backend == "embedding_bag":
        return _EmbeddingBagDecode.apply(values, indices, weight, chunk_bytes)
    table = weight.reshape(weight.shape[0], -1)
    rows = _chunk_rows(indices.shape[1], table, chunk_bytes)
    if backend == "gather":
        return _GatherDecode.apply(values, indices, table, rows)
    return _TritonDecode.apply(values, indices, table, rows)


def _chunk_rows(k: int, table: Tensor, chunk_bytes: int) -> int:
    """Tokens per chunk so that a [tokens, k, D] gather stays under ``chunk_bytes``."""
    per_token = max(1, k * table.shape[1] * table.element_size())
    return max(1, chunk_bytes // per_token)


class _GatherDecode(torch.autograd.Function):
    """Weighted row gather ``out[b] = sum_j values[b, j] * table[indices[b, j]]``.

    Forward: ``index_select`` + ``bmm``, chunked over tokens. Backward: re-gathers the
    rows for ``d values[b, j] = <grad_out[b], table[indices[b, j]]>`` and
    ``index_add_`` s ``values[b, j] * grad_out[b]`` into the table gradient's active rows.
    Shapes: values [B, k], indices [B, k], table [F, D], out [B, D].
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, table: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(values, indices, table)
        ctx.rows = rows
        n_tokens, k = values.shape
        out = table.new_empty(n_tokens, table.shape[1])
        buffer = table.new_empty(min(rows, n_tokens) * k, table.shape[1])
        for start in range(0, n_tokens, rows):
            stop = min(start + rows, n_tokens)
            gathered = _gather_rows(table, indices[start:stop], buffer)
            out[start:stop] = torch.bmm(values[start:stop].unsqueeze(1), gathered).squeeze(1)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        values, indices, table = ctx.saved_tensors
        rows = ctx.rows
        need_values, _, need_table, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        n_tokens, k = values.shape
        grad_values = torch.empty_like(values) if need_values else None
        grad_table = torch.zeros_like(table) if need_table else None
        buffer = table.new_empty(min(rows, n_tokens) * k, table.shape[1])
        for start in range(0, n_tokens, rows):
            stop = min(start + rows, n_tokens)
            g = grad_out[start:stop]
            if grad_values is not None:
                gathered = _gather_rows(table, indices[start:stop], buffer)
                grad_values[start:stop] = torch.bmm(gathered, g.unsqueeze(2)).squeeze(2)
            if grad_table is not None:
                n = (stop - start) * k
                outer = buffer[:n].view(stop - start, k, -1)
                torch.mul(values[start:stop].unsqueeze(2), g.unsqueeze(1), out=outer)
                grad_table.index_add_(0, indices[start:stop].reshape(-1), buffer[:n])
        return grad_values, None, grad_table, None


def _gather_rows(table: Tensor, indices: Tensor, buffer: Tensor) -> Tensor:
    """Gather ``table[indices]`` ([b, k] indices) into ``buffer``; return it as [b, k, D]."""
    n_tokens, k = indices.shape
    out = buffer[: n_tokens * k]
    torch.index_select(table, 0, indices.reshape(-1), out=out)
    return out.view(n_tokens, k, table.shape[1])


# --------------------------------------------------------------------------- embedding_bag


class _EmbeddingBagDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * W[indices[b, j]]`` for one source, W [F, T, d] viewed [F, T d].

    Forward: ``F.embedding_bag`` (never materialises the gathered rows). Backward:
    ``d values[b, j] = <grad_out[b], W[indices[b, j]]>`` with ATen's embedding-bag kernel
    for per-sample weights, and the decoder gradient ``C^T @ grad_out`` with ``C`` the
    sparse [B, F] code matrix (:func:`sparse_matrix`), written in full (``beta=0``) into
    a gradient that :data:`GRAD_RECYCLER` reuses from the previous step (on the CPU a
    fresh multi-GB tensor costs page faults). Other dtypes than float32/float64:
    ``index_add_`` of ``values[b, j] * grad_out[b]`` into a zeroed recycled gradient,
    ``chunk_bytes`` at a time. Shapes: values/indices [B, k], out [B, T d].
    """

    @staticmethod
    def forward(
        ctx: Any, values: Tensor, indices: Tensor, weight: Tensor, chunk_bytes: int
    ) -> Tensor:
        values, indices = values.contiguous(), indices.contiguous()
        table = weight.reshape(weight.shape[0], -1)
        ctx.save_for_backward(values, indices, weight)
        ctx.chunk_bytes = chunk_bytes
        ctx.code_matrix = None
        if weight.device.type == "cpu" and sparse_matmul_supported(weight.dtype):
            # Latent-major product: each shared decoder row is read once (kept for backward).
            ctx.code_matrix = _code_matrix(values, indices, len(table))
            with torch.autocast("cpu", enabled=False):  # the decoder's dtype, as embedding_bag
                return torch.mm(ctx.code_matrix[0].t(), table)
        return F.embedding_bag(indices, table, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        values, indices, weight = ctx.saved_tensors
        need_values, _, need_weight, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        table = weight.reshape(weight.shape[0], -1)
        grad_values = grad_weight = None
        codes_t = keys = None
        if ctx.code_matrix is not None:
            codes_t, keys = ctx.code_matrix
        elif sparse_matmul_supported(weight.dtype) and (need_weight or need_values):
            codes_t, keys = _code_matrix(values, indices, len(table))
        ctx.code_matrix = None
        if need_values and codes_t is not None and table.device.type == "cpu":
            grad_values = _per_slot_dot_sorted(grad_out, table, indices, codes_t, keys)
            grad_values = grad_values.view_as(values)
        elif need_values:
            grad_values = _per_slot_dot(grad_out, table, indices).view_as(values)
        if need_weight and codes_t is not None:
            grad_weight = GRAD_RECYCLER.empty_like(weight)  # written in full by addmm
            out = grad_weight.view(table.shape)
            torch.addmm(out, codes_t, grad_out.to(weight.dtype), beta=0, out=out)
        elif need_weight:
            grad_weight = GRAD_RECYCLER.zeros_like(weight)
            _add_weighted_rows(
                grad_weight.view(table.shape), indices, values, grad_out, ctx.chunk_bytes
            )
        return grad_values, None, grad_weight, None


def _code_matrix(values: Tensor, indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """The [F, B] sparse CSR matrix of one source's codes and its entries' keys.

    ``C^T[indices[b, j], b] += values[b, j]`` (:func:`sparse_matrix` with
    ``return_keys``). Shapes: values/indices [B, k]; returns (``C^T`` [F, B], keys [nnz]).
    """
    n_tokens, k = indices.shape
    token = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
    return sparse_matrix(
        indices.reshape(-1), token, values.reshape(-1), (n_latents, n_tokens), return_keys=True
    )


def sparse_matmul_supported(dtype: torch.dtype) -> bool:
    """Whether the weight gradients use a sparse matrix product (float32/float64)."""
    return dtype in (torch.float32, torch.float64)


def sparse_matrix(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    shape: tuple[int, int],
    *,
    return_keys: bool = False,
) -> Any:
    """The sparse CSR matrix ``M[rows[i], cols[i]] += values[i]`` (duplicates summed).

    Shapes: rows, cols, values [n]; ``M`` is ``shape``. Used as the sparse operand of
    ``torch.addmm`` (MKL's sparse BLAS on the CPU, cuSPARSE on CUDA), whose cost is
    ~ n x the dense operand's width, and which writes every entry of its output, so the
    gradient needs no zeroing pass.

    With ``return_keys``, returns ``(M, keys)``: ``keys`` [nnz] int64 holds each stored
    entry's ``row * shape[1] + col``, ascending (the order of ``M``'s values).
    """
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, shape, check_invariants=False
    ).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = coo.to_sparse_csr()
    if not return_keys:
        return matrix
    entry_rows, entry_cols = coo.indices()
    return matrix, entry_rows * shape[1] + entry_cols


def _per_slot_dot(grad_out: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """``<grad_out[b], table[indices[b, j]]>`` for every slot, flat [B k] (no gathered copy)."""
    n_tokens, k = indices.shape
    flat = indices.reshape(-1)
    offsets = torch.arange(0, n_tokens * k, k, device=flat.device)
    offset2bag = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_out, table, flat, offsets, offset2bag, 0, -1
    )


def _per_slot_dot_sorted(
    grad_out: Tensor, table: Tensor, indices: Tensor, codes_t: Tensor, keys: Tensor
) -> Tensor:
    """``<grad_out[b], table[indices[b, j]]>`` for every slot, flat [B k], row by row.

    Same values as :func:`_per_slot_dot`, but computed at the entries of the coalesced
    [F, B] code matrix ``codes_t`` (``torch.sparse.sampled_addmm``), which are sorted by
    latent: a decoder row shared by several tokens is read from memory once and then from
    cache, instead of once per slot (measured ~2x faster at the paper shape, B=128,
    k=128, one thread). Each slot then takes the dot product of its (latent, token)
    entry, found in ``keys`` (the entries' ``latent * B + token``, ascending); a latent
    repeated within one token (padding) is one entry, and each of its slots gets its dot
    product, as in the unsorted kernel.

    Shapes: grad_out [B, D], table [F, D], indices [B, k], codes_t [F, B] sparse CSR,
    keys [nnz]; returns [B k] in table's dtype.
    """
    n_tokens, k = indices.shape
    token = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
    dots = torch.sparse.sampled_addmm(codes_t, table, grad_out.to(table.dtype).T, beta=0)
    slot_keys = indices.reshape(-1).to(torch.int64) * n_tokens + token
    return dots.values()[torch.searchsorted(keys, slot_keys)]


ADD_CHUNK_BYTES = 2 * 2**20
"""Largest ``value * grad`` block added at once: small enough to stay in cache between
being written and being added (measured: 8 MB blocks were up to 3x slower than 1-2 MB)."""


def _add_weighted_rows(
    grad_table: Tensor, indices: Tensor, values: Tensor, grad_out: Tensor, chunk_bytes: int
) -> None:
    """``grad_table[indices[b, j]] += values[b, j] * grad_out[b]``, one block at a time.

    A block is a few whole tokens, or part of one token's k slots when a token's rows
    exceed the block size; each costs one broadcast multiply and one ``index_add_``.
    """
    n_tokens, k = indices.shape
    width = grad_out.shape[1]
    slots = max(1, min(chunk_bytes, ADD_CHUNK_BYTES) // max(1, width * grad_out.element_size()))
    values = values.to(grad_out.dtype)
    if slots >= k:
        tokens = slots // k
        for start in range(0, n_tokens, tokens):
            stop = min(start + tokens, n_tokens)
            block = values[start:stop, :, None] * grad_out[start:stop, None, :]
            grad_table.index_add_(0, indices[start:stop].reshape(-1), block.view(-1, width))
        return
    for token in range(n_tokens):
        for start in range(0, k, slots):
            block = values[token, start : start + slots, None] * grad_out[token]
            grad_table.index_add_(0, indices[token, start : start + slots], block)


# --------------------------------------------------------------------------- recycling


def _storage_use_count(tensor: Tensor) -> int:
    """References to ``tensor``'s storage (tensors and views), as counted by c10."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class GradientRecycler:
    """Hands out parameter-shaped gradient tensors that reuse last step's storage (CPU).

    Why: on the CPU a fresh multi-GB tensor is page-faulted in by the kernel, measured at
    ~1 GB/s on the project's machines (2.2 s per step for the 2.9 GB ``W_dec`` gradient at
    the paper shape), while zeroing a resident one runs at memory bandwidth (~0.3 s).
    The CUDA caching allocator already reuses memory, so recycling is CPU-only.

    Safety rule: a buffer is reused only when nothing but the recycler references its
    storage (the storage's use count is back to what it was when the buffer was made),
    i.e. after ``zero_grad(set_to_none=True)`` dropped the gradient that viewed it.
    Otherwise (gradient accumulation, ``zero_grad(set_to_none=False)``, a caller keeping
    the gradient, a second decode of the same weight in one step) a fresh tensor is
    returned, exactly as without recycling. What is returned is always a new view
    (``detach()``), so autograd adopts it as ``param.grad`` without a copy.
    Disabled while ``torch.compile`` traces.
    """

    def __init__(self) -> None:
        self._buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.enabled = hasattr(torch._C, "_storage_Use_Count")

    def zeros_like(self, weight: Tensor) -> Tensor:
        """A zeroed tensor shaped, typed and laid out like ``weight``."""
        buffer = self._reusable(weight)
        return torch.zeros_like(weight) if buffer is None else buffer.zero_().detach()

    def empty_like(self, weight: Tensor) -> Tensor:
        """An uninitialised tensor like ``weight`` (for gradients written in full)."""
        buffer = self._reusable(weight)
        return torch.empty_like(weight) if buffer is None else buffer.detach()

    def reserve(self, weights: Sequence[Tensor]) -> None:
        """Allocate (and fault in) the buffers of ``weights`` now, e.g. before timing.

        Args:
            weights: Parameters whose gradients the sparse decode or the fused encoder
                will produce (``W_dec[s]``, ``W_enc``).
        """
        for weight in weights:
            buffer = self._reusable(weight)
            if buffer is not None:
                buffer.zero_()

    def clear(self) -> None:
        """Drop every buffer (their memory is freed once no gradient views them)."""
        self._buffers = WeakIdKeyDictionary()

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(buffer.nbytes for buffer, _ in self._buffers.values())

    def _reusable(self, weight: Tensor) -> Tensor | None:
        if (
            not self.enabled
            or weight.device.type != "cpu"
            or not weight.is_contiguous()
            or torch.compiler.is_compiling()
        ):
            return None
        entry = self._buffers.get(weight)
        if entry is None:
            buffer = torch.empty_like(weight)
            self._buffers[weight] = (buffer, _storage_use_count(buffer))
            return buffer
        buffer, idle_count = entry
        same = buffer.shape == weight.shape and buffer.dtype == weight.dtype
        if not same:
            del self._buffers[weight]
            return self._reusable(weight)
        return buffer if _storage_use_count(buffer) == idle_count else None


GRAD_RECYCLER = GradientRecycler()
"""The recycler the sparse decode and the fused TopK encoder take gradients from."""


# --------------------------------------------------------------------------- TopK encoder


class TopKEncoding(NamedTuple):
    """What :func:`topk_encode` returns."""

    values: Tensor
    """Kept activations [B, L, k] (ReLU(pre), or pre with its sign for ``signed``)."""
    indices: Tensor
    """Their latent indices [B, L, k] (int64)."""
    aux_values: Tensor
    """AuxK activations of dead latents [B, L, k_aux]; k_aux = 0 without AuxK. Layers
    with fewer dead latents than k_aux are padded with index 0 and value 0."""
    aux_indices: Tensor
    """Their indices [B, L, k_aux] (int64)."""
    fired: Tensor
    """[L, F] bool: the latent is non-zero for at least one token of the batch."""


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    signed: bool = False,
    aux_k: int = 0,
    aux_candidates: Tensor | None = None,
) -> TopKEncoding:
    """Fused TopK encoder: ``pre_l = x_l W_enc[l] + b_enc[l]``, then top k per (token, layer).

    Equals the unfused ``pre = einsum(x, W_enc) + b_enc; z = topk(pre)`` in value and in
    every gradient (to ``x``, ``W_enc``, ``b_enc``; TopK passes gradient to the kept
    pre-activations only), but never keeps a [B, L, F] tensor: ``pre`` lives one layer
    at a time in the forward, and the backward multiplies with the [B, L, k] gradient of
    the kept codes as a sparse matrix (no [B, F] gradient, no dense GEMM). See the module
    docstring.

    Args:
        x: Scaled inputs [B, L, d].
        W_enc: Encoders [L, d, F].
        b_enc: Encoder biases [L, F].
        k: Latents kept per (token, layer).
        signed: Rank ``|pre|`` and keep ``pre`` (Abs-TopK) instead of ranking and keeping
            ``ReLU(pre)`` (ReLU-TopK).
        aux_k: AuxK width: the top ``aux_k`` dead latents per (token, layer), ranked the
            same way, are returned as well (clipped to the number of dead latents).
        aux_candidates: [L, F] bool, latents that are dead after this batch unless they
            fire in it (``tokens_since_fired + B >= dead_tokens``); a candidate is dead
            when it does not fire. ``None`` (or ``aux_k = 0``): no AuxK codes.

    Returns:
        TopKEncoding(values, indices, aux_values, aux_indices, fired).
    """
    n_tokens, n_layers, d_model = x.shape
    if tuple(W_enc.shape[:2]) != (n_layers, d_model) or W_enc.dim() != 3:
        raise ValueError(
            f"topk_encode: W_enc {tuple(W_enc.shape)} must be [L={n_layers}, d={d_model}, F]"
        )
    if tuple(b_enc.shape) != (n_layers, W_enc.shape[2]):
        raise ValueError(f"topk_encode: b_enc {tuple(b_enc.shape)} must be [L, F]")
    if not 1 <= k <= W_enc.shape[2]:
        raise ValueError(f"topk_encode: k={k} must be in [1, F={W_enc.shape[2]}]")
    if aux_k <= 0:
        aux_candidates = None
    return TopKEncoding(*_TopKEncode.apply(x, W_enc, b_enc, k, signed, aux_k, aux_candidates))


def _select_layer(
    pre: Tensor, k: int, signed: bool, aux_k: int, candidates: Tensor | None, fired: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top k (and AuxK) of one layer's pre [B, F]; marks ``fired`` [F] in place."""
    score = pre.abs() if signed else torch.relu(pre)
    kept = pre if signed else score
    indices = score.topk(k, dim=-1, sorted=False).indices
    values = kept.gather(-1, indices)
    fired.index_fill_(0, indices[values != 0], True)
    if candidates is None:
        return values, indices, None, None
    dead = candidates & ~fired
    n_dead = int(dead.sum())
    if n_dead == 0:
        return values, indices, None, None
    # Scores are >= 0, so -1 ranks every live latent below every dead one.
    aux_indices = score.masked_fill(~dead, -1.0).topk(min(aux_k, n_dead), dim=-1, sorted=False)
    aux_indices = aux_indices.indices
    return values, indices, kept.gather(-1, aux_indices), aux_indices


def _stack_padded(parts: list[Tensor | None], like: Tensor, dtype: torch.dtype) -> Tensor:
    """Stack per-layer [B, w_l] tensors into [B, L, max w] (missing/short: zeros)."""
    width = max((p.shape[1] for p in parts if p is not None), default=0)
    out = torch.zeros(like.shape[0], len(parts), width, dtype=dtype, device=like.device)
    for layer, part in enumerate(parts):
        if part is not None:
            out[:, layer, : part.shape[1]] = part
    return out


class _TopKEncode(torch.autograd.Function):
    """Autograd for :func:`topk_encode` (forward layer by layer, sparse gradient of pre)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        signed: bool,
        aux_k: int,
        candidates: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n_layers, n_latents = b_enc.shape
        fired = torch.zeros(n_layers, n_latents, dtype=torch.bool, device=x.device)
        layers = []
        for layer in range(n_layers):
            pre = torch.addmm(b_enc[layer], x[:, layer], W_enc[layer])
            cand = None if candidates is None else candidates[layer]
            layers.append(_select_layer(pre, k, signed, aux_k, cand, fired[layer]))
        values = torch.stack([part[0] for part in layers], dim=1)
        indices = torch.stack([part[1] for part in layers], dim=1)
        aux_values = _stack_padded([part[2] for part in layers], x, values.dtype)
        aux_indices = _stack_padded([part[3] for part in layers], x, torch.int64)
        widths = [0 if part[3] is None else part[3].shape[1] for part in layers]
        # Padding slots (index 0, value 0) must pass no gradient, also for signed codes.
        aux_valid = torch.arange(aux_values.shape[-1], device=x.device) < torch.tensor(
            widths, device=x.device
        ).unsqueeze(-1)
        ctx.save_for_backward(x, W_enc, values, indices, aux_values, aux_indices, aux_valid)
        ctx.signed = signed
        ctx.mark_non_differentiable(indices, aux_indices, fired)
        return values, indices, aux_values, aux_indices, fired

    @staticmethod
    def backward(
        ctx: Any, grad_values: Tensor, _gi: Any, grad_aux: Tensor, _gai: Any, _gf: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None]:
        x, W_enc, values, indices, aux_values, aux_indices, aux_valid = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = W_enc.dtype
        with torch.autocast(x.device.type, enabled=False):
            slots = torch.cat([indices, aux_indices], dim=-1)
            grads = torch.cat(
                [
                    _kept_grad(grad_values, values, ctx.signed),
                    _kept_grad(grad_aux, aux_values, ctx.signed) * aux_valid,
                ],
                dim=-1,
            ).to(dtype)
            n_layers = x.shape[1]
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = GRAD_RECYCLER.empty_like(W_enc) if need_w else None
            grad_b = W_enc.new_zeros(n_layers, W_enc.shape[2]) if need_b else None
            for layer in range(n_layers):
                _encoder_layer_grads(
                    layer, x, W_enc, slots[:, layer], grads[:, layer], grad_x, grad_w, grad_b
                )
        return grad_x, grad_w, grad_b, None, None, None, None


def _encoder_layer_grads(
    layer: int,
    x: Tensor,
    W_enc: Tensor,
    slots: Tensor,
    grads: Tensor,
    grad_x: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """One layer's encoder gradients from the kept latents only.

    ``d pre[b, slots[b, j]] = grads[b, j]`` and zero elsewhere (repeated slots add up:
    AuxK padding at index 0 with zero gradient, a latent both kept and AuxK), so:

    - ``d W_enc[l] = x_l^T @ G`` with ``G`` [B, F] the sparse matrix of ``grads`` at
      ``slots`` (:func:`sparse_matrix`): cost ~ B * k * d instead of the ~ B * d * F of a
      GEMM with a dense [B, F] ``d pre``; ``addmm`` writes the whole [d, F] gradient.
      (Other dtypes than float32/float64: the dense GEMM.)
    - ``d b_enc[l]``: an index-add of ``grads`` (cost ~ B * k).
    - ``d x[b, l] = sum_j grads[b, j] * W_enc[l][:, slots[b, j]]``: a column gather.

    Shapes: x [B, L, d], W_enc [L, d, F], slots and grads [B, k'] (grads in W_enc's
    dtype), grad_x like x, grad_w like W_enc, grad_b [L, F] zeroed.
    """
    n_tokens = x.shape[0]
    x_t = x[:, layer].T.to(W_enc.dtype)
    if grad_w is not None and sparse_matmul_supported(W_enc.dtype):
        token = torch.arange(n_tokens, device=x.device).repeat_interleave(slots.shape[1])
        codes = sparse_matrix(
            token, slots.reshape(-1), grads.reshape(-1), (n_tokens, W_enc.shape[2])
        )
        torch.addmm(grad_w[layer], x_t, codes, beta=0, out=grad_w[layer])
    elif grad_w is not None:
        grad_pre = W_enc.new_zeros(n_tokens, W_enc.shape[2])
        grad_pre.scatter_add_(1, slots, grads)
        torch.mm(x_t, grad_pre, out=grad_w[layer])
    if grad_b is not None:
        grad_b[layer].index_add_(0, slots.reshape(-1), grads.reshape(-1))
    if grad_x is not None:
        step = max(1, ADD_CHUNK_BYTES // max(1, slots.shape[1] * W_enc.shape[1] * 4))
        for start in range(0, n_tokens, step):
            idx, g = slots[start : start + step], grads[start : start + step]
            columns = W_enc[layer].index_select(1, idx.reshape(-1)).view(-1, *idx.shape)
            grad_x[start : start + step, layer] = torch.einsum("dbk,bk->bd", columns, g).to(x.dtype)


def _kept_grad(grad: Tensor, values: Tensor, signed: bool) -> Tensor:
    """Gradient reaching pre through kept values: all of it (signed), or where ReLU > 0."""
    return grad if signed else grad * (values > 0).to(grad.dtype)


# --------------------------------------------------------------------------- Triton
# UNTESTED ON A GPU: written on a machine without one and checked only with the Triton
# CPU interpreter (TRITON_INTERPRET=1, see tests/unit/test_sparse_decode.py).


@functools.cache
def _triton_available() -> bool:
    """True if the ``triton`` package can be imported (says nothing about a GPU)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_kernel() -> Any:
    """Build the fused gather-accumulate kernel (imports triton lazily).

    One program per (token, block of ``BLOCK_D`` columns) loops over the k slots and
    accumulates ``value * table[index, cols]`` in fp32 (also for fp64 tables): the
    gathered rows never leave registers, so there is no [B, k, D] buffer at all.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def gather_accumulate(
        values_ptr, indices_ptr, table_ptr, out_ptr, k, width, BLOCK_D: tl.constexpr
    ):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < width
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for slot in range(0, k):
            row = tl.load(indices_ptr + token * k + slot).to(tl.int64)
            weight = tl.load(values_ptr + token * k + slot).to(tl.float32)
            entries = tl.load(table_ptr + row * width + cols, mask=mask, other=0.0)
            acc += weight * entries.to(tl.float32)
        tl.store(out_ptr + token * width + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return gather_accumulate


def _triton_gather_accumulate(values: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """Fused forward: values [B, k], indices [B, k], table [F, D] -> out [B, D]."""
    values, indices, table = values.contiguous(), indices.contiguous(), table.contiguous()
    n_tokens, k = values.shape
    width = table.shape[1]
    out = table.new_empty(n_tokens, width)
    block = 256
    grid = (n_tokens, (width + block - 1) // block)
    _triton_kernel()[grid](values, indices, table, out, k, width, BLOCK_D=block)
    return out


class _TritonDecode(_GatherDecode):
    """Fused Triton forward; the backward is :class:`_GatherDecode`'s (pure PyTorch)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, table: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(values, indices, table)
        ctx.rows = rows
        return _triton_gather_accumulate(values, indices, table)
