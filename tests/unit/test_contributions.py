"""Contribution scores: columns sum to 1 with the bias row, naive agreement, streaming."""

from __future__ import annotations

import logging

import pytest
import torch

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.evaluation.contributions import (
    ContributionAccumulator,
    contribution_scores,
)
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (two spin-wait badly on a shared 2-core machine)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture
def clt(tiny_teacher) -> CrossLayerTranscoder:
    model = CrossLayerTranscoder(3, 32, 64, SparsifierConfig("relu_topk", k=8))
    with torch.no_grad():
        model.b_dec.normal_(0, 0.3)
        model.set_normalisation(torch.tensor([0.7, 1.1, 0.9]), torch.tensor([1.3, 0.6, 2.0]))
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32)


def naive_scores(clt, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loop over images, tokens, sources and targets with the CLT's raw weights."""
    n_images, n_tokens, n_layers, _ = x.shape
    groups = ("cls", "patches")
    per_image = {
        g: torch.zeros(n_images, n_layers + 1, n_layers, dtype=torch.float64) for g in groups
    }
    for i in range(n_images):
        for t in range(n_tokens):
            group = "cls" if t == 0 else "patches"
            z = [clt.encode_layer(s, x[i, t, s]) for s in range(n_layers)]
            for target in range(n_layers):
                scale = clt.output_scale[target]
                terms = [z[s] @ clt.W_dec[s][:, target - s] / scale for s in range(target + 1)]
                bias = clt.b_dec[target] / scale
                y_hat = (bias + sum(terms)).double()
                norm2 = y_hat @ y_hat
                weight = 1 if group == "cls" else 1 / (n_tokens - 1)
                for s, term in enumerate(terms):
                    per_image[group][i, s, target] += weight * (term.double() @ y_hat) / norm2
                per_image[group][i, n_layers, target] += weight * (bias.double() @ y_hat) / norm2
    return {g: v.mean(dim=0) for g, v in per_image.items()}


@torch.no_grad()
def test_columns_sum_to_one_and_lower_triangle_is_zero(tiny_teacher, clt, images):
    result = contribution_scores(tiny_teacher, clt, [images[:2], images[2:]])
    assert set(result.scores) == {"cls", "patches", "all"}
    for group, scores in result.scores.items():
        assert scores.shape == (4, 3) and scores.dtype == torch.float64
        torch.testing.assert_close(scores.sum(dim=0), torch.ones(3, dtype=torch.float64))
        assert torch.all(scores[1, 0] == 0) and torch.all(scores[2, :2] == 0)
        assert result.n_images[group].tolist() == [5, 5, 5]
        assert not torch.allclose(result.bias(group), torch.zeros(3, dtype=torch.float64))


@torch.no_grad()
def test_matches_naive_loop(tiny_teacher, clt, images):
    x = tiny_teacher.capture(images[:3]).x
    result = contribution_scores(tiny_teacher, clt, [images[:3]], keep_per_image=True)
    expected = naive_scores(clt, x)
    for group in ("cls", "patches"):
        torch.testing.assert_close(result.scores[group], expected[group], atol=1e-5, rtol=1e-4)
    assert result.per_image["cls"].shape == (3, 4, 3)
    # "all" weights every token equally: 1/17 [CLS] + 16/17 patches per image
    mix = (result.per_image["cls"] + 16 * result.per_image["patches"]) / 17
    torch.testing.assert_close(result.scores["all"], mix.mean(dim=0), atol=1e-9, rtol=0)


@torch.no_grad()
def test_shuffled_token_batches_equal_whole_images(tiny_teacher, clt, images):
    x = tiny_teacher.capture(images).x  # [5, 17, 3, 32]
    whole = ContributionAccumulator(3)
    whole.update_images(clt, x[:2])
    whole.update_images(clt, x[2:])
    expected = whole.compute()
    tokens = x.reshape(5 * 17, 3, 32)
    token = torch.arange(17).repeat(5)
    image = torch.arange(5).repeat_interleave(17)
    order = torch.randperm(85)
    batches = [
        {"x": tokens[idx], "token": token[idx], "image": image[idx]} for idx in order.split(16)
    ]
    tokens_acc = ContributionAccumulator(3)
    for batch in batches:
        tokens_acc.update(clt, batch["x"], batch["token"], batch["image"])
    got = tokens_acc.compute()
    for group in expected.scores:
        torch.testing.assert_close(got.scores[group], expected.scores[group], atol=1e-9, rtol=0)


@torch.no_grad()
def test_zero_reconstruction_is_guarded(tiny_teacher, clt, images, caplog):
    with torch.no_grad():  # target 1 reconstructs to exactly zero
        clt.b_dec[1].zero_()
        clt.W_dec[0][:, 1].zero_()
        clt.W_dec[1][:, 0].zero_()
    with caplog.at_level(logging.WARNING):
        result = contribution_scores(tiny_teacher, clt, [images])
    assert "||y_hat||^2 = 0" in caplog.text
    scores = result.scores["cls"]
    assert torch.isnan(scores[:, 1]).all()
    assert result.n_images["cls"].tolist() == [5, 0, 5]
    torch.testing.assert_close(scores[:, [0, 2]].sum(dim=0), torch.ones(2, dtype=torch.float64))


def test_cls_only_tokens_skip_the_patch_group(clt):
    acc = ContributionAccumulator(3)
    acc.update(clt, torch.randn(4, 3, 32), torch.zeros(4, dtype=torch.long), torch.arange(4))
    result = acc.compute()
    assert set(result.scores) == {"cls", "all"}
    torch.testing.assert_close(result.scores["cls"], result.scores["all"])


def test_empty_set_and_bad_inputs(tiny_teacher, clt):
    with pytest.raises(ConfigError, match="empty"):
        contribution_scores(tiny_teacher, clt, [])
    with pytest.raises(ConfigError, match="valid"):
        ContributionAccumulator(3, groups=("cls", "tokens"))
    wrong = CrossLayerTranscoder(2, 32, 64, SparsifierConfig("relu_topk", k=8))
    with pytest.raises(CheckpointMismatchError, match=r"n_layers=2.*n_layers=3"):
        contribution_scores(tiny_teacher, wrong, [torch.randn(1, 3, 32, 32)])
