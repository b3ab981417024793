"""Shared fixtures. Nothing here downloads: models are tiny open_clip configs, images are made."""

from __future__ import annotations

import os
from pathlib import Path

# Must be set before open_clip / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Tiny models: one thread is faster than two (no oversubscription when tests share cores).
torch.set_num_threads(1)


@pytest.fixture
def tiny_model_config() -> Path:
    """Path to a tiny open_clip model-config JSON (3 layers, width 32, 32x32 images, 17 tokens)."""
    return FIXTURES / "tiny-vit.json"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 (legacy global RNG some libraries still read)


@pytest.fixture
def tiny_teacher_config(tiny_model_config: Path):
    """`TeacherConfig` of the tiny open_clip model (random weights, seeded: same everywhere)."""
    from clt_lightning.teacher import TeacherConfig

    return TeacherConfig(model_config=str(tiny_model_config))


@pytest.fixture
def tiny_teacher(tiny_teacher_config):
    """A frozen `Teacher` on the tiny model: 3 layers, d=32, 17 tokens, 32x32 images (~0.3 s)."""
    from clt_lightning.teacher import Teacher

    return Teacher(tiny_teacher_config)
