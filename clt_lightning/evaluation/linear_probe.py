"""Linear-probe heads for teachers without a text tower (DINOv2, DeiT, timm ViTs).

Replacement accuracy needs a classifier on the teacher's final features. CLIP and SigLIP
have zero-shot heads (`zeroshot.py`); a vision-only teacher gets a linear probe: a
multinomial logistic regression (scikit-learn's `LogisticRegression`) fit on the frozen
teacher's L2-normalised final features (`Teacher.encode_image`) of the train split.

Design decisions:

- The probe is fit without an intercept on unit-norm features, so its logits are
  `normalize(features) @ W` with W [E, C]: exactly the form of a zero-shot head with
  `logit_scale = log(1) = 0`, and every evaluation (cascade, faithfulness, ablations)
  uses it unchanged. For two classes, scikit-learn's single weight vector w is split into
  columns (-w/2, w/2), which gives the same probabilities.
- Probes are cached on disk as safetensors, keyed by a sha256 of (teacher identity, train
  dataset identity, class names, settings), like the zero-shot classifiers.
- A class without a train image cannot be scored by a probe: refused in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sklearn.linear_model import LogisticRegression
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.zeroshot import teacher_fingerprint
from clt_lightning.files import atomic_write_bytes
from clt_lightning.hashing import json_sha256

logger = logging.getLogger(__name__)


@torch.no_grad()
def probe_features(
    teacher: Any, dataset: Dataset, batch_size: int = 64, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's unit-norm final features and labels of a dataset.

    Args:
        teacher: Has `encode_image(images [N, 3, H, W]) -> [N, E]`.
        dataset: Yields (image [3, H, W], label).
        batch_size: Images per forward.
        num_workers: DataLoader workers.

    Returns:
        (features [N, E] float64, labels [N] int64).
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    features, labels = [], []
    for images, batch_labels, *_ in tqdm(loader, desc="linear probe features", leave=False):
        emb = F.normalize(teacher.encode_image(images).float(), dim=-1)
        features.append(emb.cpu().double().numpy())
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not features:
        raise ConfigError("the train split is empty (0 images): cannot fit a linear probe")
    return np.concatenate(features), np.concatenate(labels)


def fit_probe(
    features: np.ndarray, labels: np.ndarray, n_classes: int, c: float = 1.0, max_iter: int = 1000
) -> Tensor:
    """Fit a multinomial logistic regression without intercept and return it as a head.

    Args:
        features: [N, E] unit-norm features.
        labels: [N] int64 class indices in 0..n_classes-1.
        n_classes: C, the number of class names.
        c: Inverse L2 regularisation strength (scikit-learn's `C`).
        max_iter: lbfgs iterations.

    Returns:
        [E, C] float32 W; logits = features @ W (scikit-learn's decision function).

    Raises:
        ConfigError: Some class has no train image, or a label is outside 0..C-1.
    """
    present = np.unique(labels)
    if present.min() < 0 or present.max() >= n_classes:
        raise ConfigError(
            f"labels must lie in 0..{n_classes - 1}, got {present.min()}..{present.max()}"
        )
    missing = sorted(set(range(n_classes)) - set(present.tolist()))
    if missing:
        raise ConfigError(
            f"the train split has no images of classes {missing[:10]}: a linear probe cannot "
            "score them; use a dataset whose train split covers every class"
        )
    probe = LogisticRegression(C=c, fit_intercept=False, max_iter=max_iter)
    probe.fit(features, labels)
    coef = torch.from_numpy(probe.coef_).float()  # [C, E], or [1, E] for two classes
    if n_classes == 2:
        coef = torch.cat([-coef / 2, coef / 2])
    return coef.T.contiguous()


def probe_key(teacher: Any, dataset: Any, class_names: list[str], settings: dict) -> str:
    """sha256 hex of (teacher identity, train dataset identity, class names, settings)."""
    identity = getattr(dataset, "identity", None)
    payload = {
        "kind": "linear_probe",
        "teacher": teacher_fingerprint(teacher),
        "dataset": identity() if callable(identity) else repr(dataset),
        "class_names": list(class_names),
        "settings": settings,
    }
    return json_sha256(payload)


def build_probe(
    teacher: Any,
    train_dataset: Dataset,
    class_names: list[str],
    cache_dir: str | Path | None = None,
    *,
    c: float = 1.0,
    max_iter: int = 1000,
    batch_size: int = 64,
    num_workers: int = 0,
) -> Tensor:
    """The linear-probe head of a teacher, from the cache or fit on the train split.

    Args:
        teacher: The frozen `Teacher`.
        train_dataset: Train split, transformed with `teacher.preprocess`.
        class_names: C class names, indexed by label.
        cache_dir: Folder caching probes (safetensors); None disables caching.
        c: Inverse regularisation strength.
        max_iter: lbfgs iterations.
        batch_size: Images per teacher forward.
        num_workers: DataLoader workers.

    Returns:
        [E, C] float32 head, used with logit scale 0 (`zero_shot_logits(emb, W, 0.0)`).
    """
    key = probe_key(teacher, train_dataset, class_names, {"c": c, "max_iter": max_iter})
    path = None if cache_dir is None else Path(cache_dir) / f"probe-{key[:32]}.safetensors"
    if path is not None and path.is_file():
        try:
            return load_safetensors(path.read_bytes())["classifier"]
        except Exception as err:  # noqa: BLE001 - a broken cache file is refit, not fatal
            logger.warning("ignoring unreadable probe cache %s (%s); refitting", path, err)
    features, labels = probe_features(teacher, train_dataset, batch_size, num_workers)
    logger.info("fitting a linear probe on %d train images", len(labels))
    head = fit_probe(features, labels, len(class_names), c, max_iter)
    if path is not None:
        atomic_write_bytes(path, save_safetensors({"classifier": head}, metadata={"key": key}))
        logger.info("linear probe cached at %s", path)
    return head
