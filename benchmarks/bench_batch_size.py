"""The training step at the paper's batch sizes: time and peak memory against batch size.

The shipped configs train on 4,096 tokens per step; ``bench_train_step`` times 128. This
benchmark times the same step (``bench_train_step.step``: compute_loss, backward, fused
AdamW, zero_grad; ReLU-TopK, paper shape, fp32, one thread) at growing batches, smallest
first, and measures its peak memory two ways:

- ``peak_rss_bytes``: the process's resident set at its peak during the timed steps
  (``VmHWM`` of ``/proc/self/status``, reset before each batch size by writing ``5`` to
  ``/proc/self/clear_refs``): everything the process holds, Python, torch and MKL/oneDNN
  scratch included. Where the reset is not allowed, ``ru_maxrss`` (the peak so far) is
  reported and ``rss_reset`` is false. Batches run smallest first, so memory that the C
  allocator keeps after a smaller step is reused, not added.
- ``peak_total_bytes`` / ``peak_activation_bytes``: torch's allocator, from one profiled
  step (``bench_memory.step_memory``: the tensors alive at the start of the step plus the
  peak of new allocations; activations = total - parameters, gradients and AdamW moments).

Sparse decoding at every batch size; dense decoding only at the batch sizes in
``DENSE_BATCHES`` (128 tokens is ``train_step``'s): a dense step at 2,048 tokens needs
~8 GB of [B, L, F] activations on top of the 13.6 GB model and optimizer and several
minutes, more than the project's shared 24 GB machine and the suite's budget allow. ``ratio_vs_dense`` = sparse tokens/s over
dense tokens/s at the same batch size, steps interleaved; medians of ``REPEATS`` steps
after one warm-up step per batch size and mode.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_memory import step_memory
from benchmarks.bench_train_step import set_mode, settings, setup, step
from clt_lightning.models.gradient_recycler import GRAD_RECYCLER
from clt_lightning.module import CLTModule

BATCHES, QUICK_BATCHES = (128, 512, 2048), (16, 64)
DENSE_BATCHES, QUICK_DENSE_BATCHES = (512,), (64,)
REPEATS = 2


def run(quick: bool = False) -> list[dict]:
    """Time and memory of the training step per batch size.

    Args:
        quick: Tiny shape and batches, one timed step (a smoke run).

    Returns:
        One row per (batch size, mode): ``batch_{B}_{mode}`` with tokens_per_s,
        seconds_per_step, seconds_all, peak_rss_bytes, rss_reset, peak_total_bytes,
        peak_activation_bytes, static_bytes, ratio_vs_dense (sparse rows with a dense
        row at the same batch size), and the settings of ``bench_train_step``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, optimizer, _ = setup(quick)
        rows = []
        batches = QUICK_BATCHES if quick else BATCHES
        dense = QUICK_DENSE_BATCHES if quick else DENSE_BATCHES
        for batch_size in batches:
            modes = ("dense", "sparse") if batch_size in dense else ("sparse",)
            rows += _measure(module, optimizer, batch_size, modes, 1 if quick else REPEATS)
        return rows
    finally:
        torch.set_num_threads(threads)
        GRAD_RECYCLER.clear()


def _measure(
    module: CLTModule,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    modes: tuple[str, ...],
    repeats: int,
) -> list[dict]:
    """Rows of one batch size: memory, then interleaved timed steps per mode."""
    clt = module.clt
    generator = torch.Generator().manual_seed(batch_size)
    batch = {
        key: torch.randn(batch_size, clt.n_layers, clt.d_model, generator=generator)
        for key in ("x", "y")
    }
    rows: dict[str, dict] = {}
    for mode in modes:
        set_mode(module, mode)
        reset = _reset_peak_rss()
        step(module, optimizer, batch)  # warm-up: faults in this batch size's memory
        rows[mode] = {"peak_rss_bytes": _peak_rss(), "rss_reset": reset}
        rows[mode] |= step_memory(module, optimizer, batch, mode)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            set_mode(module, mode)
            start = time.perf_counter()
            step(module, optimizer, batch)
            times[mode].append(time.perf_counter() - start)
    out = []
    for mode in modes:
        seconds = statistics.median(times[mode])
        row = {
            "name": f"batch_{batch_size}_{mode}",
            "decode": mode,
            "tokens_per_s": batch_size / seconds,
            "seconds_per_step": seconds,
            "seconds_all": [round(t, 3) for t in times[mode]],
            **rows[mode],
            **settings(module, optimizer, batch),
        }
        out.append(row)
    if len(out) == 2:
        out[1]["ratio_vs_dense"] = out[1]["tokens_per_s"] / out[0]["tokens_per_s"]
    set_mode(module, "sparse")
    return out


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    """Peak resident set of this process since the last reset (bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
