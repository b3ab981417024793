"""Necessity / sufficiency ablations: ranking, masked decoding, accuracies vs a naive run."""

from __future__ import annotations

import pytest
import torch

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.evaluation.ablations import (
    ablate,
    masked_reconstruction,
    rank_sources,
    source_subsets,
)
from clt_lightning.evaluation.cascade import cascade
from clt_lightning.evaluation.contributions import ContributionScores, contribution_scores
from clt_lightning.evaluation.token_modes import mode_positions
from clt_lightning.evaluation.zeroshot import zero_shot_logits
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
def clt() -> CrossLayerTranscoder:
    model = CrossLayerTranscoder(3, 32, 64, SparsifierConfig("relu_topk", k=8))
    with torch.no_grad():
        model.b_dec.normal_(0, 0.2)
        model.set_normalisation(torch.full((3,), 0.9), torch.full((3,), 0.5))
    return model.eval()


@pytest.fixture
def head() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.nn.functional.normalize(torch.randn(16, 5), dim=0), torch.tensor(3.0)


def make_scores(columns: dict[str, list[float]]) -> ContributionScores:
    """Scores whose last column (target 2) is given per group; bias row makes it sum to 1."""
    scores = {}
    for group, col in columns.items():
        table = torch.zeros(4, 3, dtype=torch.float64)
        table[:3, 2] = torch.tensor(col, dtype=torch.float64)
        table[3, 2] = 1 - sum(col)
        scores[group] = table
    return ContributionScores(3, scores, {g: torch.full((3,), 4) for g in scores})


def naive_embeddings(teacher, clt, images, positions, kept) -> torch.Tensor:
    """Independent: clean run; at the last layer y[M] = (b + sum_{s in kept} z_s W) / scale."""
    visual = teacher.clip.visual
    h = teacher.embed(images)
    n_layers = teacher.n_layers
    last = n_layers - 1
    codes = []
    for layer, block in enumerate(visual.transformer.resblocks):
        h = h + block.ls_1(block.attention(q_x=block.ln_1(h)))
        x = block.ln_2(h)
        y = block.mlp(x)
        codes.append(clt.encode_layer(layer, x[:, positions]))
        if layer == last:
            y_hat = clt.b_dec[last] + sum(codes[s] @ clt.W_dec[s][:, last - s] for s in kept)
            y = y.clone()
            y[:, positions] = y_hat / clt.output_scale[last]
        h = h + block.ls_2(y)
    pooled, _ = visual._pool(h)
    return pooled @ visual.proj


def test_rank_sources_and_subsets():
    scores = make_scores({"cls": [0.2, -0.1, 0.5], "all": [0.3, 0.3, 0.1]})
    assert rank_sources(scores, "cls", 2) == [2, 0, 1]
    assert rank_sources(scores, "all", 2) == [0, 1, 2]  # tie: lower source first
    subsets = source_subsets([2, 0, 1], k=2)
    assert subsets == {"full": [0, 1, 2], "drop_top1": [0, 1], "keep_topk": [0, 2]}
    assert source_subsets([2, 0, 1], k=9)["keep_topk"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="patches"):
        rank_sources(scores, "patches", 2)


@torch.no_grad()
def test_masked_reconstruction_keeps_bias(clt):
    codes = [torch.relu(torch.randn(4, 64)) for _ in range(3)]
    got = masked_reconstruction(clt, 2, codes, [0, 2])
    expected = (clt.b_dec[2] + codes[0] @ clt.W_dec[0][:, 2] + codes[2] @ clt.W_dec[2][:, 0]) / 0.5
    torch.testing.assert_close(got, expected)
    bias_only = masked_reconstruction(clt, 2, codes, [])
    torch.testing.assert_close(bias_only, (clt.b_dec[2] / 0.5).expand(4, 32))


@torch.no_grad()
def test_ablation_accuracies_match_naive_runs(tiny_teacher, clt, head):
    images = torch.randn(8, 3, 32, 32)
    scores = make_scores(
        {"cls": [0.1, 0.6, 0.2], "patches": [0.5, 0.1, 0.3], "all": [0.2, 0.2, 0.5]}
    )
    # labels: the naive "drop top-1" prediction for [CLS] -> that cell must be 100 %
    cls = mode_positions("cls", 17)
    labels = zero_shot_logits(naive_embeddings(tiny_teacher, clt, images, cls, [0, 2]), *head)
    labels = labels.argmax(dim=1)
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    result = ablate(tiny_teacher, clt, batches, *head, scores=scores, k=2)
    assert result.accuracy["cls"]["drop_top1"] == 100.0
    expected_kept = {
        "cls": {"full": [0, 1, 2], "drop_top1": [0, 2], "keep_topk": [1, 2]},
        "patches": {"full": [0, 1, 2], "drop_top1": [1, 2], "keep_topk": [0, 2]},
        "all": {"full": [0, 1, 2], "drop_top1": [0, 1], "keep_topk": [0, 2]},
    }
    assert result.kept_sources == expected_kept
    for mode, variants in expected_kept.items():
        positions = mode_positions(mode, 17)
        for variant, kept in variants.items():
            emb = naive_embeddings(tiny_teacher, clt, images, positions, kept)
            correct = (zero_shot_logits(emb, *head).argmax(1) == labels).double().mean()
            assert result.accuracy[mode][variant] == pytest.approx(100 * correct.item())
    base = zero_shot_logits(tiny_teacher.encode_image(images), *head).argmax(1) == labels
    assert result.baseline == pytest.approx(100 * base.double().mean().item())
    # "full" is the cascade's last window
    last = cascade(tiny_teacher, clt, batches, *head, starts=[2])
    for mode in ("cls", "patches", "all"):
        assert result.accuracy[mode]["full"] == last.top1(mode, 2)
    rows = result.rows()
    assert [r["tokens"] for r in rows] == ["cls", "patches", "all"]
    assert rows[0]["dropped source"] == "1" and rows[0]["kept sources"] == "1 2"
    assert "keep top-2" in rows[0]


@torch.no_grad()
def test_with_computed_scores(tiny_teacher, clt, head):
    images = torch.randn(4, 3, 32, 32)
    scores = contribution_scores(tiny_teacher, clt, [images])
    result = ablate(
        tiny_teacher, clt, [(images, torch.zeros(4, dtype=torch.long))], *head, scores=scores
    )
    ranking = rank_sources(scores, "cls", 2)
    assert result.kept_sources["cls"]["drop_top1"] == sorted(ranking[1:])
    assert result.k == 4 and result.kept_sources["cls"]["keep_topk"] == [0, 1, 2]


def test_bad_inputs(tiny_teacher, clt, head):
    scores = make_scores({"cls": [0.2, 0.3, 0.4]})
    data = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ConfigError, match="k >= 1"):
        ablate(tiny_teacher, clt, data, *head, scores=scores, modes=["cls"], k=0)
    with pytest.raises(ConfigError, match="empty"):
        ablate(tiny_teacher, clt, [], *head, scores=scores, modes=["cls"])
    with pytest.raises(ConfigError, match="'patches'"):
        ablate(tiny_teacher, clt, data, *head, scores=scores)
    wrong = CrossLayerTranscoder(3, 16, 64, SparsifierConfig("relu_topk", k=8))
    with pytest.raises(CheckpointMismatchError, match=r"d_model=16.*d_model=32"):
        ablate(tiny_teacher, wrong, data, *head, scores=scores, modes=["cls"])
