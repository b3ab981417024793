"""CLTModule: the LightningModule that trains a CrossLayerTranscoder.

Design decisions:
- The CLT's shape (n_layers, d_model) and its per-layer normalisation come from the data
  (the activation cache's manifest and statistics), so the CLT is built in `setup()` from
  the datamodule, not in `__init__`. The shape is saved in every checkpoint and the CLT is
  rebuilt from it in `on_load_checkpoint`, so `CLTModule.load_from_checkpoint` works
  without data.
- Loss (per batch) = sum over layers l of the normalised MSE
  `mean_t ||y_hat_scaled_t,l - y_scaled_t,l||^2 / d`, where `y_scaled = y * output_scale[l]`
  and `output_scale[l] = sqrt(d / E||y_l||^2)`: every layer has mean squared norm d in the
  scaled space, so each layer's term is its squared error relative to the layer's mean
  squared norm (1.0 = predicting zero) and layers with large activations do not dominate.
  The sparsifier adds its own terms (JumpReLU sparsity / pre-activation, TopK AuxK).
  All tokens ([CLS] and patches) are in the loss, as in the paper. The MSE term is logged
  as `train/mse_scaled_sum` (scaled space, summed over layers), not to be read as the
  validation metric `val/mse/layer_XX` (original space, per element, per layer).
- Metrics are computed in the original activation space (see `metrics.py`), for all tokens
  and separately for [CLS] and patch tokens.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clt_lightning.checkpoint_contents import (
    check_progress_counters,
    check_state,
    check_training_state,
)
from clt_lightning.errors import CheckpointMismatchError, ConfigError, NonFiniteLossError
from clt_lightning.metrics import ReconstructionMetrics, flatten_layer_metrics
from clt_lightning.models.clt import CrossLayerTranscoder
from clt_lightning.models.sparsifiers import SparsifierConfig, sparsifier_class
from clt_lightning.tokens import CLIP_LAYOUT, TOKEN_GROUPS, TokenLayout

log = logging.getLogger(__name__)


class CLTModule(L.LightningModule):
    """Train a Cross-Layer Transcoder on token batches of a frozen ViT.

    Args:
        expansion: Latents per layer as a multiple of d_model (the paper uses 16).
        n_latents: Latents per layer; overrides `expansion` when set.
        sparsifier: Sparsifier name and settings (jumprelu, relu_topk, abs_topk, batch_topk).
        decode: Decoder path: "dense", "sparse" (TopK codes as indices and values) or "auto".
        lr: Peak AdamW learning rate (paper: 2e-4).
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps from 0 to `lr`.
        schedule: After warm-up, "constant" or "cosine" decay to `min_lr_ratio * lr`.
        min_lr_ratio: Final learning rate of the cosine schedule, relative to `lr`.
        n_layers: Set from the data at setup; given only to build without a datamodule.
        d_model: Set from the data at setup; given only to build without a datamodule.
        compile: Compile the CLT with `torch.compile` (`nn.Module.compile`, so checkpoint
            keys do not change). Same losses and gradients as eager within 1e-5 (fp32,
            tested). The first step compiles: ~70 s for the sparse path of a tiny CLT on
            the project's 2-core CPU and over 10 minutes at the paper shape, and no CPU
            speed-up was measured; meant for long GPU runs.
    """

    def __init__(
        self,
        expansion: int = 16,
        n_latents: int | None = None,
        sparsifier: SparsifierConfig = SparsifierConfig(),
        decode: Literal["dense", "sparse", "auto"] = "auto",
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        n_layers: int | None = None,
        d_model: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if expansion < 1 and n_latents is None:
            raise ConfigError(f"model.expansion must be >= 1, got {expansion}")
        check_optimisation_settings(
            n_latents=n_latents,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        if isinstance(sparsifier, dict):  # from a checkpoint's saved hyperparameters
            sparsifier = SparsifierConfig(**sparsifier)
        sparsifier_class(sparsifier.name)  # an unknown name fails here, before any data
        self.sparsifier_config = sparsifier
        self.save_hyperparameters(ignore=["sparsifier"])
        self.hparams["sparsifier"] = asdict(self.sparsifier_config)
        self.clt: CrossLayerTranscoder | None = None
        self.token_layout = CLIP_LAYOUT  # the datamodule's teacher layout, set in setup
        if n_layers is not None and d_model is not None:
            self.build(n_layers, d_model)

    # ------------------------------------------------------------------ construction
    def build(self, n_layers: int, d_model: int) -> CrossLayerTranscoder:
        """Create the CLT for a given teacher shape (idempotent for the same shape)."""
        if self.clt is not None:
            if (self.clt.n_layers, self.clt.d_model) != (n_layers, d_model):
                raise CheckpointMismatchError(
                    f"the CLT has n_layers={self.clt.n_layers}, d_model={self.clt.d_model} "
                    f"but the data has n_layers={n_layers}, d_model={d_model}"
                )
            return self.clt
        n_latents = self.hparams.n_latents or self.hparams.expansion * d_model
        self.clt = CrossLayerTranscoder(
            n_layers, d_model, n_latents, self.sparsifier_config, decode=self.hparams.decode
        )
        if self.hparams.get("compile", False):
            self.clt.compile()
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_{group}": ReconstructionMetrics(n_layers, d_model)
                for stage in ("train", "val", "test")
                for group in TOKEN_GROUPS
            }
        )
        return self.clt

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer else None
        if datamodule is None:
            if self.clt is None:
                raise ConfigError("CLTModule needs a datamodule (or n_layers and d_model)")
            return
        if stage == "fit":
            check_training_precision(self.trainer.precision)
        fresh = self.clt is None
        identity = getattr(datamodule, "teacher_identity", None)
        if isinstance(identity, dict):
            self.token_layout = TokenLayout.from_identity(identity)
        self.build(datamodule.n_layers, datamodule.d_model)
        if fresh:
            self.clt.set_normalisation(*datamodule.normalisation())
        if fresh and stage == "fit":
            self._report_size()

    def _report_size(self) -> None:
        n_params = self.clt.param_count()
        estimate = self.clt.memory_estimate()
        rank_zero_info(
            f"CLT: {self.clt.n_layers} layers, d_model {self.clt.d_model}, "
            f"{self.clt.n_latents} latents/layer, {n_params / 1e6:.1f}M parameters; "
            f"~{estimate / 2**30:.2f} GiB for fp32 weights, gradients and AdamW states"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clt_shape"] = {
            "n_layers": self.clt.n_layers,
            "d_model": self.clt.d_model,
            "n_latents": self.clt.n_latents,
        }
        if self.calibrate_threshold():  # the checkpoint carries the weights' own threshold
            state = checkpoint["state_dict"]
            for name, buffer in self.named_buffers():
                if name.endswith("sparsifier.threshold") and name in state:
                    state[name] = buffer.detach().clone()

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:  # validate/test use the checkpoint's
            self.calibrate_threshold()

    @torch.no_grad()
    def calibrate_threshold(self) -> bool:
        """Refit the sparsifier's inference threshold to the current weights (batch_topk).

        Runs `sparsifier.calibration_batches` batches of training tokens (the
        datamodule's train loader at epoch 0, so the same tokens whenever it runs, also
        after a resume) through the encoder; under DDP the per-rank thresholds are
        averaged. Training never reads the threshold, so this changes no weight.

        Returns:
            True if a threshold was set; False for sparsifiers without one, or without a
            datamodule to draw training tokens from (the running EMA then stays).
        """
        sparsifier = self.clt.sparsifier
        if not sparsifier.calibrates:
            return False
        batches = self._calibration_batches()
        if batches is None:
            return False
        pre = (self.clt.pre_activations(b["x"].to(self.device)) for b in batches)
        threshold = sparsifier.calibrated_threshold(pre)
        if threshold is None:
            return False
        if self.trainer.world_size > 1:
            threshold = self.trainer.strategy.reduce(threshold, reduce_op="mean")
        sparsifier.set_threshold(threshold)
        return True

    def _calibration_batches(self) -> Any:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer else None
        if datamodule is None:
            log.warning("no datamodule: the inference threshold stays the training EMA")
            return None
        loader = datamodule.train_dataloader()
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(0)
        return itertools.islice(loader, self.sparsifier_config.calibration_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the CLT from `clt_shape` and check the weights before Lightning loads them
        (`checkpoint_contents`); resuming a fit also needs the training state.

        Raises:
            CheckpointMismatchError: Another teacher's shape, another `n_latents`, missing,
                unexpected, misshapen or non-finite tensors, or (fit) no optimiser state.
        """
        trainer = attached_trainer(self)
        source = (
            f"the checkpoint {trainer.ckpt_path}"
            if trainer and trainer.ckpt_path
            else ("the checkpoint")
        )
        check_progress_counters(checkpoint)
        shape = checkpoint.get("clt_shape")
        if shape is None:
            raise CheckpointMismatchError(
                f"{source} has no 'clt_shape': not a CLTModule checkpoint"
            )
        built = None if self.clt is None else (self.clt.n_layers, self.clt.d_model)
        if built is not None and built != (shape["n_layers"], shape["d_model"]):
            raise CheckpointMismatchError(
                f"the checkpoint holds a CLT for n_layers={shape['n_layers']}, "
                f"d_model={shape['d_model']} but the data has n_layers={built[0]}, "
                f"d_model={built[1]}: use a checkpoint trained on this teacher"
            )
        clt = self.build(shape["n_layers"], shape["d_model"])
        if clt.n_latents != shape["n_latents"]:
            raise CheckpointMismatchError(
                f"checkpoint has n_latents={shape['n_latents']} but the config gives "
                f"{clt.n_latents} (model.expansion / model.n_latents)"
            )
        check_state(self.state_dict(), checkpoint["state_dict"], source)
        if trainer is not None and trainer.state.fn == "fit":
            check_training_state(checkpoint, source)

    # ------------------------------------------------------------------ training
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (drives the JumpReLU sparsity ramp).

        1.0 outside `fit` (validate, test, predict: the losses of the trained model, with
        every term at full weight) and when the total is unknown or infinite. Only `fit`
        asks for `trainer.estimated_stepping_batches`, which needs max_epochs or max_steps
        and the train loader.
        """
        if attached_trainer(self) is None or self.trainer.state.fn != TrainerFn.FITTING:
            return 1.0
        total = self.trainer.estimated_stepping_batches
        if not total or math.isinf(total):
            return 1.0
        return min(1.0, self.global_step / total)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Any]:
        """Loss for one token batch: summed per-layer normalised MSE plus sparsifier terms."""
        output = self.clt(batch["x"])
        y_scaled = batch["y"] * self.clt.output_scale[None, :, None].to(batch["y"].dtype)
        per_layer = (output.y_hat_scaled.float() - y_scaled.float()).pow(2).mean(dim=(0, 2))
        terms = {"mse_scaled_sum": per_layer.sum()}  # not `val/mse`: see docs/metrics.md
        terms.update(self.clt.auxiliary_losses(output, y_scaled, self.progress()))
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            self._raise_non_finite(per_layer, terms)
        return loss, {"per_layer": per_layer, **terms}, output

    def _raise_non_finite(self, per_layer: Tensor, terms: dict[str, Tensor]) -> None:
        bad_layers = [i for i, v in enumerate(per_layer.tolist()) if not math.isfinite(v)]
        bad_terms = [k for k, v in terms.items() if not torch.isfinite(v)]
        raise NonFiniteLossError(
            f"non-finite loss at global step {self.global_step}: layers {bad_layers} "
            f"(terms {bad_terms}); the last good checkpoint is kept. Check the inputs for "
            "NaN/Inf and lower model.lr or set trainer.gradient_clip_val"
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, terms, output = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "per_layer"})
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self._log_dead_fraction()
        return loss

    def _log_dead_fraction(self) -> None:
        dead = self.clt.sparsifier.dead_mask().float().mean(dim=1)
        values = {f"train/dead_fraction/layer_{i:02d}": v for i, v in enumerate(dead.tolist())}
        values["train/dead_fraction/mean"] = dead.mean().item()
        self.log_dict(values)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        loss, _, output = self.compute_loss(batch)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        y_hat, y = output.y_hat.float(), batch["y"].float()
        l0 = (output.encoding.z != 0).sum(dim=-1)
        for group in self.token_layout.groups:
            metric = self.metrics[f"{stage}_{group}"]
            if group == "all":
                metric.update(y_hat, y, l0)
                continue
            mask = self.token_layout.mask(group, batch["token"])
            if mask.any():
                metric.update(y_hat[mask], y[mask], l0[mask])

    def _eval_epoch_end(self, stage: str) -> None:
        flat: dict[str, float] = {}
        for group in TOKEN_GROUPS:
            metric = self.metrics[f"{stage}_{group}"]
            if metric.update_count == 0 and not self.trainer.world_size > 1:
                continue
            values = metric.compute()
            flat.update(flatten_layer_metrics(stage, values, None if group == "all" else group))
            metric.reset()
        if flat:
            self.log_dict(flat, rank_zero_only=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = list(self.clt.parameters())
        optimizer = torch.optim.AdamW(
            params,
            lr=hp.lr,
            betas=tuple(hp.betas),
            weight_decay=hp.weight_decay,
            fused=fused_adamw_supported(params),
        )
        lr_lambda = lr_schedule(
            lambda: self.trainer.estimated_stepping_batches if attached_trainer(self) else 0,
            hp.warmup_steps,
            hp.schedule,
            hp.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


LOW_PRECISION_WEIGHTS = ("bf16-true", "16-true", "transformer-engine", "transformer-engine-float16")
"""`trainer.precision` values that store the weights themselves in 16 bits."""


def check_training_precision(precision: str | int | None) -> None:
    """Refuse a precision that keeps the master weights in 16 bits (before any work).

    With bf16/fp16 weights an AdamW step of lr x (update ~1) is below half a unit in the
    last place of most weights (bf16 has 8 significant bits: a threshold of 1.0 moves
    only by steps >= 2^-8), so updates round away and training silently stalls
    (JumpReLU thresholds at 1.0 never move under bf16-true). Mixed precision computes in
    16 bits but keeps float32 weights and optimizer state; "64-true" keeps float64.

    Args:
        precision: `trainer.precision` (a Lightning precision string; None = "32-true").

    Raises:
        ConfigError: For "bf16-true", "16-true" and the transformer-engine precisions,
            naming `bf16-mixed` as the way.
    """
    if str(precision) in LOW_PRECISION_WEIGHTS:
        raise ConfigError(
            f"trainer.precision={precision!r} keeps the CLT weights in 16 bits, where most "
            "updates round to zero and training stalls: use trainer.precision=bf16-mixed "
            "(16-bit compute, float32 weights) or 32-true"
        )


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's Trainer, or None when it is used on its own (`load_clt`)."""
    try:
        return module.trainer
    except RuntimeError:  # "not attached to a `Trainer`"
        return None


def fused_adamw_supported(params: list[Tensor]) -> bool | None:
    """`fused=True` when PyTorch has a fused AdamW kernel for every parameter, else None.

    The fused kernel does the whole update in one pass per tensor. On the CPU the default
    is the per-tensor loop of small ops: at the paper shape (849.5M parameters) measured
    ~17 s per step against ~1.4 s fused on the project's 2-core machine (1 thread);
    on CUDA fused is also the fastest. Same update up to float rounding.

    Args:
        params: The parameters to optimise.

    Returns:
        True if every parameter is a floating-point tensor on the CPU or a CUDA device,
        else None (PyTorch's default implementation).
    """
    supported = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if supported else None


_VALID_SETTINGS = {
    "n_latents": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "lr": (lambda v: 0 < v < math.inf, "a float > 0"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two floats in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a float >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a float in [0, 1]"),
}


def check_optimisation_settings(**values: Any) -> None:
    """Refuse out-of-range `model.*` settings before any work (AdamW would fail mid-fit).

    Raises:
        ConfigError: Naming the first bad key, its value and what is valid (NaN is bad).
    """
    for key, value in values.items():
        is_valid, valid = _VALID_SETTINGS[key]
        if not is_valid(value):
            raise ConfigError(f"model.{key}={value!r} is invalid; valid: {valid}")


def lr_schedule(
    total_steps: Callable[[], float], warmup: int, schedule: str, min_ratio: float
) -> Callable[[int], float]:
    """`LambdaLR`'s factor function: `lr_factor` with the total steps read once, lazily.

    The total is asked for only past warm-up (before, the factor does not depend on it):
    `trainer.estimated_stepping_batches` iterates the train loader, and in
    `configure_optimizers`, before a resumed run has restored its loop state, that would
    fix the epoch (and the data order) of the first resumed epoch too early. A closure,
    not a callable object: LambdaLR would save an object's attributes in the checkpoint.

    Args:
        total_steps: Returns the run's optimiser steps (0 or inf when unknown).
        warmup, schedule, min_ratio: As `lr_factor`.
    """
    total: list[int] = []

    def lr_lambda(step: int) -> float:
        if step > warmup and not total:
            steps = total_steps()
            total.append(int(steps) if steps and not math.isinf(steps) else 0)
        return lr_factor(step, warmup, total[0] if total else 0, schedule, min_ratio)

    return lr_lambda


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then constant or cosine to `min_ratio`.

    Args:
        step: Optimiser step (0-based).
        warmup: Warm-up steps (0 for none).
        total: Total steps (0 when unknown: cosine then behaves as constant).
        schedule: "constant" or "cosine".
        min_ratio: Final multiplier of the cosine schedule.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
