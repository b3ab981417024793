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
the fused path (`sparse_decode.topk_encode` + `sparse_decode`); BatchTopK decodes its codes
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

Memory (``peak_*``; one extra, untimed step per mode for the two TopK targets): the peak
of the bytes allocated during the step through PyTorch's CPU allocator (``torch.profiler``
memory events, as in ``bench_decode``), plus what already existed at the start of the
step. ``static_bytes`` = parameters + gradients + the two AdamW moments (4 x 4 bytes per
parameter, 13.59 GB at the paper shape), identical in both modes.
``peak_total_bytes`` = parameters + AdamW moments + the gradient buffers the sparse path
keeps between steps (`sparse_decode.GRAD_RECYCLER`, sparse mode only; they are released
before every dense step, so the dense step is measured as in a dense-only run) + the
step's peak of new allocations. ``peak_activation_bytes`` = ``peak_total_bytes`` -
``static_bytes``: what the step needs beyond the parameters, gradients and optimizer
states (activations, their gradients, temporaries). Scratch memory that MKL/oneDNN
allocate for themselves is not seen.
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

from clt_lightning.models.sparse_decode import GRAD_RECYCLER
from clt_lightning.models.sparsifiers import SparsifierConfig, build_sparsifier
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
        losses_equal, the memory fields described in the module docstring (TopK targets),
        fused_encoder, and the settings (batch_size, shape, dtype, threads, optimizer).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)
        GRAD_RECYCLER.clear()


def _run(quick: bool) -> list[dict]:
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
    _step(module, optimizer, batch, "sparse")  # allocates the AdamW moments once
    rows = []
    for name in SPARSIFIERS:
        optimizer = _use_sparsifier(module, optimizer, SparsifierConfig(name, k=shape["k"]))
        rows += _measure(module, optimizer, batch, name, 1 if quick else REPEATS[name], quick)
    settings = {
        "batch_size": batch_size,
        "shape": dict(shape),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "optimizer": type(optimizer).__name__ + (" (fused)" if _is_fused(optimizer) else ""),
        "param_count": module.clt.param_count(),
    }
    return [{**row, **settings} for row in rows]


def _use_sparsifier(
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
    quick: bool,
) -> list[dict]:
    """Loss check, interleaved timed steps and (TopK targets) memory for one sparsifier."""
    losses = {mode: _forward_loss(module, batch, mode) for mode in ("dense", "sparse")}
    fused = {}
    for mode in ("dense", "sparse"):
        module.clt.decode_mode = mode
        fused[mode] = _fused(module)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    order = [("dense", "sparse"), ("sparse", "dense")]
    for repeat in range(repeats):
        for mode in order[repeat % 2]:
            times[mode].append(_timed_step(module, optimizer, batch, mode))
    memory = {}
    if name in TARGETED or quick:
        memory = {mode: _memory(module, optimizer, batch, mode) for mode in ("dense", "sparse")}
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
                **memory.get(mode, {}),
            }
        )
    dense, sparse = rows
    sparse["ratio_vs_dense"] = sparse["tokens_per_s"] / dense["tokens_per_s"]
    dense["ratio_vs_dense"] = 1.0
    diff = abs(losses["sparse"] - losses["dense"]) / max(abs(losses["dense"]), 1e-30)
    sparse["loss_rel_diff"] = diff
    sparse["losses_equal"] = diff <= LOSS_RTOL
    if memory:
        for key in ("peak_total_bytes", "peak_activation_bytes"):
            sparse[f"{key}_ratio_vs_dense"] = sparse[key] / dense[key]
    return rows


def _set_mode(module: CLTModule, mode: str) -> None:
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
    if _fused(module):
        recycled.append(clt.W_enc)
    GRAD_RECYCLER.reserve(recycled)


def _fused(module: CLTModule) -> bool:
    """Whether a training step in the current mode takes the fused TopK encoder."""
    with torch.enable_grad():
        return module.clt._fused_topk_applies()


def _forward_loss(module: CLTModule, batch: dict[str, Tensor], mode: str) -> float:
    """The training-mode loss of one forward (the graph is dropped, no update)."""
    _set_mode(module, mode)
    loss, _, _ = module.compute_loss(batch)
    return float(loss.detach())


def _step(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], mode: str
) -> None:
    """compute_loss, backward, optimizer step, zero_grad(set_to_none=True)."""
    module.clt.decode_mode = mode
    loss, _, _ = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed_step(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], mode: str
) -> float:
    _set_mode(module, mode)
    start = time.perf_counter()
    _step(module, optimizer, batch, mode)
    return time.perf_counter() - start


def _memory(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], mode: str
) -> dict[str, Any]:
    """Peak memory of one step (see the module docstring for the definitions)."""
    _set_mode(module, mode)
    param_bytes = sum(p.nbytes for p in module.clt.parameters())
    state_bytes = sum(
        t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0
    )
    at_start = param_bytes + state_bytes + GRAD_RECYCLER.nbytes()
    peak_new = _peak_new_bytes(lambda: _step(module, optimizer, batch, mode))
    static = 2 * param_bytes + state_bytes
    total = at_start + peak_new
    return {
        "peak_total_bytes": total,
        "peak_activation_bytes": total - static,
        "peak_new_bytes": peak_new,
        "static_bytes": static,
        "recycled_grad_bytes": GRAD_RECYCLER.nbytes(),
    }


def _peak_new_bytes(step: Callable[[], object]) -> int:
    """Peak of the bytes allocated during ``step`` and not yet freed (CPU allocator)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace_path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace_path))
        events = json.loads(trace_path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.param_groups[0].get("fused"))


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
