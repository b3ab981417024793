"""The evaluation suite: its one shared clean teacher pass gives the numbers of four separate
passes, and the default faithfulness windows are the paper's Table 5 rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clt_lightning.evaluation import ablations, cascade, contributions, suite, zeroshot
from clt_lightning.evaluation.faithfulness import TABLE5_WINDOWS, table5_windows
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig

CLASSES = ["zero", "one", "two", "three"]


@pytest.fixture
def clt(tiny_teacher) -> CrossLayerTranscoder:
    model = CrossLayerTranscoder(
        tiny_teacher.n_layers, tiny_teacher.d_model, 128, SparsifierConfig("relu_topk", k=4)
    )
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.set_normalisation(torch.full((3,), 0.8), torch.full((3,), 1.5))
    return model.eval()


@pytest.fixture
def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(10, 3, 32, 32, generator=generator)
    labels = torch.randint(0, len(CLASSES), (10,), generator=generator)
    return TensorDataset(images, labels)


def _four_passes(teacher, clt, dataset, config: suite.EvaluationConfig) -> dict:
    """What the suite computed before the shared pass: each metric its own teacher run."""
    loader = DataLoader(dataset, batch_size=config.batch_size)
    templates = zeroshot.templates_for("digits")
    classifier = zeroshot.build_classifier(teacher, CLASSES, templates)
    scale = zeroshot.logit_scale_of(teacher)
    windows = suite.default_windows(teacher.n_layers, None, config.modes)
    result = cascade.cascade(
        teacher, clt, loader, classifier, scale, modes=config.modes, keep=windows
    )
    scores = contributions.contribution_scores(teacher, clt, loader)
    ablation = ablations.ablate(
        teacher, clt, loader, classifier, scale, scores, modes=config.modes, k=2
    )
    return {
        "cascade": result,
        "contributions": scores,
        "ablation": ablation,
        "reconstruction": suite.reconstruction_metrics(teacher, clt, loader),
    }


def test_shared_pass_suite_equals_four_passes(tiny_teacher, clt, dataset, tmp_path: Path):
    # the default modes of a CLIP teacher (every group it has), named for the reference
    config = suite.EvaluationConfig(
        batch_size=4, ablation_k=2, classifier_cache=None, modes=["cls", "patches", "all"]
    )
    info = suite.RunInfo("run", "digits", "tiny")
    payloads = suite.run_suite(tiny_teacher, clt, dataset, CLASSES, info, config, tmp_path)
    reference = _four_passes(tiny_teacher, clt, dataset, config)
    cascade = reference["cascade"]
    assert payloads["cascade"]["baseline"] == cascade.baseline
    for mode in config.modes:
        assert payloads["cascade"]["modes"][mode]["top1"] == cascade.accuracy[mode]["top1"]
        assert payloads["cascade"]["modes"][mode]["top5"] == cascade.accuracy[mode]["top5"]
    for group, score in reference["contributions"].scores.items():
        torch.testing.assert_close(
            torch.tensor(payloads["contributions"][group], dtype=torch.float64),
            score,
            rtol=1e-6,
            atol=1e-9,
            equal_nan=True,
        )
    # reused codes: per-layer instead of whole-token matrix products, float rounding apart
    for group, metrics in reference["reconstruction"].items():
        assert payloads["reconstruction"][group]["l0"] == metrics["l0"]
        for name in ("mse", "r2", "cosine"):
            torch.testing.assert_close(
                torch.tensor(payloads["reconstruction"][group][name]),
                torch.tensor(metrics[name]),
                rtol=1e-6,
                atol=1e-9,
            )
    for row in payloads["ablations"]["rows"]:
        expected = reference["ablation"].accuracy[row["mode"]]
        assert (row["all_sources"], row["drop_top1"], row["keep_topk"]) == (
            expected["full"],
            expected["drop_top1"],
            expected["keep_topk"],
        )
    on_disk = json.loads((tmp_path / "reconstruction.json").read_text())
    assert on_disk == payloads["reconstruction"]
    assert (tmp_path / "run.json").is_file()


def test_shared_pass_without_every_token_encodes_them_itself(tiny_teacher, clt, dataset, tmp_path):
    """Modes that leave tokens out (here [CLS] only): contributions and reconstruction
    encode the recorded inputs; still the numbers of separate passes."""
    config = suite.EvaluationConfig(
        batch_size=4, classifier_cache=None, figures=False, modes=["cls"], ablation_k=2
    )
    info = suite.RunInfo("run", "digits", "tiny")
    payloads = suite.run_suite(tiny_teacher, clt, dataset, CLASSES, info, config, tmp_path)
    loader = DataLoader(dataset, batch_size=4)
    scores = contributions.contribution_scores(tiny_teacher, clt, loader)
    assert payloads["reconstruction"] == suite.reconstruction_metrics(tiny_teacher, clt, loader)
    for group, score in scores.scores.items():
        expected = torch.nan_to_num(score, nan=-1.0).tolist()
        got = torch.tensor(payloads["contributions"][group], dtype=torch.float64)
        got = torch.nan_to_num(got, nan=-1.0)
        assert got.tolist() == expected


def test_shared_pass_runs_the_teacher_twice_per_batch(tiny_teacher, clt, dataset, tmp_path):
    """One clean pass (cascade, contributions, reconstruction) + one for ablations: each
    batch's images are embedded twice, not four times."""
    calls = []
    embed = tiny_teacher.embed

    def counted(images):
        calls.append(images.shape[0])
        return embed(images)

    tiny_teacher.embed = counted
    config = suite.EvaluationConfig(batch_size=4, classifier_cache=None, figures=False)
    info = suite.RunInfo("run", "digits", "tiny")
    suite.run_suite(tiny_teacher, clt, dataset, CLASSES, info, config, tmp_path)
    assert sum(calls) == 2 * len(dataset)


def test_table5_rows_at_twelve_layers_are_the_papers():
    assert table5_windows(12) == list(TABLE5_WINDOWS)
    assert [w for w in table5_windows(12) if w[1] == "cls"] == [
        (0, "cls"),
        (7, "cls"),
        (10, "cls"),
        (11, "cls"),
    ]


def test_table5_rows_map_by_offset_from_the_last_layer():
    # 24 layers: 7-11 is 5 layers from the end -> 19-23
    assert table5_windows(24) == [
        (0, "cls"),
        (19, "cls"),
        (22, "cls"),
        (23, "cls"),
        (0, "patches"),
        (19, "patches"),
        (22, "patches"),
    ]
    # 4 layers: L-5 clips to 0 (the full window, not repeated)
    assert table5_windows(4) == [(0, "cls"), (2, "cls"), (3, "cls"), (0, "patches"), (2, "patches")]
    assert table5_windows(4, ["patches"]) == [(0, "patches"), (2, "patches")]


def test_default_windows_are_the_papers_and_starts_override_them():
    assert suite.default_windows(12, None, ["cls", "patches", "all"]) == list(TABLE5_WINDOWS)
    assert suite.default_windows(12, [3], ["cls", "all"]) == [(3, "cls"), (3, "all")]
    with pytest.raises(suite.ConfigError, match="faithfulness_starts"):
        suite.default_windows(12, [12], ["cls"])


def test_suite_faithfulness_rows_follow_table5(tiny_teacher, clt, dataset, tmp_path):
    config = suite.EvaluationConfig(batch_size=5, classifier_cache=None, figures=False)
    info = suite.RunInfo("run", "digits", "tiny")
    payloads = suite.run_suite(tiny_teacher, clt, dataset, CLASSES, info, config, tmp_path)
    rows = [(r["start"], r["mode"]) for r in payloads["faithfulness"]["rows"]]
    assert rows == [(0, "cls"), (1, "cls"), (2, "cls"), (0, "patches"), (1, "patches")]
