"""The callbacks' logged keys: stable names, undefined values left out, dead-latent counts."""

from __future__ import annotations

import math

import torch

from clt_lightning import dashboard


def payloads() -> dict:
    return {
        "cascade": {
            "n_layers": 2,
            "n_images": 4,
            "baseline": {"top1": 75.0, "top5": 100.0},
            "modes": {
                "cls": {"starts": [0, 1], "top1": [50.0, 75.0], "top5": [100.0, 100.0]},
                "patches": {"starts": [0, 1], "top1": [25.0, 50.0], "top5": [75.0, 100.0]},
            },
        },
        "faithfulness": {
            "rows": [
                {"window": "0-1", "start": 0, "mode": "cls", "kl": 0.5, "prompt_r": None},
                {"window": "1-1", "start": 1, "mode": "cls", "kl": 0.1, "prompt_r": math.nan},
            ]
        },
        "ablations": {
            "rows": [{"mode": "cls", "all_sources": 75.0, "drop_top1": 50.0, "keep_topk": 75.0}]
        },
        "reconstruction": {
            "all": {"r2": [0.5, 0.7], "mse": [0.1, 0.2], "cosine": [0.9, 0.8], "l0": [4.0, 3.0]},
            "cls": {"r2": [None, 0.2], "mse": [0.3, 0.4], "cosine": [0.7, 0.6], "l0": [2.0, 1.0]},
        },
    }


def test_scalar_keys_are_namespaced_and_undefined_values_left_out() -> None:
    metrics = dashboard.scalar_metrics(payloads(), "eval")
    assert metrics["eval/baseline_top1"] == 75.0
    assert metrics["eval/cascade_top1/patches/start_01"] == 50.0
    assert metrics["eval/cascade_top5/patches/start_00"] == 75.0
    assert metrics["eval/faithfulness/cls/start_01/kl"] == 0.1
    assert metrics["eval/ablation/cls/drop_top1"] == 50.0
    assert metrics["eval/reconstruction/l0/all/layer_01"] == 3.0
    assert metrics["eval/reconstruction/r2/all/mean"] == 0.6
    # an undefined value (None, NaN) is not logged; the mean is over the defined layers
    assert "eval/faithfulness/cls/start_00/prompt_r" not in metrics
    assert "eval/faithfulness/cls/start_01/prompt_r" not in metrics
    assert "eval/reconstruction/r2/cls/layer_00" not in metrics
    assert metrics["eval/reconstruction/r2/cls/mean"] == 0.2
    assert all(not math.isnan(v) for v in metrics.values())
    full = dashboard.scalar_metrics(payloads(), "eval_full")
    assert {k.replace("eval_full/", "eval/", 1) for k in full} == set(metrics)


def test_dead_latent_metrics_count_per_layer() -> None:
    dead = torch.zeros(3, 8, dtype=torch.bool)
    dead[0, :2] = True
    dead[2] = True
    metrics = dashboard.dead_latent_metrics(dead, "eval")
    assert [metrics[f"eval/dead_latents/layer_{i:02d}"] for i in range(3)] == [2.0, 0.0, 8.0]
    assert [metrics[f"eval/dead_fraction/layer_{i:02d}"] for i in range(3)] == [0.25, 0.0, 1.0]
    assert math.isclose(metrics["eval/dead_fraction/mean"], (0.25 + 1.0) / 3, rel_tol=1e-6)


def test_contribution_table_rows_skip_the_empty_triangle() -> None:
    scores = {"cls": [[0.6, 0.3], [9.9, 0.5], [0.4, 0.2]]}  # rows: source 0, 1, bias
    rows = list(dashboard.contribution_rows(scores))
    assert rows == [
        ["cls", "00", 0, 0.6],
        ["cls", "00", 1, 0.3],
        ["cls", "01", 1, 0.5],
        ["cls", "bias", 0, 0.4],
        ["cls", "bias", 1, 0.2],
    ]
