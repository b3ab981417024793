"""Undefined metric values in every evaluation output (issue 11.6): null + reason in JSON,
"–" in tables, decided on exact counts; the JSON writers refuse NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clt_lightning.evaluation.ablations import rank_sources, undefined_ranking
from clt_lightning.evaluation.clean_pass import defined_reconstruction
from clt_lightning.evaluation.contributions import ContributionScores
from clt_lightning.evaluation.suite import CONTRIBUTION_UNDEFINED
from clt_lightning.evaluation.undefined import Undefined, nan_to_undefined, to_json, write_json
from clt_lightning.metrics import ReconstructionMetrics


def test_reconstruction_r2_of_one_token_is_undefined_not_a_rounding_ratio():
    """One token: its variance is 0, but sum_sq - sum^2 / n rounds to a tiny number, which
    made R^2 a huge or NaN float; decided on the count instead."""
    metric = ReconstructionMetrics(2, 3, sync_on_compute=False)
    y = torch.tensor([[[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]], dtype=torch.float64)
    metric.update(y + 0.01, y, torch.ones(1, 2))
    values = defined_reconstruction(metric)
    assert all(isinstance(v, Undefined) and "has 1" in v.reason for v in values["r2"])
    np.testing.assert_allclose(values["mse"], [1e-4, 1e-4], rtol=1e-6)  # defined: a number
    empty = defined_reconstruction(ReconstructionMetrics(2, 3, sync_on_compute=False))
    assert all(isinstance(v, Undefined) for vs in empty.values() for v in vs)
    converted, reasons = to_json(values)
    assert converted["r2"] == [None, None] and set(reasons) == {"r2[0]", "r2[1]"}


def test_contribution_scores_without_a_defined_image_are_null_with_a_reason(tmp_path):
    scores = torch.tensor([[0.5, float("nan")], [0.0, float("nan")], [0.5, float("nan")]])
    payload = {"cls": nan_to_undefined(scores.tolist(), CONTRIBUTION_UNDEFINED)}
    data = json.loads(write_json(tmp_path / "contributions.json", payload).read_text())
    assert data["cls"] == [[0.5, None], [0.0, None], [0.5, None]]
    assert data["undefined"]["cls[0][1]"] == CONTRIBUTION_UNDEFINED


def test_ablation_ranking_of_an_undefined_target_is_undefined():
    column = torch.full((3, 2), float("nan"))  # rows: sources 0, 1 and the bias
    column[:, 0] = torch.tensor([0.2, 0.0, 0.8])
    n_images = {"cls": torch.tensor([4, 0])}
    scores = ContributionScores(n_layers=2, scores={"cls": column}, n_images=n_images)
    assert undefined_ranking(scores, "cls", 0) is None
    assert rank_sources(scores, "cls", 1) == [0, 1]  # deterministic, NaN last
    undefined = undefined_ranking(scores, "cls", 1)
    assert isinstance(undefined, Undefined) and "layer 1" in undefined.reason


def test_neighbour_score_that_is_not_a_number_is_undefined():
    from types import SimpleNamespace

    from clt_lightning.evaluation.retrieval import neighbours_to_json

    result = SimpleNamespace(ids=np.array([[3, -1]]), scores=np.array([[math.nan, math.nan]]),
                             labels=np.array([[1, 0]]), layer=0)  # fmt: skip
    corpus = SimpleNamespace(class_names=["a", "b"])
    record = neighbours_to_json([result], corpus, query={}, similarity="cosine")
    (entry,) = record["layers"][0]["neighbours"]
    assert isinstance(entry["score"], Undefined)
    assert to_json(record)[0]["layers"][0]["neighbours"][0]["score"] is None


def test_to_json_refuses_infinity_naming_the_path():
    with pytest.raises(ValueError, match=r"a\.b\[0\] is inf"):
        to_json({"a": {"b": [float("inf")]}})


def test_reconstruction_curves_draw_undefined_values_as_gaps(tmp_path):
    from clt_lightning.evaluation.plots import reconstruction_curves

    undefined = Undefined("r2 needs 2 tokens, the group has 1")
    runs = {"cls": {"mse": [0.1, 0.2], "r2": [undefined, undefined], "cosine": [0.9, 0.8]}}
    figure = reconstruction_curves(runs, tmp_path / "r.png", title="t")
    r2_axis = [ax for ax in figure.axes if "R" in ax.get_ylabel() or "r2" in ax.get_title()]
    assert (tmp_path / "r.png").is_file() and r2_axis
    (line,) = r2_axis[0].get_lines()
    assert np.isnan(line.get_ydata()).all()
