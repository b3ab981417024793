"""Sparsifiers against independent references: naive Python/numpy loops and hand formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clt_lightning.errors import ConfigError
from clt_lightning.models import sparsifiers as sp
from clt_lightning.models.encoding import SparseCodes, codes_to_dense, dense_to_codes
from clt_lightning.models.jumprelu import jumprelu, step
from clt_lightning.models.sparsifiers import (
    LossContext,
    SparsifierConfig,
    build_sparsifier,
    list_sparsifiers,
)

B, L, F = 6, 3, 32


def make(name: str, **kwargs) -> sp.Sparsifier:
    return build_sparsifier(SparsifierConfig(name=name, **kwargs), L, F)


def naive_topk(pre: np.ndarray, k: int, signed: bool) -> np.ndarray:
    """Per (token, layer): keep the k largest scores, value = pre (signed) or relu(pre)."""
    out = np.zeros_like(pre)
    for b in range(pre.shape[0]):
        for layer in range(pre.shape[1]):
            row = pre[b, layer]
            scores = [abs(v) if signed else max(v, 0.0) for v in row]
            order = sorted(range(len(row)), key=lambda i: -scores[i])[:k]
            for i in order:
                out[b, layer, i] = row[i] if signed else max(row[i], 0.0)
    return out


def naive_batch_topk(pre: np.ndarray, k: int) -> np.ndarray:
    """Per layer: keep the k*B largest relu(pre) among all (token, latent) pairs."""
    n_tokens, n_layers, n_latents = pre.shape
    out = np.zeros_like(pre)
    for layer in range(n_layers):
        pairs = [
            (max(pre[b, layer, i], 0.0), b, i) for b in range(n_tokens) for i in range(n_latents)
        ]
        pairs.sort(key=lambda p: -p[0])
        for value, b, i in pairs[: k * n_tokens]:
            out[b, layer, i] = value
    return out


# --------------------------------------------------------------------------- TopK family


def test_abs_topk_keeps_k_largest_magnitudes_with_signs() -> None:
    pre = torch.randn(B, L, F, dtype=torch.float64)
    z = make("abs_topk", k=5).activate(pre)[0]
    np.testing.assert_allclose(z.numpy(), naive_topk(pre.numpy(), 5, signed=True))
    assert (z < 0).any()
    assert ((z != 0).sum(-1) == 5).all()


def test_relu_topk_matches_naive_and_zeros_stay_zero() -> None:
    pre = torch.randn(B, L, F, dtype=torch.float64)
    pre[0, 0] = -torch.rand(F, dtype=torch.float64)  # no positive value at all
    pre[0, 0, 3] = 0.7  # exactly one positive value
    z = make("relu_topk", k=5).activate(pre)[0]
    np.testing.assert_allclose(z.numpy(), naive_topk(pre.numpy(), 5, signed=False))
    assert (z >= 0).all()
    assert (z[0, 0] != 0).sum() == 1


def test_topk_sparse_codes_and_gradient() -> None:
    pre = torch.randn(B, L, F, dtype=torch.float64, requires_grad=True)
    sparsifier = make("relu_topk", k=4)
    codes = sparsifier.activate(pre, want_codes=True)[1]
    assert isinstance(codes, SparseCodes)
    assert codes.values.shape == (B, L, 4) and codes.indices.dtype == torch.int64
    z = sparsifier.activate(pre)[0]
    torch.testing.assert_close(codes_to_dense(codes, F), z)
    upstream = torch.randn_like(z)
    (z * upstream).sum().backward()
    kept = (z != 0).to(upstream.dtype)
    torch.testing.assert_close(pre.grad, upstream * kept)


def test_batch_topk_training_matches_naive_and_calibrates_threshold() -> None:
    sparsifier = make("batch_topk", k=3, threshold_ema=0.9).train()
    pre1 = torch.randn(B, L, F, dtype=torch.float64)
    z1 = sparsifier.activate(pre1)[0]
    expected = naive_batch_topk(pre1.numpy(), 3)
    np.testing.assert_allclose(z1.numpy(), expected)
    assert ((z1 != 0).sum(-1) != 3).any()  # variable count per token, k on average
    min_kept1 = np.array([expected[:, i][expected[:, i] > 0].min() for i in range(L)])
    np.testing.assert_allclose(sparsifier.threshold.numpy(), min_kept1, rtol=1e-6)

    pre2 = torch.randn(B, L, F, dtype=torch.float64) + 0.5
    expected2 = naive_batch_topk(pre2.numpy(), 3)
    sparsifier.activate(pre2)
    min_kept2 = np.array([expected2[:, i][expected2[:, i] > 0].min() for i in range(L)])
    ema = 0.9 * min_kept1 + 0.1 * min_kept2
    np.testing.assert_allclose(sparsifier.threshold.numpy(), ema, rtol=1e-6)


def test_batch_topk_calibrated_threshold_is_the_mean_smallest_kept_value() -> None:
    """calibrated_threshold = mean over batches of the naive batch top-(k*B)'s smallest
    kept value per layer; it changes no state until set_threshold."""
    sparsifier = make("batch_topk", k=3).train()
    batches = [torch.randn(B, L, F, dtype=torch.float64) + shift for shift in (0.0, 0.7)]
    expected = np.mean(
        [
            [naive[:, i][naive[:, i] > 0].min() for i in range(L)]
            for naive in (naive_batch_topk(pre.numpy(), 3) for pre in batches)
        ],
        axis=0,
    )
    before = sparsifier.threshold.clone()
    threshold = sparsifier.calibrated_threshold(iter(batches))
    np.testing.assert_allclose(threshold.numpy(), expected, rtol=1e-6)
    assert torch.equal(sparsifier.threshold, before)
    assert sparsifier.calibrated_threshold(iter(())) is None
    sparsifier.set_threshold(threshold)
    assert torch.equal(sparsifier.threshold, threshold)
    assert make("relu_topk", k=3).calibrated_threshold(iter(batches)) is None


def test_batch_topk_inference_uses_threshold() -> None:
    sparsifier = make("batch_topk", k=3).eval()
    sparsifier.threshold.copy_(torch.tensor([0.2, 0.5, 1.0]))
    pre = torch.randn(B, L, F)
    z = sparsifier.activate(pre)[0]
    thr = [0.2, 0.5, 1.0]
    expected = np.zeros((B, L, F), dtype=np.float32)
    for b in range(B):
        for layer in range(L):
            for i in range(F):
                v = float(pre[b, layer, i])
                expected[b, layer, i] = v if v > thr[layer] else 0.0
    np.testing.assert_allclose(z.numpy(), expected)
    assert int(sparsifier.n_tokens_seen) == 0  # eval does not touch statistics
    torch.testing.assert_close(codes_to_dense(sparsifier.activate(pre, want_codes=True)[1], F), z)


@pytest.mark.parametrize("name", ["relu_topk", "abs_topk", "batch_topk", "jumprelu"])
def test_activate_layer_equals_layer_slice(name: str) -> None:
    sparsifier = make(name, k=4).eval()
    if name == "batch_topk":
        sparsifier.threshold.copy_(torch.tensor([0.1, 0.3, 0.6]))
    pre = torch.randn(B, L, F)
    z = sparsifier.activate(pre)[0]
    for layer in range(L):
        torch.testing.assert_close(sparsifier.activate_layer(layer, pre[:, layer]), z[:, layer])


# --------------------------------------------------------------------------- JumpReLU


def test_jumprelu_forward_and_gradients_match_hand_formulas() -> None:
    bandwidth = 0.5
    threshold = (torch.rand(L, F, dtype=torch.float64) * 0.5 + 0.1).requires_grad_(True)
    # Put many pre-activations inside the kernel window around the threshold.
    pre = threshold.detach() + (torch.rand(B, L, F, dtype=torch.float64) - 0.5) * 2.0 * bandwidth
    pre.requires_grad_(True)
    upstream = torch.randn(B, L, F, dtype=torch.float64)
    z = jumprelu(pre, threshold, bandwidth)
    (z * upstream).sum().backward()

    p, t, g = pre.detach().numpy(), threshold.detach().numpy(), upstream.numpy()
    np.testing.assert_allclose(z.detach().numpy(), np.where(p > t, p, 0.0))
    np.testing.assert_allclose(pre.grad.numpy(), np.where(p > t, g, 0.0))
    expected_t = np.zeros((L, F))
    for b in range(B):
        for layer in range(L):
            for i in range(F):
                u = (p[b, layer, i] - t[layer, i]) / bandwidth
                rect = 1.0 if -0.5 < u < 0.5 else 0.0
                expected_t[layer, i] += -(t[layer, i] / bandwidth) * rect * g[b, layer, i]
    np.testing.assert_allclose(threshold.grad.numpy(), expected_t, rtol=1e-10, atol=1e-12)
    assert np.count_nonzero(expected_t) > L * F // 4  # the window was actually exercised


def test_jumprelu_gradcheck_where_differentiable() -> None:
    bandwidth = 0.1
    threshold = torch.rand(L, F, dtype=torch.float64) * 0.5 + 0.2
    sign = torch.where(torch.rand(B, L, F) > 0.5, 1.0, -1.0).double()
    # Every pre-activation is more than bandwidth away from its threshold: the function is
    # smooth there and the pseudo-derivative (zero outside the kernel) is the true one.
    pre = threshold + sign * (torch.rand(B, L, F, dtype=torch.float64) + 2 * bandwidth)
    pre.requires_grad_(True)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, t: jumprelu(p, t, bandwidth), (pre, threshold))


def test_jumprelu_sparse_only_when_forced() -> None:
    sparsifier = make("jumprelu", threshold_init=0.5)
    pre = torch.randn(B, L, F)
    assert sparsifier.activate(pre)[1] is None
    codes = sparsifier.activate(pre, want_codes=True)[1]
    torch.testing.assert_close(codes_to_dense(codes, F), sparsifier.activate(pre)[0])
    assert codes.values.shape[-1] == int((sparsifier.activate(pre)[0] != 0).sum(-1).max())


def _context(pre, z, norms, progress, **kwargs) -> LossContext:
    base = {
        "pre": pre,
        "z": z,
        "codes": None,
        "y_scaled": torch.zeros(pre.shape[0], L, 4),
        "y_hat_scaled": torch.zeros(pre.shape[0], L, 4),
        "decoder_norms": norms,
        "decode_fn": lambda codes: torch.zeros(pre.shape[0], L, 4),
        "progress": progress,
    }
    base.update(kwargs)
    return LossContext(**base)


@pytest.mark.parametrize("progress, ramp", [(0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.7, 1.0)])
def test_tanh_penalty_matches_numpy(progress: float, ramp: float) -> None:
    cfg = {"sparsity_coeff": 0.3, "tanh_c": 2.5, "sparsity_warmup_fraction": 0.1}
    sparsifier = make("jumprelu", threshold_init=0.2, **cfg)
    pre = torch.randn(B, L, F, dtype=torch.float64)
    z = sparsifier.activate(pre)[0]
    norms = torch.rand(L, F, dtype=torch.float64) + 0.5
    losses = sparsifier.losses(_context(pre, z, norms, progress))
    assert set(losses) == {"sparsity"}
    zn, nn_ = z.detach().numpy(), norms.numpy()
    per_token = [np.tanh(2.5 * nn_ * zn[b]).sum() for b in range(B)]
    expected = 0.3 * ramp * np.mean(per_token)
    np.testing.assert_allclose(float(losses["sparsity"].detach()), expected, rtol=1e-6, atol=1e-12)


def test_l0_penalty_value_and_threshold_gradient() -> None:
    bandwidth = 0.4
    sparsifier = make("jumprelu", threshold_init=0.3, bandwidth=bandwidth, sparsity_loss="l0")
    sparsifier.threshold.data = sparsifier.threshold.data.double()
    pre = torch.randn(B, L, F, dtype=torch.float64) * 0.5 + 0.3
    z = sparsifier.activate(pre)[0]
    loss = sparsifier.losses(_context(pre, z, torch.ones(L, F, dtype=torch.float64), 1.0))
    loss["sparsity"].backward()
    p = pre.numpy()
    lam = 1e-4  # default sparsity_coeff, fully ramped
    np.testing.assert_allclose(
        float(loss["sparsity"].detach()), lam * (p > 0.3).sum() / B, rtol=1e-6
    )
    rect = (np.abs((p - 0.3) / bandwidth) < 0.5).astype(np.float64)
    expected = lam * (-(1.0 / bandwidth) * rect).sum(axis=0) / B
    np.testing.assert_allclose(sparsifier.threshold.grad.numpy(), expected, rtol=1e-6)


def test_step_has_no_pre_gradient() -> None:
    pre = torch.randn(B, L, F, dtype=torch.float64, requires_grad=True)
    threshold = torch.full((L, F), 0.1, dtype=torch.float64, requires_grad=True)
    step(pre, threshold, 1.0).sum().backward()
    assert torch.count_nonzero(pre.grad) == 0
    assert torch.count_nonzero(threshold.grad) > 0


def test_preact_loss_matches_numpy() -> None:
    sparsifier = make("jumprelu", threshold_init=0.4, preact_coeff=0.25)
    pre = torch.randn(B, L, F, requires_grad=True)
    norms = torch.rand(L, F) + 0.5
    losses = sparsifier.losses(_context(pre, sparsifier.activate(pre)[0], norms, 1.0))
    assert set(losses) == {"sparsity", "preact"}
    p, n = pre.detach().numpy(), norms.numpy()
    expected = 0.25 * np.mean([(np.maximum(0.4 - p[b], 0) * n).sum() for b in range(B)])
    np.testing.assert_allclose(float(losses["preact"].detach()), expected, rtol=1e-5)
    losses["preact"].backward()
    assert sparsifier.threshold.grad is None  # the threshold is detached in this term
    assert (pre.grad[pre.detach() < 0.4] < 0).all()  # pushes sub-threshold pre-activations up


# --------------------------------------------------------------------------- AuxK


def naive_auxk(pre, dead, aux_k, signed, W, residual, coeff) -> float:
    """Dense per-(token, layer) aux codes, per-layer decoder W [L, F, d], normalised error."""
    n_tokens = pre.shape[0]
    z = np.zeros_like(pre)
    for b in range(n_tokens):
        for layer in range(L):
            cand = [i for i in range(F) if dead[layer, i]]
            score = {i: abs(pre[b, layer, i]) if signed else max(pre[b, layer, i], 0) for i in cand}
            for i in sorted(cand, key=lambda i: -score[i])[:aux_k]:
                z[b, layer, i] = pre[b, layer, i] if signed else max(pre[b, layer, i], 0)
    total = 0.0
    for layer in range(L):
        recon = z[:, layer] @ W[layer]
        total += ((recon - residual[:, layer]) ** 2).sum() / (residual[:, layer] ** 2).sum()
    return coeff * total


@pytest.mark.parametrize("name, signed", [("relu_topk", False), ("abs_topk", True)])
def test_auxk_zero_when_nothing_dead_then_matches_naive(name: str, signed: bool) -> None:
    d = 5
    sparsifier = make(name, k=4, aux_k=3, aux_coeff=0.5, dead_tokens=100)
    pre = torch.randn(B, L, F, dtype=torch.float64, requires_grad=True)
    W = torch.randn(L, F, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, L, d, dtype=torch.float64)
    y_hat = torch.randn(B, L, d, dtype=torch.float64, requires_grad=True)

    def decode_fn(codes: SparseCodes) -> torch.Tensor:
        return torch.einsum("blf,lfd->bld", codes_to_dense(codes, F), W)

    ctx = _context(
        pre,
        sparsifier.activate(pre)[0],
        None,
        0.5,
        y_scaled=y,
        y_hat_scaled=y_hat,
        decode_fn=decode_fn,
    )
    assert float(sparsifier.losses(ctx)["auxk"].detach()) == 0.0

    with torch.no_grad():  # latents 0..9 of every layer have not fired for 100 tokens
        sparsifier.tokens_since_fired[:, :10] = 100
    loss = sparsifier.losses(ctx)["auxk"]
    residual = (y - y_hat).detach().numpy()
    expected = naive_auxk(
        pre.detach().numpy(),
        sparsifier.dead_mask().numpy(),
        3,
        signed,
        W.detach().numpy(),
        residual,
        0.5,
    )
    assert float(loss.detach()) > 0
    np.testing.assert_allclose(float(loss.detach()), expected, rtol=1e-10)

    loss.backward()
    assert y_hat.grad is None  # the residual is detached
    assert torch.count_nonzero(W.grad[:, 10:]) == 0  # only dead latents are used
    with torch.no_grad():
        W -= 1e-3 * W.grad  # a small step along the gradient lowers the loss
    assert float(sparsifier.losses(ctx)["auxk"].detach()) < float(loss.detach())


def test_dead_latent_tracking() -> None:
    sparsifier = make("relu_topk", k=2, dead_tokens=8).train()
    pre = torch.full((4, L, F), -1.0)
    pre[:, :, 0] = 2.0
    pre[:, :, 1] = 1.0  # latents 0 and 1 always win; the others never fire
    sparsifier.activate(pre)
    assert int(sparsifier.n_tokens_seen) == 4
    assert not sparsifier.dead_mask().any()  # 4 tokens < dead_tokens
    sparsifier.activate(pre)
    dead = sparsifier.dead_mask()
    assert dead[:, 2:].all() and not dead[:, :2].any()
    assert (sparsifier.tokens_since_fired[:, :2] == 0).all()
    pre[0, :, 5] = 3.0  # latent 5 fires once: its counter resets
    sparsifier.activate(pre)
    assert not sparsifier.dead_mask()[:, 5].any()
    sparsifier.eval().activate(pre)
    assert int(sparsifier.n_tokens_seen) == 12  # eval forwards do not count


def test_jumprelu_tracks_dead_latents_too() -> None:
    sparsifier = make("jumprelu", threshold_init=0.5, dead_tokens=3).train()
    pre = torch.zeros(3, L, F)
    pre[:, :, :4] = 1.0
    sparsifier.activate(pre)
    assert sparsifier.dead_mask()[:, 4:].all() and not sparsifier.dead_mask()[:, :4].any()


# --------------------------------------------------------------------------- registry, config


def test_registry_lists_and_builds_all() -> None:
    names = list_sparsifiers()
    assert {"jumprelu", "relu_topk", "abs_topk", "batch_topk"} <= set(names)
    for name in names:
        assert make(name, k=4).name == name


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        make("topk_relu")
    for name in ("jumprelu", "relu_topk", "abs_topk", "batch_topk", "topk_relu"):
        assert name in str(err.value)


def test_k_larger_than_n_latents() -> None:
    with pytest.raises(ConfigError, match=r"k=64.*n_latents=32"):
        make("relu_topk", k=64)
    make("jumprelu", k=64)  # JumpReLU ignores k


def test_register_custom_sparsifier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "_REGISTRY", dict(sp._REGISTRY))

    @sp.register_sparsifier("identity_for_test")
    class Identity(sp.Sparsifier):
        def apply_sparsity(self, pre, layers, want_codes):
            return pre, None

    assert "identity_for_test" in list_sparsifiers()
    pre = torch.randn(B, L, F)
    torch.testing.assert_close(make("identity_for_test").activate(pre)[0], pre)
    with pytest.raises(ConfigError, match="already registered"):
        sp.register_sparsifier("relu_topk")(Identity)


@pytest.mark.parametrize(
    "key, value",
    [
        ("bandwidth", 0.0),
        ("k", 0),
        ("sparsity_warmup_fraction", 1.5),
        ("sparsity_loss", "l2"),
        ("threshold_ema", 1.0),
    ],
)
def test_config_validation_names_key(key: str, value) -> None:
    with pytest.raises(ConfigError, match=f"sparsifier.{key}"):
        SparsifierConfig(**{key: value})


def test_dense_to_codes_round_trip() -> None:
    z = torch.randn(B, L, F) * (torch.rand(B, L, F) < 0.2)
    codes = dense_to_codes(z)
    assert codes.values.shape[-1] == int((z != 0).sum(-1).max())
    torch.testing.assert_close(codes_to_dense(codes, F), z)
