"""The ``gather`` sparse decode: the baseline `bench_decode.py` compares the package with.

A custom ``autograd.Function`` (``index_select`` on the flattened table + ``bmm``; the
backward re-gathers the rows and ``index_add_`` s into them), chunked over tokens so the
gathered block stays under ``chunk_bytes``: an unchunked [B, k, (L - s) * d] gather would
be ~19 GB at B=4096 and the paper shape. It was the package's second backend; it lives
here because only the benchmark uses it (the package decodes with embedding-bag,
`clt_lightning/models/embedding_bag_decode.py`). tests/unit/test_gather_decode.py checks
it against the dense decoder.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from clt_lightning.models.sparse_decode import DEFAULT_CHUNK_BYTES, accumulate_sources


def gather_decode(
    codes: tuple[Tensor, Tensor],
    W_dec: Sequence[Tensor],
    b_dec: Tensor,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """``y[..., l, :] = b_dec[l] + sum_{s<=l} z_s @ W_dec[s][:, l - s]`` by row gathers.

    Args:
        codes: ``(values, indices)``, both [..., L, k] (indices int64 or int32).
        W_dec: Per-source decoders, ``W_dec[s]`` [F, L - s, d].
        b_dec: Decoder bias [L, d].
        chunk_bytes: Cap on the gathered-rows buffer (bytes).

    Returns:
        y_hat [..., L, d] in ``W_dec``'s dtype.
    """
    values, indices = codes
    n_layers, d_model = b_dec.shape
    lead_shape, k = values.shape[:-2], values.shape[-1]
    values = values.reshape(-1, n_layers, k).to(W_dec[0].dtype)
    indices = indices.reshape(-1, n_layers, k)
    decode_source = functools.partial(_decode_source, chunk_bytes=chunk_bytes)
    y = accumulate_sources(values, indices, W_dec, b_dec, decode_source)
    return y.reshape(*lead_shape, n_layers, d_model)


def _decode_source(values: Tensor, indices: Tensor, weight: Tensor, chunk_bytes: int) -> Tensor:
    """One source: [B, k] codes x W_dec[s] [F, L - s, d] -> [B, (L - s) d]."""
    table = weight.reshape(weight.shape[0], -1)
    return GatherDecode.apply(
        values, indices, table, _chunk_rows(indices.shape[1], table, chunk_bytes)
    )


def _chunk_rows(k: int, table: Tensor, chunk_bytes: int) -> int:
    """Tokens per chunk so that a [tokens, k, D] gather stays under ``chunk_bytes``."""
    per_token = max(1, k * table.shape[1] * table.element_size())
    return max(1, chunk_bytes // per_token)


class GatherDecode(torch.autograd.Function):
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
