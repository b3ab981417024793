"""Linear-probe heads for vision-only teachers, against scikit-learn's own predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation import linear_probe
from clt_lightning.evaluation.linear_probe import build_probe, fit_probe
from clt_lightning.evaluation.zeroshot import zero_shot_logits


def unit_digits(n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(n_class=n_classes, return_X_y=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


@pytest.mark.parametrize("n_classes", [10, 2])
def test_probe_logits_equal_sklearn(n_classes: int) -> None:
    x, y = unit_digits(n_classes)
    head = fit_probe(x, y, n_classes)
    reference = LogisticRegression(fit_intercept=False, max_iter=1000).fit(x, y)
    logits = zero_shot_logits(torch.from_numpy(x), head, 0.0)  # normalise, @ W, scale e^0
    np.testing.assert_allclose(
        torch.softmax(logits, -1).numpy(), reference.predict_proba(x), atol=1e-5
    )
    assert (logits.argmax(-1).numpy() == reference.predict(x)).all()


def test_a_class_without_train_images_is_refused() -> None:
    x, y = unit_digits()
    keep = y != 4
    with pytest.raises(ConfigError, match=r"classes \[4\]"):
        fit_probe(x[keep], y[keep], 10)


class Features:
    """A teacher whose features are the digits' pixels; counts its forwards."""

    def __init__(self) -> None:
        self.calls = 0

    def identity(self) -> dict:
        return {"model_name": "pixels"}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images


class Digits(torch.utils.data.Dataset):
    def __init__(self, n: int = 200) -> None:
        x, y = load_digits(return_X_y=True)
        self.x, self.y, self.n = torch.from_numpy(x[:n]).float(), y[:n], n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])

    def identity(self) -> dict:
        return {"name": "digits", "n": self.n}


def test_build_probe_is_cached_by_teacher_and_dataset(tmp_path: Path) -> None:
    teacher = Features()
    names = [str(i) for i in range(10)]
    first = build_probe(teacher, Digits(), names, tmp_path, batch_size=64)
    calls = teacher.calls
    again = build_probe(teacher, Digits(), names, tmp_path, batch_size=64)
    assert teacher.calls == calls  # read from the cache, no forward
    assert torch.equal(first, again)
    assert len(list(tmp_path.glob("probe-*.safetensors"))) == 1
    build_probe(teacher, Digits(300), names, tmp_path, batch_size=64)
    assert len(list(tmp_path.glob("probe-*.safetensors"))) == 2
    x, y = linear_probe.probe_features(teacher, Digits(), batch_size=64)
    accuracy = (x @ first.double().numpy()).argmax(1) == y
    assert accuracy.mean() > 0.9  # a linear probe separates digits' pixels
