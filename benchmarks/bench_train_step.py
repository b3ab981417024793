"""CLT training step at the paper shape: sparse against dense decoding, per sparsifier.

What is timed: one optimisation step exactly as Lightning's automatic optimisation runs it
for `CLTModule`, without the Trainer's logging: ``CLTModule.compute_loss`` (encode,
sparsify, decode, summed per-layer normalised MSE plus the sparsifier's own terms),
``loss.backward()``, the optimizer of ``CLTModule.configure_optimizers`` (AdamW, fused
kernel) and ``zero_grad(set_to_none=True)``. The same module is switched between
``decode="dense"`` and ``decode="sparse"`` (the path ``auto`` picks for TopK at k * 8 <= F),
so both modes share weights, batch and optimizer; steps are interleaved (dense, sparse,
sparse, dense, ...) and the median of each mode is reported. ``ratio_vs_dense`` = sparse
tokens/s over dense tokens/s. Dense mode is the unchanged dense path: one einsum encoder,
dense [B, L, F] activations, one GEMM per source layer. Sparse mode for ReLU-/Abs-TopK is
the fused path (`topk_encode.topk_encode` + `sparse_decode`); BatchTopK decodes its codes
sparsely but keeps the dense encoder (its selection spans the batch); JumpReLU decodes
densely in training in both modes, by design (its threshold gradient needs dLoss/dz of
latents below the threshold), so its two rows time the same path.

Batch: 128 tokens. The per-step costs that do not depend on the batch (the AdamW update of
849.5M parameters, zeroing the 3.4 GB of gradients) are the same in both modes and hide
the decoder's share at small batches, so a larger batch shows the difference better; a
dense step at B=128 already takes ~15-25 s on the project's shared 2-core CPU, and the
whole suite must stay under 10 minutes. One thread (two threads spin-wait badly on a
loaded 2-core machine). fp32 weights; the teacher activations are random normal (the
step's cost does not depend on their values); decoders and encoders are the model's own
initialisation, and the training forward updates the dead-latent statistics in both modes.

Losses: before timing each sparsifier, the training forward and loss are computed once in
each mode at the same weights; ``loss_rel_diff`` = |sparse - dense| / |dense|
(float tolerance: 1e-5).

Breakdown (ReLU-TopK, sparse, see `breakdown`): the whole step against its two floors,
an encoder-only step (fused TopK encoder, backward, AdamW on ``W_enc``/``b_enc``) and an
AdamW-only step (``optimizer.step()`` over all 849.5M parameters), and the step without
gradient recycling; interleaved, medians.

Peak memory of the same step is measured by ``benchmarks/bench_memory.py`` (separately,
because the profiler slows the step down), with the helpers of this module.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt_lightning.models.gradient_recycler import GRAD_RECYCLER
from clt_lightning.models.sparsifiers import SparsifierConfig, build_sparsifier
from clt_lightning.models.topk_encode import topk_encode
from clt_lightning.module import CLTModule

PAPER_SHAPE = {"n_layers": 12, "d_model": 768, "n_latents": 12_288, "k": 128}
QUICK_SHAPE = {"n_layers": 4, "d_model": 64, "n_latents": 1024, "k": 32}
BATCH, QUICK_BATCH = 128, 64
SPARSIFIERS = ("relu_topk", "abs_topk", "batch_topk", "jumprelu")
TARGETED = ("relu_topk", "abs_topk")
"""Sparsifiers with the issue's targets (>= 3x faster, <= half the activation memory)."""
REPEATS = {"relu_topk": 3, "abs_topk": 3, "batch_topk": 1, "jumprelu": 1}
LOSS_RTOL = 1e-5


def run(quick: bool = False) -> list[dict]:
    """Time the training step in dense and sparse mode for every sparsifier.

    Args:
        quick: Tiny shape, one step per mode (a smoke run that checks every path runs).

    Returns:
        Two rows per sparsifier (``train_step_{name}_{dense|sparse}``) with tokens_per_s,
        seconds_per_step (median), seconds_all, ratio_vs_dense, loss, loss_rel_diff,
        losses_equal, fused_encoder, and the settings (batch_size, shape, dtype, threads,
        optimizer, param_count).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)
        GRAD_RECYCLER.clear()


def _run(quick: bool) -> list[dict]:
    module, optimizer, batch = setup(quick)
    rows = []
    for name in SPARSIFIERS:
        optimizer = use_sparsifier(module, optimizer, SparsifierConfig(name, k=_k(module)))
        rows += _measure(module, optimizer, batch, name, 1 if quick else REPEATS[name])
        if name == "relu_topk":
            rows += breakdown(module, optimizer, batch, 1 if quick else REPEATS[name])
    return [{**row, **settings(module, optimizer, batch)} for row in rows]


def setup(quick: bool) -> tuple[CLTModule, torch.optim.Optimizer, dict[str, Tensor]]:
    """The module (ReLU-TopK, training mode), its optimizer after one step, and a batch.

    The step allocates the AdamW moments, which are then reused by every sparsifier.
    """
    shape = QUICK_SHAPE if quick else PAPER_SHAPE
    batch_size = QUICK_BATCH if quick else BATCH
    torch.manual_seed(0)
    module = CLTModule(
        sparsifier=SparsifierConfig("relu_topk", k=shape["k"]),
        decode="sparse",
        n_latents=shape["n_latents"],
        n_layers=shape["n_layers"],
        d_model=shape["d_model"],
    )
    module.clt.train()
    optimizer = module.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(0)
    batch = {
        key: torch.randn(batch_size, shape["n_layers"], shape["d_model"], generator=generator)
        for key in ("x", "y")
    }
    set_mode(module, "sparse")
    step(module, optimizer, batch)
    return module, optimizer, batch


def settings(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> dict[str, Any]:
    """The settings every row carries."""
    clt = module.clt
    fused = bool(optimizer.param_groups[0].get("fused"))
    return {
        "batch_size": batch["x"].shape[0],
        "shape": {"n_layers": clt.n_layers, "d_model": clt.d_model, "n_latents": clt.n_latents}
        | {"k": _k(module)},
        "dtype": str(clt.W_enc.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "optimizer": type(optimizer).__name__ + (" (fused)" if fused else ""),
        "param_count": clt.param_count(),
    }


def _k(module: CLTModule) -> int:
    return module.clt.sparsifier_config.k


def use_sparsifier(
    module: CLTModule, optimizer: torch.optim.Optimizer, config: SparsifierConfig
) -> torch.optim.Optimizer:
    """Swap the CLT's sparsifier in place; keep the weights and the AdamW moments."""
    clt = module.clt
    clt.sparsifier = build_sparsifier(config, clt.n_layers, clt.n_latents).train()
    clt.sparsifier_config = config
    module.sparsifier_config = config
    new = module.configure_optimizers()["optimizer"]
    for param in clt.parameters():  # JumpReLU's thresholds start with fresh moments
        if param in optimizer.state:
            new.state[param] = optimizer.state[param]
    return new


def _measure(
    module: CLTModule,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    name: str,
    repeats: int,
) -> list[dict]:
    """Loss check and interleaved timed steps for one sparsifier."""
    losses, fused = {}, {}
    for mode in ("dense", "sparse"):
        set_mode(module, mode)
        losses[mode] = _forward_loss(module, batch)
        fused[mode] = fused_path(module)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    order = [("dense", "sparse"), ("sparse", "dense")]
    for repeat in range(repeats):
        for mode in order[repeat % 2]:
            set_mode(module, mode)
            start = time.perf_counter()
            step(module, optimizer, batch)
            times[mode].append(time.perf_counter() - start)
    rows = []
    for mode in ("dense", "sparse"):
        seconds = statistics.median(times[mode])
        rows.append(
            {
                "name": f"train_step_{name}_{mode}",
                "sparsifier": name,
                "decode": mode,
                "tokens_per_s": batch["x"].shape[0] / seconds,
                "seconds_per_step": seconds,
                "seconds_all": [round(t, 3) for t in times[mode]],
                "loss": losses[mode],
                "fused_encoder": fused[mode],
            }
        )
    dense, sparse = rows
    sparse["ratio_vs_dense"] = sparse["tokens_per_s"] / dense["tokens_per_s"]
    dense["ratio_vs_dense"] = 1.0
    diff = abs(losses["sparse"] - losses["dense"]) / max(abs(losses["dense"]), 1e-30)
    sparse["loss_rel_diff"] = diff
    sparse["losses_equal"] = diff <= LOSS_RTOL
    return rows


def breakdown(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], repeats: int
) -> list[dict]:
    """The sparse step against its two floors, and without gradient recycling.

    Rows (ReLU-TopK, sparse mode, interleaved, medians): ``step_full`` (the whole step,
    as ``train_step_relu_topk_sparse``), ``step_encoder_only`` (the fused TopK encoder,
    a loss on its codes, its backward and fused AdamW on ``W_enc``/``b_enc`` only: no
    decoder), ``step_adamw_only`` (``optimizer.step()`` over all parameters with their
    gradients present: the update any step must make) and ``step_full_no_recycling``
    (the whole step with ``GRAD_RECYCLER`` disabled: fresh gradient tensors every step).
    ``ratio_vs_floors`` = full seconds / (encoder-only + AdamW-only seconds); the target
    is <= 2.0.
    """
    set_mode(module, "sparse")
    clt = module.clt
    encoder_params = [clt.W_enc, clt.b_enc]
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    enc_optimizer = type(optimizer)([{"params": encoder_params, **group}])
    for param in encoder_params:  # share the moments: no extra memory, same update
        enc_optimizer.state[param] = optimizer.state[param]
    variants = {
        "step_full": lambda: _timed(lambda: step(module, optimizer, batch)),
        "step_encoder_only": lambda: _encoder_step(module, enc_optimizer, batch),
        "step_adamw_only": lambda: _adamw_only(module, optimizer, batch),
        "step_full_no_recycling": lambda: _without_recycling(module, optimizer, batch),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    rows = []
    for name, seconds_all in times.items():
        seconds = statistics.median(seconds_all)
        rows.append(
            {
                "name": f"breakdown_{name}",
                "tokens_per_s": batch["x"].shape[0] / seconds,
                "seconds_per_step": seconds,
                "seconds_all": [round(t, 3) for t in seconds_all],
            }
        )
    by_name = {row["name"].removeprefix("breakdown_"): row for row in rows}
    floors = by_name["step_encoder_only"]["seconds_per_step"]
    floors += by_name["step_adamw_only"]["seconds_per_step"]
    by_name["step_full"]["ratio_vs_floors"] = by_name["step_full"]["seconds_per_step"] / floors
    by_name["step_full_no_recycling"]["ratio_vs_recycling"] = (
        by_name["step_full"]["seconds_per_step"]
        / by_name["step_full_no_recycling"]["seconds_per_step"]
    )
    set_mode(module, "sparse")
    return rows


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _encoder_step(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> float:
    """Seconds of: fused TopK encode, <codes, codes> loss, backward, AdamW on the encoder."""
    clt = module.clt

    def run_step() -> None:
        x = clt.scale_inputs(batch["x"])
        codes = topk_encode(x, clt.W_enc, clt.b_enc, _k(module))
        codes.values.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(run_step)


def _adamw_only(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> float:
    """Seconds of ``optimizer.step()`` alone, after an untimed forward and backward."""
    loss, _, _ = module.compute_loss(batch)
    loss.backward()
    seconds = _timed(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return seconds


def _without_recycling(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> float:
    """Seconds of a whole step with the gradient recycler switched off."""
    GRAD_RECYCLER.clear()
    enabled, GRAD_RECYCLER.enabled = GRAD_RECYCLER.enabled, False
    try:
        return _timed(lambda: step(module, optimizer, batch))
    finally:
        GRAD_RECYCLER.enabled = enabled
        set_mode(module, "sparse")


def set_mode(module: CLTModule, mode: str) -> None:
    """Select the decode mode and hold exactly the gradient buffers that mode recycles.

    A sparse-only training run keeps them from step to step (see `GradientRecycler`); a
    dense-only run has none, so they are released before a dense step.
    """
    clt = module.clt
    clt.decode_mode = mode
    GRAD_RECYCLER.clear()
    recycled = []
    if mode == "sparse" and clt.sparsifier.sparse_grad_exact:  # decodes sparsely
        recycled += list(clt.W_dec)
    if fused_path(module):
        recycled.append(clt.W_enc)
    GRAD_RECYCLER.reserve(recycled)


def fused_path(module: CLTModule) -> bool:
    """Whether a training step in the current mode takes the fused TopK encoder."""
    with torch.enable_grad():
        return module.clt.sparsifier.fuses(module.clt.decode_request())


def _forward_loss(module: CLTModule, batch: dict[str, Tensor]) -> float:
    """The training-mode loss of one forward (the graph is dropped, no update)."""
    loss, _, _ = module.compute_loss(batch)
    return float(loss.detach())


def step(module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]) -> None:
    """compute_loss, backward, optimizer step, zero_grad(set_to_none=True)."""
    loss, _, _ = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_new_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated during ``fn`` and not yet freed (CPU allocator)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profiler:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace_path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace_path))
        events = json.loads(trace_path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
