"""CrossLayerTranscoder against naive numpy references, export round trips and a planted problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clt_lightning.errors import CheckpointMismatchError, ConfigError, DataNotFoundError
from clt_lightning.models import clt as clt_module
from clt_lightning.models.clt import CrossLayerTranscoder, scale_from_mean_sq_norm
from clt_lightning.models.encoding import SparseCodes, codes_to_dense
from clt_lightning.models.sparse_decode import sparse_decode
from clt_lightning.models.sparsifiers import SparsifierConfig

B, L, D, F = 5, 3, 8, 32
SPARSIFIERS = ["relu_topk", "abs_topk", "batch_topk", "jumprelu"]


def make_model(name: str = "relu_topk", decode: str = "auto", **kwargs) -> CrossLayerTranscoder:
    """A tiny CLT with non-trivial scales and biases, so every term of the maths is exercised."""
    config = SparsifierConfig(name=name, k=4, threshold_init=0.3, **kwargs)
    model = CrossLayerTranscoder(L, D, F, config, decode=decode)
    model.set_normalisation(torch.tensor([0.5, 2.0, 1.3]), torch.tensor([3.0, 0.25, 0.8]))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 1.0)
        if name == "batch_topk":
            model.sparsifier.threshold.copy_(torch.tensor([0.2, 0.4, 0.3]))
    return model.eval()


def numpy_params(model: CrossLayerTranscoder) -> dict:
    return {
        "W_enc": model.W_enc.detach().double().numpy(),
        "b_enc": model.b_enc.detach().double().numpy(),
        "W_dec": [w.detach().double().numpy() for w in model.W_dec],
        "b_dec": model.b_dec.detach().double().numpy(),
        "in_s": model.input_scale.double().numpy(),
        "out_s": model.output_scale.double().numpy(),
    }


def naive_decode(z: np.ndarray, p: dict) -> np.ndarray:
    """y_hat[b, l] = (b_dec[l] + sum_{s<=l} sum_i z[b, s, i] W_dec[s][i, l - s]) / out_s[l]."""
    n_tokens = z.shape[0]
    y = np.zeros((n_tokens, L, D))
    for b in range(n_tokens):
        for target in range(L):
            acc = p["b_dec"][target].copy()
            for source in range(target + 1):
                for i in range(F):
                    acc += z[b, source, i] * p["W_dec"][source][i, target - source]
            y[b, target] = acc / p["out_s"][target]
    return y


def naive_pre(x: np.ndarray, p: dict) -> np.ndarray:
    out = np.zeros((x.shape[0], L, F))
    for b in range(x.shape[0]):
        for layer in range(L):
            out[b, layer] = (x[b, layer] * p["in_s"][layer]) @ p["W_enc"][layer] + p["b_enc"][layer]
    return out


def sparse_z(n: int = B) -> torch.Tensor:
    return torch.randn(n, L, F) * (torch.rand(n, L, F) < 0.2)


# --------------------------------------------------------------------------- structure


def test_parameter_layout() -> None:
    model = make_model()
    assert model.W_enc.shape == (L, D, F) and model.b_enc.shape == (L, F)
    assert [tuple(w.shape) for w in model.W_dec] == [(F, L - s, D) for s in range(L)]
    assert model.b_dec.shape == (L, D)
    assert model.input_scale.shape == model.output_scale.shape == (L,)


def test_param_count_formula() -> None:
    manual = L * D * F + L * F + F * D * L * (L + 1) // 2 + L * D
    assert make_model("relu_topk").param_count() == manual
    assert make_model("jumprelu").param_count() == manual + L * F  # thresholds
    assert make_model().memory_estimate("adamw") == manual * 4 * 4
    with pytest.raises(ConfigError, match="lion"):
        make_model().memory_estimate("lion")


def test_paper_size_arithmetic() -> None:
    with torch.device("meta"):  # no memory is allocated
        model = CrossLayerTranscoder(12, 768, 16 * 768, SparsifierConfig(name="relu_topk"))
    n = 12 * 768 * 12288 + 12 * 12288 + 12288 * 768 * 78 + 12 * 768
    assert model.param_count() == n
    assert 845e6 < n < 855e6
    assert abs(model.memory_estimate("adamw") / 1e9 - 13.6) < 0.05


def test_initialisation() -> None:
    model = CrossLayerTranscoder(4, 16, 256, SparsifierConfig(name="relu_topk", k=4))
    sq_norms = model.decoder_norms().pow(2).mean(dim=1)  # mean over latents, per source
    expected = 16 / (3 * 256)  # E||W_dec[s][i]||^2 = (L - s) d / (3 F (L - s))
    torch.testing.assert_close(sq_norms, torch.full((4,), expected), rtol=0.1, atol=0)
    for s in range(4):
        enc = model.W_enc[s].detach()
        torch.testing.assert_close(enc.norm(dim=0), torch.ones(256))
        own = model.W_dec[s][:, 0].detach()
        cos = torch.nn.functional.cosine_similarity(enc.T, own, dim=-1)
        torch.testing.assert_close(cos, torch.ones(256))
    assert (model.b_dec == 0).all() and (model.b_enc == 0).all()
    assert (model.input_scale == 1).all() and (model.output_scale == 1).all()
    jr = CrossLayerTranscoder(2, 8, 16, SparsifierConfig(name="jumprelu", threshold_init=0.07))
    assert (jr.sparsifier.threshold == 0.07).all()


def test_set_normalisation() -> None:
    model = make_model()
    mean = torch.randn(L, D)
    model.set_normalisation(torch.ones(L) * 2, torch.tensor([1.0, 2.0, 4.0]), output_mean=mean)
    torch.testing.assert_close(model.b_dec.detach(), mean * torch.tensor([1.0, 2.0, 4.0])[:, None])
    with pytest.raises(CheckpointMismatchError, match=r"input_scale.*\[4\].*\[3\]"):
        model.set_normalisation(torch.ones(4), torch.ones(L))
    with pytest.raises(ConfigError, match="output_scale"):
        model.set_normalisation(torch.ones(L), torch.tensor([1.0, 0.0, 1.0]))
    msn = torch.tensor([4.0, 16.0, 2.0])
    torch.testing.assert_close(scale_from_mean_sq_norm(msn, 8), torch.sqrt(8 / msn))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="decode"):
        CrossLayerTranscoder(L, D, F, decode="fast")
    with pytest.raises(ConfigError, match="n_latents"):
        CrossLayerTranscoder(L, D, 0)
    with pytest.raises(CheckpointMismatchError, match=r"\[5, 3, 7\]"):
        make_model()(torch.randn(B, L, 7))


# --------------------------------------------------------------------------- maths


def test_encode_matches_numpy() -> None:
    model = make_model("abs_topk")
    x = torch.randn(B, L, D)
    enc = model.encode(x)
    p = numpy_params(model)
    np.testing.assert_allclose(
        enc.pre.detach().numpy(), naive_pre(x.double().numpy(), p), rtol=1e-5, atol=1e-5
    )
    assert enc.codes is not None and enc.codes.values.shape == (B, L, 4)
    torch.testing.assert_close(codes_to_dense(enc.codes, F), enc.z)


def test_decode_matches_naive_double_loop() -> None:
    model = make_model()
    z = sparse_z()
    expected = naive_decode(z.double().numpy(), numpy_params(model))
    np.testing.assert_allclose(model.decode(z).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_forward_raw_and_scaled(name: str) -> None:
    model = make_model(name)
    x = torch.randn(B, L, D)
    out = model(x)
    expected = naive_decode(out.encoding.z.detach().double().numpy(), numpy_params(model))
    np.testing.assert_allclose(out.y_hat.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.y_hat_scaled, out.y_hat * model.output_scale[:, None])
    y = torch.randn(B, L, D)
    torch.testing.assert_close(model.scale_targets(y), y * model.output_scale[:, None])


def test_contributions_sum_to_y_hat() -> None:
    model = make_model()
    z = sparse_z()
    contrib = model.contributions(z)
    assert contrib.shape == (B, L, L, D)
    p = numpy_params(model)
    for s in range(L):
        for target in range(L):
            term = contrib[:, s, target].detach().numpy()
            if s > target:
                assert (term == 0).all()
            else:
                expected = (
                    z.double().numpy()[:, s] @ p["W_dec"][s][:, target - s] / p["out_s"][target]
                )
                np.testing.assert_allclose(term, expected, rtol=1e-5, atol=1e-6)
    total = contrib.sum(dim=1) + model.b_dec / model.output_scale[:, None]
    torch.testing.assert_close(total, model.decode(z), rtol=1e-5, atol=1e-5)


def test_encode_layer_and_decode_target_match_full_model() -> None:
    model = make_model("jumprelu")
    x = torch.randn(B, L, D)
    out = model(x)
    zs = [model.encode_layer(layer, x[:, layer]) for layer in range(L)]
    for layer in range(L):
        torch.testing.assert_close(zs[layer], out.encoding.z[:, layer])
        torch.testing.assert_close(model.decode_target(layer, zs), out.y_hat[:, layer])
    # leading dimensions are free: [N, T, d] tokens of images
    x_img = torch.randn(2, 3, D)
    assert model.encode_layer(1, x_img).shape == (2, 3, F)
    with pytest.raises(ValueError, match="needs 3 sources"):
        model.decode_target(2, zs[:2])


def test_decoder_norms_over_all_targets() -> None:
    model = make_model()
    norms = model.decoder_norms().detach().numpy()
    for s in range(L):
        w = model.W_dec[s].detach().numpy()
        for i in range(F):
            concatenated = np.concatenate([w[i, j] for j in range(L - s)])
            np.testing.assert_allclose(norms[s, i], np.linalg.norm(concatenated), rtol=1e-5)


# --------------------------------------------------------------------------- sparse decode paths


def reference_sparse_decode(codes: SparseCodes, W_dec, b_dec) -> torch.Tensor:
    """What sparse_decode must return: scaled-space y_hat, via a per-target sum."""
    z = codes_to_dense(codes, W_dec[0].shape[0])
    cols = []
    for target in range(len(W_dec)):
        y = b_dec[target].expand(z.shape[0], -1)
        for s in range(target + 1):
            y = y + z[:, s] @ W_dec[s][:, target - s]
        cols.append(y)
    return torch.stack(cols, dim=1)


def test_codes_decode_like_dense() -> None:
    model = make_model("relu_topk", decode="sparse")
    x = torch.randn(B, L, D)
    out = model(x)
    torch.testing.assert_close(model.decode(out.encoding.codes), model.decode(out.encoding.z))
    torch.testing.assert_close(out.y_hat, model.decode(out.encoding.z))


@pytest.mark.parametrize(
    "name, decode, grad, expect_sparse",
    [
        ("relu_topk", "auto", True, True),
        ("relu_topk", "dense", True, False),
        ("jumprelu", "auto", False, False),
        ("jumprelu", "sparse", False, True),
        ("jumprelu", "sparse", True, False),  # threshold gradient needs dense z
        ("batch_topk", "sparse", True, True),
    ],
)
def test_decode_mode_routes_to_sparse_decode(
    monkeypatch, name, decode, grad, expect_sparse
) -> None:
    calls = []

    def fake(codes, W_dec, b_dec):
        calls.append(codes.values.shape)
        return reference_sparse_decode(codes, W_dec, b_dec)

    monkeypatch.setattr(clt_module, "sparse_decode", fake)
    model = make_model(name, decode=decode)
    x = torch.randn(B, L, D)
    with torch.set_grad_enabled(grad):
        out = model(x)
    assert bool(calls) == expect_sparse
    torch.testing.assert_close(out.y_hat, model.decode(out.encoding.z), rtol=1e-5, atol=1e-5)


def test_jumprelu_threshold_gradient_same_in_sparse_mode() -> None:
    x, y = torch.randn(B, L, D), torch.randn(B, L, D)
    grads = []
    for decode in ("dense", "sparse"):
        torch.manual_seed(1)
        model = make_model("jumprelu", decode=decode, bandwidth=2.0).train()
        (model(x).y_hat - y).pow(2).sum().backward()
        grads.append(model.sparsifier.threshold.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("name", ["relu_topk", "abs_topk"])
def test_topk_gradients_same_in_sparse_and_dense_modes(name: str) -> None:
    x, y = torch.randn(B, L, D), torch.randn(B, L, D)
    grads = []
    for decode in ("dense", "sparse"):
        torch.manual_seed(1)
        model = make_model(name, decode=decode).train()
        (model(x).y_hat - y).pow(2).sum().backward()
        grads.append([p.grad for p in (model.W_enc, model.b_enc, model.b_dec, *model.W_dec)])
    for dense_grad, sparse_grad in zip(*grads, strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-5)


def test_real_sparse_decode_module() -> None:
    model = make_model("relu_topk", decode="sparse")
    out = model(torch.randn(B, L, D))
    got = sparse_decode(out.encoding.codes, list(model.W_dec), model.b_dec)
    expected = reference_sparse_decode(out.encoding.codes, list(model.W_dec), model.b_dec)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- losses


def test_auxiliary_losses_keys_and_auxk() -> None:
    model = make_model("relu_topk", dead_tokens=50, aux_k=8).train()
    x, y = torch.randn(B, L, D), torch.randn(B, L, D)
    out = model(x)
    losses = model.auxiliary_losses(out, model.scale_targets(y), 0.5)
    assert set(losses) == {"auxk"} and float(losses["auxk"]) == 0.0
    with torch.no_grad():
        model.sparsifier.tokens_since_fired[:, F // 2 :] = 50
    out = model(x)
    aux = model.auxiliary_losses(out, model.scale_targets(y), 0.5)["auxk"]
    assert float(aux.detach()) > 0
    aux.backward()
    assert model.W_dec[0].grad is not None and model.W_dec[0].grad.abs().sum() > 0
    assert model.b_dec.grad is None or (model.b_dec.grad == 0).all()  # decoded without bias
    jr = make_model("jumprelu", preact_coeff=0.1)
    out = jr(x)
    assert set(jr.auxiliary_losses(out, jr.scale_targets(y), 1.0)) == {"sparsity", "preact"}


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", SPARSIFIERS)
def test_export_round_trip_on_raw_activations(tmp_path: Path, name: str) -> None:
    model = make_model(name)
    x = torch.randn(64, L, D) * 3.0
    expected = model(x).y_hat
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["n_layers"], config["d_model"], config["n_latents"]) == (L, D, F)
    assert config["sparsifier"]["name"] == name and config["format_version"] == 1
    tensors = load_file(tmp_path / "clt.safetensors")
    p = numpy_params(model)
    for i in range(L):
        assert tensors[f"W_enc_{i}"].shape == (F, D)
        assert tensors[f"W_dec_{i}"].shape == (F, L - i, D)
        np.testing.assert_allclose(
            tensors[f"W_enc_{i}"].numpy(), (p["in_s"][i] * p["W_enc"][i]).T, rtol=1e-6
        )
        np.testing.assert_allclose(
            tensors[f"b_dec_{i}"].numpy(), p["b_dec"][i] / p["out_s"][i], rtol=1e-6
        )
        for j in range(L - i):
            np.testing.assert_allclose(
                tensors[f"W_dec_{i}"][:, j].numpy(),
                p["W_dec"][i][:, j] / p["out_s"][i + j],
                rtol=1e-6,
            )
    assert ("threshold_0" in tensors) == (name in ("jumprelu", "batch_topk"))

    loaded = CrossLayerTranscoder.from_pretrained(tmp_path)
    assert (loaded.input_scale == 1).all() and (loaded.output_scale == 1).all()
    torch.testing.assert_close(loaded(x).y_hat, expected, rtol=1e-4, atol=1e-4)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="config.json"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "nowhere")
    make_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "clt.safetensors")
    tensors["W_dec_1"] = tensors["W_dec_1"][:16].contiguous()
    save_file(tensors, tmp_path / "clt.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"W_dec_1.*\[16, 2, 8\].*\[32, 2, 8\]"):
        CrossLayerTranscoder.from_pretrained(tmp_path)
    (tmp_path / "clt.safetensors").unlink()
    with pytest.raises(DataNotFoundError, match="clt.safetensors"):
        CrossLayerTranscoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(("key", "value"), [("n_layers", "3"), ("d_model", 0), ("sparsifier", "x")])
def test_export_config_values_are_checked(tmp_path: Path, key: str, value) -> None:
    """Issue 12 kind 4: config.json fields are checked before use (a string n_layers was a
    TypeError inside the constructor)."""
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointMismatchError, match=f"config.json: {key} is"):
        CrossLayerTranscoder.from_pretrained(tmp_path)


def test_nan_weights_are_not_exported(tmp_path: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model.b_enc[1, 2] = float("nan")
    with pytest.raises(CheckpointMismatchError, match="tensor b_enc_1 holds NaN or Inf"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- training


def planted_problem(
    teacher: CrossLayerTranscoder, n: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_l = sparse non-negative mix of k of the teacher's encoder directions; y = teacher(x)."""
    n_layers, d, n_latents = teacher.W_enc.shape
    idx = torch.rand(n, n_layers, n_latents).argsort(-1)[..., :k]
    codes = torch.zeros(n, n_layers, n_latents).scatter(-1, idx, torch.rand(n, n_layers, k) + 0.5)
    x = torch.einsum("blf,ldf->bld", codes, teacher.W_enc.detach()) + 0.05 * torch.randn(
        n, n_layers, d
    )
    with torch.no_grad():
        return x, teacher(x).y_hat


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread, above all on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_recovers_planted_sparse_clt(one_thread) -> None:
    d, k = 16, 4
    teacher = CrossLayerTranscoder(
        L, d, 32, SparsifierConfig(name="relu_topk", k=k), decode="dense"
    )
    with torch.no_grad():
        for w in teacher.W_dec:
            w.normal_(0, 1)
        teacher.b_dec.normal_(0, 0.5)
    teacher.eval()
    x_val, y_val = planted_problem(teacher, 2048, k)
    config = SparsifierConfig(name="relu_topk", k=k, aux_k=16, dead_tokens=2048)
    model = CrossLayerTranscoder(L, d, 64, config, decode="dense")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(500):
        x, y = planted_problem(teacher, 256, k)
        out = model(x)
        y_scaled = model.scale_targets(y)
        loss = (out.y_hat_scaled - y_scaled).pow(2).sum(-1).mean()
        loss = loss + sum(model.auxiliary_losses(out, y_scaled, i / 500).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y_hat = model.eval()(x_val).y_hat
    r2 = 1 - (y_hat - y_val).pow(2).sum((0, 2)) / (y_val - y_val.mean(0)).pow(2).sum((0, 2))
    assert (r2 > 0.9).all(), r2
