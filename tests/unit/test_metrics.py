"""Reconstruction metrics against sklearn / numpy, and their DDP-safe merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_squared_error, r2_score

from clt_lightning.metrics import ReconstructionMetrics, flatten_layer_metrics


def _random_batch(n: int, n_layers: int = 3, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, n_layers, d, generator=g) * torch.arange(1, d + 1) + 2.0
    y_hat = y + 0.3 * torch.randn(n, n_layers, d, generator=g)
    l0 = torch.randint(0, 10, (n, n_layers), generator=g)
    return y_hat, y, l0


def test_metrics_match_sklearn_and_numpy() -> None:
    y_hat, y, l0 = _random_batch(200)
    metric = ReconstructionMetrics(n_layers=3, d_model=5)
    for chunk in range(0, 200, 37):  # uneven batches
        metric.update(y_hat[chunk : chunk + 37], y[chunk : chunk + 37], l0[chunk : chunk + 37])
    values = metric.compute()
    for layer in range(3):
        yt, yp = y[:, layer].double().numpy(), y_hat[:, layer].double().numpy()
        assert values["mse"][layer].item() == pytest.approx(mean_squared_error(yt, yp), rel=1e-9)
        expected_r2 = r2_score(yt, yp, multioutput="variance_weighted")
        assert values["r2"][layer].item() == pytest.approx(expected_r2, rel=1e-9)
        cos = (yt * yp).sum(1) / (np.linalg.norm(yt, axis=1) * np.linalg.norm(yp, axis=1))
        assert values["cosine"][layer].item() == pytest.approx(cos.mean(), rel=1e-6)
        assert values["l0"][layer].item() == pytest.approx(l0[:, layer].double().mean().item())


def test_merged_states_equal_single_pass() -> None:
    """Two 'ranks' merged by summing states give the single-pass R^2 (not a mean of R^2s)."""
    y_hat, y, l0 = _random_batch(100)
    y[:50] += 10.0  # rank 0 and rank 1 see different means: averaging R^2 would be wrong
    single, a, b = (ReconstructionMetrics(3, 5) for _ in range(3))
    single.update(y_hat, y, l0)
    a.update(y_hat[:50], y[:50], l0[:50])
    b.update(y_hat[50:], y[50:], l0[50:])
    a.merge_state(b)
    for name, value in single.compute().items():
        torch.testing.assert_close(a.compute()[name], value)
    naive_mean = (
        r2_score(y[:50, 0], y_hat[:50, 0], multioutput="variance_weighted")
        + r2_score(y[50:, 0], y_hat[50:, 0], multioutput="variance_weighted")
    ) / 2
    assert abs(naive_mean - single.compute()["r2"][0].item()) > 1e-3


def test_flatten_names_layers_and_mean() -> None:
    flat = flatten_layer_metrics("val", {"r2": torch.tensor([0.5, 1.0])}, group="cls")
    assert flat == {"val/r2/cls/layer_00": 0.5, "val/r2/cls/layer_01": 1.0, "val/r2/cls/mean": 0.75}
