"""CLTModule: training on a planted problem, logged metric names, resume, bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from clt_lightning.errors import CheckpointMismatchError, NonFiniteLossError
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.module import CLTModule, lr_factor

N_LAYERS, D_MODEL, N_TOKENS_PER_IMAGE = 3, 8, 5


def planted_batches(n_batches: int, batch: int, seed: int, scale: float = 3.0) -> list[dict]:
    """Token batches whose y comes from a random ground-truth sparse CLT of x."""
    torch.manual_seed(1234)  # the same ground truth for every split
    truth = CrossLayerTranscoder(N_LAYERS, D_MODEL, 32, SparsifierConfig(name="relu_topk", k=4))
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        x = torch.randn(batch, N_LAYERS, D_MODEL, generator=g) * scale
        with torch.no_grad():
            y = truth(x).y_hat
        image = torch.arange(batch) // N_TOKENS_PER_IMAGE + i * batch
        token = torch.arange(batch) % N_TOKENS_PER_IMAGE
        batches.append({"x": x, "y": y, "token": token, "image": image})
    return batches


class PlantedData(L.LightningDataModule):
    """Minimal stand-in for ActivationDataModule (the module only needs these members)."""

    n_layers, d_model = N_LAYERS, D_MODEL

    def __init__(self, n_train: int = 40, poison_step: int | None = None) -> None:
        super().__init__()
        self.train = planted_batches(n_train, 128, seed=0)
        self.val = planted_batches(4, 128, seed=1)
        if poison_step is not None:
            self.train[poison_step]["y"][:, 1] = float("nan")

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([b["x"] for b in self.val])
        y = torch.cat([b["y"] for b in self.val])
        ms = lambda a: a.pow(2).sum(-1).mean(0)  # noqa: E731
        return (D_MODEL / ms(x)).sqrt(), (D_MODEL / ms(y)).sqrt()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=None)


def make_trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=root,
        logger=CSVLogger(root, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def read_metrics(root: Path) -> list[dict]:
    with open(root / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict], key: str) -> float:
    return [float(r[key]) for r in rows if r.get(key)][-1]


def test_fit_on_planted_problem_reaches_r2_and_logs_per_layer_metrics(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = CLTModule(
        n_latents=64, sparsifier=SparsifierConfig(name="relu_topk", k=8), lr=1e-2, warmup_steps=10
    )
    make_trainer(tmp_path, max_epochs=8).fit(model, PlantedData())
    rows = read_metrics(tmp_path)
    for layer in range(N_LAYERS):
        assert last_value(rows, f"val/r2/layer_{layer:02d}") > 0.9
    header = set(rows[0].keys())
    expected = {
        "train/loss",
        "val/mse/layer_02",
        "val/r2/cls/layer_00",
        "val/r2/patches/mean",
        "val/cosine/mean",
        "val/l0/layer_01",
        "train/dead_fraction/mean",
    }
    assert expected <= header
    # the logged L0 is what relu_topk allows: at most k per token
    assert last_value(rows, "val/l0/mean") <= 8 + 1e-6


def test_resume_continues_global_step(tmp_path: Path) -> None:
    data = PlantedData(n_train=6)
    model = CLTModule(n_latents=32, sparsifier=SparsifierConfig(name="abs_topk", k=4))
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, data)
    ckpt = tmp_path / "checkpoints" / "resume.ckpt"
    trainer.save_checkpoint(ckpt)
    assert trainer.global_step == 6

    resumed = CLTModule(n_latents=32, sparsifier=SparsifierConfig(name="abs_topk", k=4))
    trainer2 = make_trainer(tmp_path, max_epochs=2)
    trainer2.fit(resumed, PlantedData(n_train=6), ckpt_path=ckpt)
    assert trainer2.global_step == 12
    # the restored weights are the checkpoint's, then trained further
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(state["clt.W_enc"], resumed.clt.W_enc.detach())


def test_load_from_checkpoint_rebuilds_without_data(tmp_path: Path) -> None:
    data = PlantedData(n_train=2)
    model = CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="jumprelu"))
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, data)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = CLTModule.load_from_checkpoint(ckpt, weights_only=True)
    x = data.val[0]["x"]
    torch.testing.assert_close(loaded.clt(x).y_hat, model.clt(x).y_hat)
    assert loaded.clt.sparsifier.name == "jumprelu"


def test_checkpoint_of_another_width_is_refused(tmp_path: Path) -> None:
    small = SparsifierConfig(name="relu_topk", k=4)
    model = CLTModule(n_latents=16, sparsifier=small, n_layers=N_LAYERS, d_model=D_MODEL)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, PlantedData(n_train=1))
    ckpt = tmp_path / "w.ckpt"
    trainer.save_checkpoint(ckpt)
    other = CLTModule(n_latents=32, sparsifier=small, n_layers=N_LAYERS, d_model=D_MODEL)
    with pytest.raises(CheckpointMismatchError, match="n_latents=16"):
        other.on_load_checkpoint(torch.load(ckpt, weights_only=True))


def test_non_finite_loss_names_step_and_layer(tmp_path: Path) -> None:
    model = CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="relu_topk", k=4))
    trainer = make_trainer(tmp_path, max_epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"step 3: layers \[1\]"):
        trainer.fit(model, PlantedData(n_train=5, poison_step=3))


@pytest.mark.parametrize(
    ("step", "schedule", "expected"),
    [
        (0, "constant", 0.1),
        (9, "constant", 1.0),
        (50, "constant", 1.0),
        (10, "cosine", 1.0),
        (110, "cosine", 0.1),
        (60, "cosine", 0.1 + 0.9 * 0.5),
    ],
)
def test_lr_factor_warmup_then_schedule(step: int, schedule: str, expected: float) -> None:
    assert math.isclose(lr_factor(step, 10, 110, schedule, 0.1), expected, rel_tol=1e-9)
