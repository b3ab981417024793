"""The fused TopK encoder of the training path: encoder and top-k selection in one pass.

``pre_l = x_l W_enc[l] + b_enc[l]`` is computed one layer at a time ([B, F] at most); the
top k (and the AuxK candidates, see below) are kept, and only x and the [B, L, k] codes
are saved. The backward touches the kept latents only (TopK passes no gradient to
unselected latents, so this is the exact gradient): the ``W_enc`` gradient is ``x_l^T @
G`` with ``G`` the sparse [B, F] matrix of the kept values' gradients
(`sparse_matrix.sparse_matrix`, cost ~ B * k * d per layer instead of the ~ B * d * F of a
GEMM with a dense [B, F] gradient of ``pre``), the ``b_enc`` gradient an index-add, the
``x`` gradient a column gather. The unfused path keeps ``pre``, ``ReLU(pre)`` and ``z``
([B, L, F] each) for the backward and builds two more in it.

AuxK needs the top ``aux_k`` *dead* latents of ``pre``, and "dead" depends on this batch:
a latent is dead after the batch if it was a candidate (``tokens_since_fired + B >=
dead_tokens``) and did not fire in it. The encoder knows which latents fired in a layer as
soon as it has selected that layer's top k, so it picks the AuxK codes in the same pass;
same codes as `aux_codes` of the TopK sparsifiers after the statistics update, with shorter layers
padded by (index 0, value 0) slots that pass no gradient.

Used by the `encode` of `models/topk.py` (ReLU-/Abs-TopK in training with sparse decoding).
Under bf16 autocast the encoder's matmuls run in bf16 (the codes are bf16), its backward
in the parameters' dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from clt_lightning.models.gradient_recycler import GRAD_RECYCLER
from clt_lightning.models.sparse_matrix import (
    ADD_CHUNK_BYTES,
    sparse_matmul_supported,
    sparse_matrix,
)


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
