"""Optional fused CUDA forward of the sparse decode (``sparse_decode(backend="triton")``).

One Triton program per (token, block of ``BLOCK_D`` columns) loops over the k slots and
accumulates ``value * table[index, cols]`` in fp32 (also for fp64 tables): the gathered
rows never leave registers, so there is no [B, k, D] buffer at all. The backward is the
default backend's (`embedding_bag_decode.EmbeddingBagDecode`, pure PyTorch).

Verification: written on a machine without a GPU. The kernel's maths is tested in the
default suite under Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors, values
and gradients against ``F.embedding_bag``: tests/unit/test_sparse_decode.py); the
compiled kernel only by the ``gpu``-marked test on a CUDA machine. For users the backend
is CUDA-only, and ``backend="auto"`` picks it only when ``CLT_FUSED_DECODE=1`` is set.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from torch import Tensor

from clt_lightning.models.embedding_bag_decode import EmbeddingBagDecode

BLOCK_D = 256
"""Columns of the table each Triton program accumulates."""


@functools.cache
def triton_available() -> bool:
    """True if the ``triton`` package can be imported (says nothing about a GPU)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_kernel() -> Any:
    """Build the gather-accumulate kernel (imports triton lazily: an optional package)."""
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


def gather_accumulate(values: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """``out[b] = sum_j values[b, j] * table[indices[b, j]]`` with the Triton kernel.

    Args:
        values: [B, k] float.
        indices: [B, k] int64 or int32, each in [0, F).
        table: [F, D], on a CUDA device (or CPU tensors under ``TRITON_INTERPRET=1``).

    Returns:
        out [B, D] in ``table``'s dtype (accumulated in fp32).
    """
    values, indices, table = values.contiguous(), indices.contiguous(), table.contiguous()
    n_tokens, k = values.shape
    width = table.shape[1]
    out = table.new_empty(n_tokens, width)
    grid = (n_tokens, (width + BLOCK_D - 1) // BLOCK_D)
    _triton_kernel()[grid](values, indices, table, out, k, width, BLOCK_D=BLOCK_D)
    return out


class TritonDecode(EmbeddingBagDecode):
    """One source's decode with the Triton forward; the backward is `EmbeddingBagDecode`'s.

    Shapes: values/indices [B, k], weight W_dec[s] [F, T, d], out [B, T d].
    """

    @staticmethod
    def forward(
        ctx: Any, values: Tensor, indices: Tensor, weight: Tensor, chunk_bytes: int
    ) -> Tensor:
        values, indices = values.contiguous(), indices.contiguous()
        ctx.save_for_backward(values, indices, weight)
        ctx.chunk_bytes = chunk_bytes
        ctx.code_matrix = None  # the backward builds it when it needs it
        return gather_accumulate(values, indices, weight.reshape(weight.shape[0], -1))
