"""The quickstart end to end: a reduced size in the default suite, the full size under `slow`.

Asserts what would fail if the method were broken: the digits teacher is well above chance,
replacing the last layer's MLP for [CLS] with a trained CLT stays near the baseline,
contribution columns sum to 1, and every figure the report embeds exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from experiments import quickstart

REPO = Path(__file__).resolve().parents[2]


def _check_outputs(
    runs: Path,
    report: Path,
    sparsifiers: list[str],
    min_teacher: float,
    teacher_dir: Path,
    max_drop: float,
) -> None:
    record = json.loads((teacher_dir / "teacher.json").read_text())
    assert record["val_zero_shot_accuracy"] >= min_teacher  # chance is 0.10
    for sparsifier in sparsifiers:
        evaluation = runs / sparsifier / "evaluation"
        cascade = json.loads((evaluation / "cascade.json").read_text())
        cls = cascade["modes"]["cls"]
        last = cls["top1"][cls["starts"].index(cascade["n_layers"] - 1)]
        assert last >= cascade["baseline"]["top1"] - max_drop, (
            sparsifier,
            last,
            cascade["baseline"],
        )
        # written by `clt fit`'s evaluation callback: after every epoch and at fit end
        assert (evaluation / "epoch_00" / "run.json").is_file()
        scores = json.loads((evaluation / "contributions.json").read_text())
        for group in ("cls", "patches"):
            np.testing.assert_allclose(
                np.nansum(np.array(scores[group], float), axis=0), 1.0, atol=1e-6
            )
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    # curves, training curves, cascade + heatmap per run, grids
    assert len(images) >= 2 + 2 * len(sparsifiers) + 1
    assert "training_curves.png" in text
    for image in images:
        assert (report.parent / image).is_file(), image
    sites = re.findall(r"\]\(([^)]*index\.html)\)", text)  # the latent site's link
    assert sites and (report.parent / sites[0]).resolve().is_file(), sites
    for heading in (
        "Latent dashboards",
        "Cascaded replacement",
        "Faithfulness",
        "Contribution scores",
        "Necessity and sufficiency",
        "Layer-wise retrieval",
        "Reconstruction",
        "During training",
    ):
        assert heading in text


def test_quickstart_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs/ are read from the repository
    teacher_dir, runs, out = tmp_path / "teacher", tmp_path / "runs", tmp_path / "report"
    sparsifiers = ["relu_topk", "jumprelu"]
    code = quickstart.main(
        [
            "--teacher-dir",
            str(teacher_dir),
            "--teacher-epochs",
            "12",
            "--min-teacher-accuracy",
            "0.5",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--runs",
            str(runs),
            "--out",
            str(out),
            "--sparsifiers",
            ",".join(sparsifiers),
            "--max-epochs",
            "2",
            "--n-images",
            "120",
        ]
    )
    assert code == 0
    _check_outputs(runs, out / "report.md", sparsifiers, 0.5, teacher_dir, max_drop=5.0)


@pytest.mark.slow
def test_quickstart_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    teacher_dir, runs, out = tmp_path / "teacher", tmp_path / "runs", tmp_path / "report"
    code = quickstart.main(
        [
            "--teacher-dir",
            str(teacher_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--runs",
            str(runs),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    _check_outputs(
        runs, out / "report.md", list(quickstart.SPARSIFIERS), 0.9, teacher_dir, max_drop=2.0
    )
