"""Sparse decoding for the cross-layer transcoder: touch only the k active decoder rows.

The dense decoder computes ``y_hat[:, l] = b_dec[l] + sum_{s<=l} z_s @ W_dec[s][:, l - s]``
with dense codes ``z_s`` [B, F], which costs ``2 * F * d * L(L+1)/2`` FLOP per token
(~1.5 GFLOP forward, ~4.4 GFLOP forward+backward at L=12, d=768, F=12,288). With TopK
codes only k of the F latents are non-zero, so the same sum is a weighted sum of
``k`` decoder rows per (token, source): ``k / F`` of the work (1/96 at k=128).

Design decisions:

- One call per *source* layer: ``W_dec[s]`` [F, L - s, d] is viewed as a table
  ``[F, (L - s) * d]``, so a single weighted row gather yields the contribution of source
  ``s`` to every target ``l >= s`` at once; it is added into ``y_hat[:, s:]``.
- Two pure-PyTorch backends compute that gather:

  * ``"embedding_bag"``: ``F.embedding_bag(indices, table, per_sample_weights=values,
    mode="sum")``. It never materialises the gathered rows. Its backward gives the
    signed ``values`` gradient as per-slot dot products ``<grad_out, row>`` and the table
    gradient by an index-add of ``value * grad_out`` into the active rows only.
  * ``"gather"``: a custom ``autograd.Function`` (``index_select`` on the flattened table
    + ``bmm``; backward re-gathers the rows and ``index_add_`` s into them). It chunks
    over tokens so the gathered block stays under ``chunk_bytes``: an unchunked
    [B, k, (L - s) * d] gather would be ~19 GB at B=4096 and the paper shape.

  ``"torch"`` (the default) is ``"embedding_bag"``. Measured with
  ``benchmarks/bench_decode.py`` on the project's 2-core CPU (shared, load ~6), paper
  shape, B=64 tokens, fp32, 1 thread, one training step (forward + backward) of the
  decode: dense 10.5 s, embedding_bag 3.4 s (3.1x), gather 7.3 s (1.4x); with 2 threads
  23.9 / 8.6 / 14.8 s. Not measured on CUDA (no GPU here); the same default is used
  there. ``gather`` is kept as the second implementation the tests check and as the
  backward of the fused kernel.
- Cost model: the sparse decode is memory-bound, not FLOP-bound. Each active latent
  reads its whole ``(L - s) * d`` decoder row, ~30 MB per token at the paper shape in fp32
  (again for the backward), against 1.5 GFLOP per token forward for the dense decoder.
  The speed-up is therefore set by the machine's FLOP/byte ratio and by how often rows
  repeat within a batch, not by F / k = 96. At B=64 on the CPU, allocating the dense
  2.9 GB ``W_dec`` gradient is most of the sparse step; that cost does not depend on B.
- Neither backend ever builds a dense [B, L, F] code tensor or its gradient: the codes'
  gradient is [B, L, k]. The ``W_dec`` gradient is dense (it is the parameter's gradient,
  and AdamW needs dense gradients), but only the active rows receive non-zero values.
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
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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
            backends (bytes); unused by ``embedding_bag``.

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
        table = W_dec[source].reshape(W_dec[source].shape[0], -1)
        contribution = _decode_source(
            values[:, source], indices[:, source], table, resolved, chunk_bytes
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
    values: Tensor, indices: Tensor, table: Tensor, backend: str, chunk_bytes: int
) -> Tensor:
    """Weighted row sum for one source: [B, k] codes x [F, D] table -> [B, D]."""
    if backend == "embedding_bag":
        return F.embedding_bag(indices, table, per_sample_weights=values, mode="sum")
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
