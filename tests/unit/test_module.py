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

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


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


# ------------------------------------------------------------------ precision (issue 11.3)
# Every value `Trainer(precision=...)` accepts (Lightning 2.x), legacy spellings included.
PRECISIONS = ["32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "bf16-true",
              "16-true", "64-true", "64", 64, "transformer-engine",
              "transformer-engine-float16"]  # fmt: skip


def _jumprelu_fit(tmp_path: Path, precision: str | int) -> tuple[CLTModule, torch.Tensor]:
    """5 steps of a JumpReLU CLT with thresholds at 1.0 (the issue's input, scaled down)."""
    torch.manual_seed(0)
    config = SparsifierConfig(name="jumprelu", threshold_init=1.0)
    model = CLTModule(n_latents=16, sparsifier=config, lr=2e-4, warmup_steps=0)
    trainer = make_trainer(
        tmp_path / str(precision), max_steps=5, precision=precision, logger=False
    )
    data = PlantedData(n_train=5)
    trainer.fit(model, data)
    return model, model.clt.sparsifier.threshold.detach().float()


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_every_precision_trains_or_is_refused_in_one_line(tmp_path: Path, precision) -> None:
    """Parameters move as under 32-true (float32 or wider master weights), or the setting
    is refused with one line naming bf16-mixed (bf16-true left all thresholds at 1.0)."""
    from clt_lightning.errors import ConfigError
    from clt_lightning.module import check_training_precision

    torch.set_num_threads(1)
    try:
        check_training_precision(precision)
    except ConfigError as error:
        assert "bf16-mixed" in str(error) and "\n" not in str(error)
        assert str(precision) in ("bf16-true", "16-true") or "transformer-engine" in str(precision)
        if "transformer-engine" not in str(precision):  # Lightning needs the package first
            with pytest.raises(ConfigError, match="bf16-mixed"):
                _jumprelu_fit(tmp_path, precision)
        return
    _, reference = _jumprelu_fit(tmp_path, "32-true")
    model, threshold = _jumprelu_fit(tmp_path, precision)
    assert model.clt.W_enc.dtype in (torch.float32, torch.float64)
    moved, moved_32 = (threshold - 1).abs(), (reference - 1).abs()
    assert bool((moved > 0).all())  # every threshold moved
    assert moved.mean().item() == pytest.approx(moved_32.mean().item(), rel=0.05)


def test_validate_and_test_with_the_trainers_defaults(tmp_path: Path) -> None:
    """Trainer.validate / test without max_epochs (Lightning's defaults) once asserted in
    progress(): outside fit the losses use the full sparsity coefficient."""
    model = CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="jumprelu"))
    make_trainer(tmp_path, max_epochs=1).fit(model, PlantedData(n_train=2))
    for run in ("validate", "test"):
        trainer = L.Trainer(default_root_dir=tmp_path / run, logger=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        results = getattr(trainer, run)(model, PlantedData(n_train=2))
        assert math.isfinite(results[0][f"{'val' if run == 'validate' else 'test'}/loss"])
        assert model.progress() == 1.0
