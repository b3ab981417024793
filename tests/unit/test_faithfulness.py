"""Table 5 metrics against independent computations (scipy, numpy, plain Python)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr, softmax
from scipy.stats import pearsonr, spearmanr

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation import faithfulness as fm
from clt_lightning.evaluation.cascade import CascadeResult
from clt_lightning.evaluation.undefined import Undefined
from clt_lightning.evaluation.zeroshot import zero_shot_logits


@pytest.fixture
def logits_pair() -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.randn(40, 12) * 3
    surrogate = teacher + torch.randn(40, 12) * 1.5
    return teacher, surrogate


def naive_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with explicit centring matrices: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def test_prediction_metrics_against_naive(logits_pair):
    teacher, surrogate = logits_pair
    labels = torch.randint(0, 12, (40,))
    t, s, y = teacher.numpy(), surrogate.numpy(), labels.numpy()
    expected_delta = np.mean(s.argmax(1) == y) - np.mean(t.argmax(1) == y)
    assert fm.delta_accuracy(teacher, surrogate, labels) == pytest.approx(expected_delta)
    expected_flip = np.mean(t.argmax(1) != s.argmax(1))
    assert 0 < expected_flip < 1
    assert fm.flip_rate(teacher, surrogate) == pytest.approx(expected_flip)
    p, q = softmax(t.astype(np.float64), axis=1), softmax(s.astype(np.float64), axis=1)
    expected_kl = rel_entr(p, q).sum(axis=1).mean()
    assert fm.kl_divergence(teacher, surrogate) == pytest.approx(expected_kl, rel=1e-6)
    shared = [len(set(np.argsort(-t[i])[:5]) & set(np.argsort(-s[i])[:5])) / 5 for i in range(40)]
    assert fm.topk_agreement(teacher, surrogate, 5) == pytest.approx(np.mean(shared))
    rhos = [spearmanr(t[i], s[i]).statistic for i in range(40)]
    assert fm.spearman_logits(teacher, surrogate) == pytest.approx(np.mean(rhos), rel=1e-9)


def test_spearman_logits_handles_ties_like_scipy():
    teacher = torch.tensor([[1.0, 1.0, 2.0, 3.0, 0.0], [0.0, 1.0, 1.0, 1.0, 2.0]])
    surrogate = torch.tensor([[2.0, 1.0, 1.0, 3.0, 0.0], [3.0, 1.0, 2.0, 2.0, 0.0]])
    rhos = [spearmanr(teacher[i], surrogate[i]).statistic for i in range(2)]
    assert fm.spearman_logits(teacher, surrogate) == pytest.approx(np.mean(rhos))


def test_embedding_metrics_against_naive():
    teacher = torch.randn(30, 8)
    surrogate = teacher @ torch.randn(8, 8) * 0.3 + teacher + 0.1 * torch.randn(30, 8)
    t, s = teacher.double().numpy(), surrogate.double().numpy()
    cos = (t * s).sum(1) / np.linalg.norm(t, axis=1) / np.linalg.norm(s, axis=1)
    assert fm.embedding_cosine(teacher, surrogate) == pytest.approx(cos.mean(), rel=1e-6)
    assert fm.linear_cka(teacher, surrogate) == pytest.approx(naive_cka(t, s), rel=1e-6)
    # different widths are fine for CKA
    wide = torch.randn(30, 20)
    assert fm.linear_cka(teacher, wide) == pytest.approx(naive_cka(t, wide.double().numpy()))
    tu = t / np.linalg.norm(t, axis=1, keepdims=True)
    su = s / np.linalg.norm(s, axis=1, keepdims=True)
    iu = np.triu_indices(30, k=1)
    expected = spearmanr((tu @ tu.T)[iu], (su @ su.T)[iu]).statistic
    assert fm.spearman_geometry(teacher, surrogate) == pytest.approx(expected, rel=1e-9)
    sampled = fm.spearman_geometry(teacher, surrogate, max_pairs=300)
    assert sampled == pytest.approx(expected, abs=0.1)  # 300 of 435 pairs


def test_cka_is_invariant_to_rotation_and_scale():
    x = torch.randn(25, 6, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert fm.linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)


def test_prompt_sensitivity_against_scipy():
    n_templates, n_images, dim, n_classes = 5, 30, 8, 4
    classifiers = torch.nn.functional.normalize(torch.randn(n_templates, dim, n_classes), dim=1)
    teacher = torch.randn(n_images, dim)
    surrogate = teacher + 0.7 * torch.randn(n_images, dim)
    labels = torch.randint(0, n_classes, (n_images,))
    r, kl = fm.prompt_sensitivity(teacher, surrogate, labels, classifiers, 1.0)
    acc_t, acc_s, kls = [], [], []
    for j in range(n_templates):
        lt = (zero_shot_logits(teacher, classifiers[j], 1.0)).double().numpy()
        ls = (zero_shot_logits(surrogate, classifiers[j], 1.0)).double().numpy()
        acc_t.append(np.mean(lt.argmax(1) == labels.numpy()))
        acc_s.append(np.mean(ls.argmax(1) == labels.numpy()))
        kls.append(rel_entr(softmax(lt, axis=1), softmax(ls, axis=1)).sum(1).mean())
    assert r == pytest.approx(pearsonr(acc_t, acc_s).statistic, rel=1e-9)
    assert kl == pytest.approx(np.mean(kls), rel=1e-6)


def test_identical_runs_are_perfectly_faithful():
    emb = torch.randn(20, 8)
    classifier = torch.nn.functional.normalize(torch.randn(8, 6), dim=0)
    per_template = torch.nn.functional.normalize(torch.randn(4, 8, 6), dim=1)
    labels = torch.randint(0, 6, (20,))
    report = fm.faithfulness(emb, emb.clone(), labels, classifier, 2.0, per_template)
    assert report.delta_accuracy == 0 and report.flip_rate == 0
    assert report.kl == pytest.approx(0.0, abs=1e-12)
    assert report.prompt_kl == pytest.approx(0.0, abs=1e-12)
    assert report.top1_agreement == 1 and report.top5_agreement == 1
    assert report.cosine == pytest.approx(1.0) and report.cka == pytest.approx(1.0)
    assert report.spearman == pytest.approx(1.0) and report.spearman_logits == pytest.approx(1.0)
    assert report.prompt_r == pytest.approx(1.0)
    row = report.row("0-11 CLS")
    assert row["Layers"] == "0-11 CLS" and row["Flip %"] == 0 and row["Top-1"] == 100


def test_report_matches_functions_and_units():
    teacher = torch.randn(16, 8)
    surrogate = teacher + 0.5 * torch.randn(16, 8)
    classifier = torch.nn.functional.normalize(torch.randn(8, 7), dim=0)
    labels = torch.randint(0, 7, (16,))
    report = fm.faithfulness(teacher, surrogate, labels, classifier, 3.0)
    lt = zero_shot_logits(teacher, classifier, 3.0)
    ls = zero_shot_logits(surrogate, classifier, 3.0)
    assert report.kl == pytest.approx(fm.kl_divergence(lt, ls))
    assert report.row("x")["ΔAcc"] == pytest.approx(100 * fm.delta_accuracy(lt, ls, labels))
    assert isinstance(report.prompt_r, Undefined) and isinstance(report.prompt_kl, Undefined)


def test_pearson_of_constant_is_undefined():
    assert isinstance(fm.pearson([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]), Undefined)
    assert isinstance(fm.pearson([0.2], [0.1]), Undefined)
    # equal values whose float std is not exactly 0 are still constant
    values = [355 / 360] * 6
    assert isinstance(fm.pearson(values, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), Undefined)


def _equal_template_accuracies(n: int = 360, wrong: int = 5, n_templates: int = 6):
    """The issue's input: teacher and surrogate right on 355/360 images with each of 6
    templates (every template classifies the same way)."""
    n_classes = 10
    labels = torch.arange(n) % n_classes
    predicted = labels.clone()
    predicted[:wrong] = (labels[:wrong] + 1) % n_classes
    teacher = torch.nn.functional.one_hot(predicted, n_classes).double() + 0.01
    surrogate = teacher * 1.5  # same directions: the same predictions
    per_template = torch.eye(n_classes, dtype=torch.float64).expand(n_templates, -1, -1)
    return teacher, surrogate, labels, per_template


def test_prompt_r_of_equal_per_template_accuracies_is_undefined_not_zero(tmp_path):
    """Issue 11.6: r was -5.8e-14 (printed 0.000) and JSON held a bare NaN. Now r is
    Undefined with a reason naming the exact counts: null in JSON, "–" in tables."""
    import json

    from clt_lightning.evaluation.tables import rows_to_csv, rows_to_markdown
    from clt_lightning.evaluation.undefined import write_json

    teacher, surrogate, labels, per_template = _equal_template_accuracies()
    r, kl = fm.prompt_sensitivity(teacher, surrogate, labels, per_template, 1.0)
    assert isinstance(r, Undefined)
    assert "355/360 on each of 6 templates" in r.reason
    assert kl == pytest.approx(fm.kl_divergence(
        zero_shot_logits(teacher, per_template[0], 1.0),
        zero_shot_logits(surrogate, per_template[0], 1.0)))  # fmt: skip
    report = fm.faithfulness(teacher, surrogate, labels, per_template[0], 1.0, per_template)
    path = write_json(tmp_path / "faithfulness.json", {"rows": [report.to_dict()]})
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["rows"][0]["prompt_r"] is None
    assert "355/360" in data["undefined"]["rows[0].prompt_r"]
    row = report.row("0-11 CLS")
    assert "| – |" in rows_to_markdown([row], digits=3)
    assert rows_to_csv([row]).splitlines()[1].split(",")[9] == ""  # the r column


def test_json_writer_refuses_nan(tmp_path):
    from clt_lightning.evaluation.undefined import write_json

    with pytest.raises(ValueError, match=r"rows\[1\].cka is nan"):
        write_json(tmp_path / "x.json", {"rows": [{"cka": 0.5}, {"cka": float("nan")}]})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("metric", "args", "needle"),
    [
        (fm.linear_cka, (torch.ones(5, 3), torch.randn(5, 3)), "same for all 5 images"),
        (fm.linear_cka, (torch.randn(1, 3), torch.randn(1, 3)), "same for all 1 images"),
        (fm.spearman_geometry, (torch.randn(2, 3), torch.randn(2, 3)), "at least 3 images"),
        (fm.spearman_geometry, (torch.ones(4, 3), torch.randn(4, 3)), "pairwise teacher"),
        (fm.spearman_logits, (torch.ones(4, 3), torch.randn(4, 3)), "constant logits"),
        (fm.embedding_cosine, (torch.zeros(2, 3), torch.randn(2, 3)), "exactly zero"),
    ],
)
def test_undefined_cases_of_every_metric(metric, args, needle):
    value = metric(*args)
    assert isinstance(value, Undefined) and needle in value.reason


def test_bad_inputs():
    with pytest.raises(ConfigError, match="shape"):
        fm.flip_rate(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ConfigError, match="no images"):
        fm.kl_divergence(torch.zeros(0, 4), torch.zeros(0, 4))


def test_from_cascade_labels_and_missing_windows():
    emb = torch.randn(12, 8)
    result = CascadeResult(
        n_layers=12,
        starts=[0, 11],
        modes=["cls"],
        n_images=12,
        baseline={"top1": 0.0, "top5": 0.0},
        accuracy={"cls": {"top1": [0.0, 0.0], "top5": [0.0, 0.0]}},
        embeddings={(0, "cls"): emb + 0.1, (11, "cls"): emb},
        baseline_embeddings=emb,
        labels=torch.zeros(12, dtype=torch.long),
    )
    classifier = torch.nn.functional.normalize(torch.randn(8, 5), dim=0)
    reports = fm.faithfulness_from_cascade(result, classifier, 1.0)
    assert list(reports) == ["0-11 CLS", "11 CLS"]
    assert reports["11 CLS"].flip_rate == 0
    rows = fm.faithfulness_table(reports)
    assert [r["Layers"] for r in rows] == ["0-11 CLS", "11 CLS"]
    assert fm.faithfulness_label(7, 12, "patches") == "7-11 Patches"
    with pytest.raises(ConfigError, match="keep"):
        fm.faithfulness_from_cascade(result, classifier, 1.0, windows=[(3, "all")])
