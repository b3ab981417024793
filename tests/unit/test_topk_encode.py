"""The fused TopK encoder equals the unfused encoder + top k, in value and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from clt_lightning.models import topk_encode as te
from tests.unit.test_sparse_decode import TOLERANCES, RecordShapes


def reference_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, signed: bool
) -> tuple[Tensor, Tensor]:
    """Unfused: pre = einsum + b over all layers, z = dense top k (ReLU or signed |.|)."""
    pre = torch.einsum("bld,ldf->blf", x, W_enc) + b_enc
    score, kept = (pre.abs(), pre) if signed else (torch.relu(pre), torch.relu(pre))
    indices = score.topk(k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(-1, indices, kept.gather(-1, indices))
    return z, pre


def awkward_encoder_inputs(
    n_tokens: int = 9, n_layers: int = 3, d_model: int = 8, n_latents: int = 40
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 leaves: token 1 repeats token 0 (same latents), token 2 has no positive
    pre-activation at layer 0 (ReLU-TopK keeps zeros there)."""
    x = torch.randn(n_tokens, n_layers, d_model, dtype=torch.float64)
    x[1] = x[0]
    x[2, 0] = 0.0
    W_enc = torch.randn(n_layers, d_model, n_latents, dtype=torch.float64)
    b_enc = torch.randn(n_layers, n_latents, dtype=torch.float64).abs().neg()  # all < 0
    b_enc[1:] = torch.randn(n_layers - 1, n_latents, dtype=torch.float64)
    return x.requires_grad_(), W_enc.requires_grad_(), b_enc.requires_grad_()


@pytest.mark.parametrize("signed", [False, True])
def test_topk_encode_matches_unfused_values_and_gradients(signed: bool) -> None:
    x, W_enc, b_enc = awkward_encoder_inputs()
    k = 5
    z_ref, _ = reference_topk(x, W_enc, b_enc, k, signed)
    out = te.topk_encode(x, W_enc, b_enc, k, signed=signed)
    z = torch.zeros_like(z_ref).scatter_add(-1, out.indices, out.values)
    torch.testing.assert_close(z, z_ref, **TOLERANCES[torch.float64])  # addmm vs einsum
    assert bool((z_ref[2, 0] == 0).all()) != signed  # the all-zero row is exercised (ReLU)
    torch.testing.assert_close(out.fired, (z_ref != 0).any(dim=0))
    assert out.aux_values.shape == (9, 3, 0)
    # The gradient of <z, G> through each path, to x, W_enc and b_enc.
    G = torch.randn_like(z_ref)
    want = torch.autograd.grad((z_ref * G).sum(), [x, W_enc, b_enc])
    got = torch.autograd.grad((z * G).sum(), [x, W_enc, b_enc])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("signed", [False, True])
def test_topk_encode_aux_codes_are_the_dead_latents(signed: bool) -> None:
    x, W_enc, b_enc = awkward_encoder_inputs()
    k, aux_k, n_latents = 4, 6, W_enc.shape[-1]
    candidates = torch.zeros(3, n_latents, dtype=torch.bool)
    candidates[0, :30] = True  # layer 0: many candidates, layer 1: 3, layer 2: none
    candidates[1, :3] = True
    out = te.topk_encode(x, W_enc, b_enc, k, signed=signed, aux_k=aux_k, aux_candidates=candidates)
    z_ref, pre = reference_topk(x, W_enc, b_enc, k, signed)
    dead = candidates & ~(z_ref != 0).any(dim=0)
    score, kept = (pre.abs(), pre) if signed else (torch.relu(pre), torch.relu(pre))
    assert out.aux_values.shape[-1] == aux_k
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    valid = torch.zeros_like(out.aux_values, dtype=torch.bool)
    for layer in range(3):
        width = min(aux_k, int(dead[layer].sum()))
        valid[:, layer, :width] = True
        idx = out.aux_indices[:, layer, :width]
        want = score[:, layer].masked_fill(~dead[layer], -1).topk(width, dim=-1).indices
        assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
        torch.testing.assert_close(out.aux_values[:, layer, :width], kept[:, layer].gather(-1, idx))
        assert (out.aux_values[:, layer, width:] == 0).all()  # padding: index 0, value 0
        chosen[:, layer].scatter_(-1, want, True)
    assert 0 < int(chosen[:, 1].sum(-1).max()) <= 3 and not chosen[:, 2].any()
    # Gradient through the AuxK values reaches pre at the chosen latents only (not padding).
    weights = torch.randn_like(out.aux_values)
    (got,) = torch.autograd.grad((out.aux_values * weights).sum(), [W_enc])
    dense_weights = torch.zeros_like(pre).scatter_add(-1, out.aux_indices, weights * valid)
    (want,) = torch.autograd.grad((kept * chosen * dense_weights).sum(), [W_enc])
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("signed", [False, True])
def test_topk_encode_weight_gradient_is_sparse_and_exact(signed: bool) -> None:
    """The W_enc/b_enc gradients come from the kept latents only: no dense [B, F]
    gradient of pre is built (the old backward built one per layer and multiplied it
    with x in a GEMM). Values equal the unfused dense path, AuxK slots (padding at index
    0 repeats latent 0) included."""
    x, W_enc, b_enc = awkward_encoder_inputs(n_tokens=12, n_latents=48)
    x = x.detach()  # training inputs carry no gradient
    k, aux_k = 5, 7
    candidates = torch.zeros(3, 48, dtype=torch.bool)
    candidates[0, :40] = True
    candidates[1, :2] = True
    out = te.topk_encode(x, W_enc, b_enc, k, signed=signed, aux_k=aux_k, aux_candidates=candidates)
    weights = torch.randn_like(out.values)
    aux_weights = torch.randn_like(out.aux_values)
    loss = (out.values * weights).sum() + (out.aux_values * aux_weights).sum()
    with RecordShapes() as recorder:
        got = torch.autograd.grad(loss, [W_enc, b_enc])
    assert recorder.shapes and (12, 48) not in recorder.shapes
    # Dense reference: the same (token, layer, latent) weights through the unfused pre.
    z_ref, pre = reference_topk(x, W_enc, b_enc, k, signed)
    kept = pre if signed else torch.relu(pre)
    n_dead = (candidates & ~(z_ref != 0).any(dim=0)).sum(-1).clamp(max=aux_k)
    valid = torch.arange(aux_k) < n_dead[:, None]  # [L, aux_k]; the rest is padding
    assert valid[0].all() and not valid[2].any()
    dense = torch.zeros_like(pre).scatter_add(-1, out.indices, weights)
    dense = dense.scatter_add(-1, out.aux_indices, aux_weights * valid)
    want = torch.autograd.grad((kept * dense).sum(), [W_enc, b_enc])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_encoder_layer_grads_match_a_naive_loop_with_repeated_slots(dtype: torch.dtype) -> None:
    """Repeated latents within a token's slots and across tokens add up (naive loop),
    with the sparse product (float64) and with the dense fallback (bfloat16)."""
    gen = torch.Generator().manual_seed(3)
    n_tokens, n_layers, d_model, n_latents = 6, 2, 5, 7
    x = torch.randn(n_tokens, n_layers, d_model, generator=gen, dtype=torch.float64)
    W_enc = torch.randn(n_layers, d_model, n_latents, generator=gen, dtype=torch.float64)
    slots = torch.randint(0, 3, (n_tokens, 4), generator=gen)  # 4 slots over 3 latents
    grads = torch.randn(n_tokens, 4, generator=gen, dtype=torch.float64)
    x, W_enc, grads = (t.to(dtype) for t in (x, W_enc, grads))
    grad_x, grad_w = torch.zeros_like(x), torch.full_like(W_enc, float("nan"))
    grad_b = torch.zeros(n_layers, n_latents, dtype=dtype)
    te._encoder_layer_grads(1, x, W_enc, slots, grads, grad_x, grad_w, grad_b)
    x, W_enc = x.double(), W_enc.double()  # the reference sums the same inputs in float64
    want_w = torch.zeros(d_model, n_latents, dtype=torch.float64)
    want_b = torch.zeros(n_latents, dtype=torch.float64)
    want_x = torch.zeros(n_tokens, d_model, dtype=torch.float64)
    for b in range(n_tokens):
        for j in range(4):
            f, g = int(slots[b, j]), float(grads[b, j])
            want_w[:, f] += g * x[b, 1]
            want_b[f] += g
            want_x[b] += g * W_enc[1, :, f]
    tol = {} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(grad_w[1].double(), want_w, **tol)
    torch.testing.assert_close(grad_b[1].double(), want_b, **tol)
    torch.testing.assert_close(grad_x[:, 1].double(), want_x, **tol)
    assert torch.isnan(grad_w[0]).all() and not grad_b[0].any()  # other layers untouched


def test_topk_encode_bad_shapes() -> None:
    x, W_enc, b_enc = awkward_encoder_inputs()
    with pytest.raises(ValueError, match="W_enc"):
        te.topk_encode(x, W_enc[:2], b_enc, 4)
    with pytest.raises(ValueError, match="k=41"):
        te.topk_encode(x, W_enc, b_enc, 41)
