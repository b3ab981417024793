"""The default sparse decode backend: one source's weighted row sum through embedding-bag.

``out[b] = sum_j values[b, j] * W[indices[b, j]]`` with ``W = W_dec[s]`` [F, L - s, d]
viewed as a table [F, (L - s) d], so one call yields source ``s``'s contribution to every
target ``l >= s`` (`models/sparse_decode.py` adds it into ``y_hat[:, s:]``).

- Forward: ``F.embedding_bag(indices, table, per_sample_weights=values, mode="sum")``,
  which never materialises the gathered rows (on the CPU in float32/float64: ``C @ table``
  with ``C`` the sparse [B, F] code matrix stored latent-major, so a decoder row shared by
  several tokens is read from memory once).
- Backward: the signed ``values`` gradient as per-slot dot products ``<grad_out, row>``
  (CPU float32/float64: ``torch.sparse.sampled_addmm`` at the latent-sorted entries of
  ``C^T``, again one read per shared row, ~2x faster than ATen's per-slot embedding-bag
  kernel used elsewhere), and the table gradient as ``C^T @ grad_out`` with the same
  matrix (`sparse_matrix.sparse_matrix`) written with ``beta=0`` into a recycled gradient
  (`gradient_recycler.GRAD_RECYCLER`), so it needs no zeroing pass (other dtypes than
  float32/float64: ``index_add_`` of ``value * grad_out`` into a zeroed gradient, in
  cache-sized blocks, `sparse_matrix.ADD_CHUNK_BYTES`).
- The same backward serves the Triton forward (`models/triton_decode.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clt_lightning.models.gradient_recycler import GRAD_RECYCLER
from clt_lightning.models.sparse_matrix import (
    ADD_CHUNK_BYTES,
    sparse_matmul_supported,
    sparse_matrix,
)


class EmbeddingBagDecode(torch.autograd.Function):
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
            grad_values = per_slot_dot(grad_out, table, indices).view_as(values)
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


PER_SAMPLE_WEIGHTS_BACKWARD = getattr(
    torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None
)
"""ATen's per-slot dot-product kernel (the backward of `F.embedding_bag` with respect to
``per_sample_weights``). A private ATen op: where a torch release drops it, this is None
and `per_slot_dot` takes the same values through `F.embedding_bag`'s public autograd."""


def per_slot_dot(
    grad_out: Tensor, table: Tensor, indices: Tensor, *, kernel: bool = True
) -> Tensor:
    """``<grad_out[b], table[indices[b, j]]>`` for every slot, flat [B k] (no gathered copy).

    Args:
        grad_out: [B, D] gradient of one source's decoded output.
        table: [F, D] decoder rows of that source.
        indices: [B, k] int64 latent indices.
        kernel: Call ATen's kernel directly when this torch has it (one pass); False (or a
            torch without it) differentiates a unit-weight `F.embedding_bag` instead (public
            API, the same values, one extra forward pass).
    """
    n_tokens, k = indices.shape
    flat = indices.reshape(-1)
    offsets = torch.arange(0, n_tokens * k, k, device=flat.device)
    if kernel and PER_SAMPLE_WEIGHTS_BACKWARD is not None:
        offset2bag = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)
        return PER_SAMPLE_WEIGHTS_BACKWARD(grad_out, table, flat, offsets, offset2bag, 0, -1)
    with torch.enable_grad():  # inside an autograd backward, grad mode is off
        weights = torch.ones(flat.shape, dtype=table.dtype, device=table.device,
                             requires_grad=True)  # fmt: skip
        out = F.embedding_bag(flat, table.detach(), offsets, mode="sum",
                              per_sample_weights=weights)  # fmt: skip
        return torch.autograd.grad(out, weights, grad_out)[0]


def _per_slot_dot_sorted(
    grad_out: Tensor, table: Tensor, indices: Tensor, codes_t: Tensor, keys: Tensor
) -> Tensor:
    """``<grad_out[b], table[indices[b, j]]>`` for every slot, flat [B k], row by row.

    Same values as :func:`per_slot_dot`, but computed at the entries of the coalesced
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
