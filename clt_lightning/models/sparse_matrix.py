"""Sparse CSR matrices for the weight gradients of the sparse training path.

Both sparse backwards (the decoder's, `models/embedding_bag_decode.py`, and the fused TopK
encoder's, `models/topk_encode.py`) form a weight gradient as ``addmm`` of a sparse [F, B]
or [B, F] matrix built from the k active (token, latent) pairs per row with a dense
operand: MKL's sparse BLAS on the CPU, cuSPARSE on CUDA; cost ~ B * k * width instead of
the ~ B * F * width of a dense GEMM, and ``addmm`` writes every entry of its output, so a
gradient needs no zeroing pass.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

ADD_CHUNK_BYTES = 2 * 2**20
"""Largest ``value * grad`` block added at once: small enough to stay in cache between
being written and being added (measured: 8 MB blocks were up to 3x slower than 1-2 MB)."""


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
