"""Decoder training step (forward + backward) alone: sparse backends vs the dense decoder.

What is timed: ``y_hat = decode(codes)`` and ``torch.autograd.grad`` of ``<y_hat, g>``
with respect to the codes (dense z [B, L, F] or sparse values [B, L, k]), every
``W_dec[s]`` and ``b_dec``; fresh gradients every step, as with ``zero_grad(set_to_none=True)``.
The dense baseline does one GEMM per source (``z_s @ W_dec[s].reshape(F, (L - s) d)``),
the fastest dense formulation, not one per (source, target) pair.

Shapes: the full run uses the paper's (L=12, d=768, F=12,288, k=128) with B=64 tokens
on a CPU and B=4096 on CUDA; ``quick`` is a smoke run at a tiny shape (L=4, d=64, F=1024,
k=32, B=16), so ``make bench-quick`` stays fast and light. One thread, as in the other
benchmarks (on the shared 2-core machines two threads spin-wait badly under load, and the
sparse backward's many small ops suffer most); variants are interleaved, one warm-up step
each, then three rounds; medians.

Memory (``peak_mem_bytes``): bytes allocated during one step, at their peak, excluding
what existed before it (parameters, codes). On CUDA: ``torch.cuda.max_memory_allocated``
minus the allocation at the start. On CPU: the peak of the ``Total Allocated`` counter in
``torch.profiler``'s memory events (``profile_memory=True``), which counts every tensor
the step allocates through PyTorch's CPU allocator; scratch memory that MKL/oneDNN
allocate for themselves is not seen. The memory run is separate from the timed runs
(the profiler slows ops down). Both include the dense ``W_dec`` gradient
(``weight_grad_bytes``, the same for every variant), which dominates at the paper shape:
the embedding-bag backend takes it from ``gradient_recycler.GRAD_RECYCLER``, which reuses it
from step to step (its timed steps do), but the recycler is emptied before the memory
step so that the gradient counts there as it does for the other variants. The recycler
is also emptied before each variant, so no variant holds another's buffers.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.gather_decode import gather_decode
from clt_lightning.models.gradient_recycler import GRAD_RECYCLER
from clt_lightning.models.sparse_decode import sparse_decode
from clt_lightning.models.triton_decode import triton_available

PAPER_SHAPE = {"n_layers": 12, "d_model": 768, "n_latents": 12_288, "k": 128}
QUICK_SHAPE = {"n_layers": 4, "d_model": 64, "n_latents": 1024, "k": 32}


def run(quick: bool = False) -> list[dict]:
    """Time the decode training step of each backend and of the dense decoder.

    Args:
        quick: Tiny shape, 16 tokens and one timed step (a smoke run), instead of the
            paper shape at 64 tokens (CPU) or 4096 (CUDA) with three timed steps.

    Returns:
        One row per variant: ``name``, ``tokens_per_s``, ``ratio_vs_dense`` (speed-up of
        tokens/s over the dense decoder), ``peak_mem_bytes``, plus
        ``peak_mem_beyond_weight_grad_bytes``, ``seconds_per_step``, ``weight_grad_bytes``,
        ``threads``, ``batch_size``, ``device``, ``dtype`` and ``shape``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)
        GRAD_RECYCLER.clear()


def _run(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = QUICK_SHAPE if quick else PAPER_SHAPE
    batch = 16 if quick else (4096 if device.type == "cuda" else 64)
    repeats = 1 if quick else 3
    generator = torch.Generator().manual_seed(0)
    W_dec, b_dec = _make_decoder(**{k: v for k, v in shape.items() if k != "k"}, device=device)
    values, indices = _make_codes(batch, shape, generator, device)
    z = torch.zeros(batch, shape["n_layers"], shape["n_latents"], device=device)
    z.scatter_(-1, indices, values)
    grad_out = torch.randn(batch, shape["n_layers"], shape["d_model"], device=device)

    variants: dict[str, Callable[[], object]] = {
        "dense": lambda: _dense_step(z, W_dec, b_dec, grad_out),
        "sparse_embedding_bag": lambda: _sparse_step(values, indices, W_dec, b_dec, grad_out),
        "sparse_gather": lambda: _sparse_step(values, indices, W_dec, b_dec, grad_out, "gather"),
    }
    if device.type == "cuda" and triton_available():
        variants["sparse_triton"] = lambda: _sparse_step(
            values, indices, W_dec, b_dec, grad_out, "triton"
        )
    weight_grad_bytes = sum(w.numel() * w.element_size() for w in W_dec)
    traffic = decode_traffic(indices, W_dec)
    copy_bytes = COPY_BYTES // 64 if quick else COPY_BYTES
    variants["memory_copy"] = _copy_step(copy_bytes, device)
    times = _interleaved_times(variants, repeats, device)
    copy_seconds = statistics.median(times.pop("memory_copy"))
    copy_gb_s = 2 * copy_bytes / copy_seconds / 1e9  # read + write
    del variants["memory_copy"]  # frees its buffers
    rows = []
    for name, step in variants.items():
        seconds = statistics.median(times[name])
        GRAD_RECYCLER.clear()
        peak = _peak_memory(step, device)
        rows.append(
            {
                "name": f"decode_{name}",
                "tokens_per_s": batch / seconds,
                "peak_mem_bytes": peak,
                "peak_mem_beyond_weight_grad_bytes": peak - weight_grad_bytes,
                "seconds_per_step": seconds,
                "weight_grad_bytes": weight_grad_bytes,
                "threads": torch.get_num_threads(),
                "batch_size": batch,
                "device": str(device),
                "dtype": "float32",
                "shape": dict(shape),
            }
        )
        if name != "dense":
            rows[-1] |= _bandwidth(traffic, seconds, copy_gb_s)
    dense_rate = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_vs_dense"] = row["tokens_per_s"] / dense_rate
    rows.append(
        {
            "name": "memory_copy",
            "gb_per_s": copy_gb_s,
            "seconds_per_step": copy_seconds,
            "threads": torch.get_num_threads(),
            "device": str(device),
        }
    )
    return rows


COPY_BYTES = 512 * 2**20
"""Size of the plain memory copy that gives the machine's achievable bandwidth figure."""


def _copy_step(n_bytes: int, device: torch.device) -> Callable[[], object]:
    """``dst.copy_(src)`` of ``n_bytes`` (fp32, resident): the plain memory-copy figure."""
    src = torch.empty(n_bytes // 4, device=device).uniform_()
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


def decode_traffic(indices: Tensor, W_dec: list[Tensor]) -> dict[str, int]:
    """Bytes one sparse decode step must move (fp32 rows of ``W_dec[s]`` [F, L - s, d]).

    ``min_bytes``: each distinct active row read once (forward) and the dense gradient
    written once (its active rows hold values, the others zeros): the least any
    implementation must move. ``slot_bytes``: what the step moves if every (token, slot)
    reads its whole row from memory, without reuse in cache, once forward and once for
    the codes' gradient, plus the gradient written once (the sparse-matrix product
    writes it in full; there is no separate zeroing pass).
    """
    unique_bytes = slot_row_bytes = 0
    for source, weight in enumerate(W_dec):
        row_bytes = weight[0].numel() * weight.element_size()
        unique_bytes += int(indices[:, source].unique().numel()) * row_bytes
        slot_row_bytes += indices[:, source].numel() * row_bytes
    grad_bytes = sum(w.numel() * w.element_size() for w in W_dec)
    return {
        "min_bytes": unique_bytes + grad_bytes,
        "slot_bytes": 2 * slot_row_bytes + grad_bytes,
        "unique_row_bytes": unique_bytes,
    }


def _bandwidth(traffic: dict[str, int], seconds: float, copy_gb_s: float) -> dict[str, float]:
    """Achieved GB/s of a sparse variant against the memory-copy figure of the same run."""
    min_gb_s = traffic["min_bytes"] / seconds / 1e9
    return {
        "min_gb": traffic["min_bytes"] / 1e9,
        "slot_gb": traffic["slot_bytes"] / 1e9,
        "min_gb_per_s": min_gb_s,
        "slot_gb_per_s": traffic["slot_bytes"] / seconds / 1e9,
        "min_fraction_of_copy": min_gb_s / copy_gb_s,
        "copy_gb_per_s": copy_gb_s,
    }


def _make_decoder(
    n_layers: int, d_model: int, n_latents: int, device: torch.device
) -> tuple[list[Tensor], Tensor]:
    """Leaf W_dec[s] [F, L - s, d] (filled, so no untouched zero pages) and b_dec [L, d]."""
    bound = d_model**-0.5
    W_dec = [
        torch.empty(n_latents, n_layers - s, d_model, device=device).uniform_(-bound, bound)
        for s in range(n_layers)
    ]
    b_dec = torch.zeros(n_layers, d_model, device=device)
    return [w.requires_grad_() for w in W_dec], b_dec.requires_grad_()


def _make_codes(
    batch: int, shape: dict[str, int], generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Abs-TopK-like codes: k distinct random latents per row, signed values [B, L, k]."""
    n_layers, n_latents, k = shape["n_layers"], shape["n_latents"], shape["k"]
    indices = torch.empty(batch, n_layers, k, dtype=torch.int64)
    for row in indices.view(-1, k):  # per-row permutations avoid a [B, L, F] random tensor
        row.copy_(torch.randperm(n_latents, generator=generator)[:k])
    values = torch.randn(batch, n_layers, k, generator=generator)
    return values.to(device).requires_grad_(), indices.to(device)


def _dense_step(z: Tensor, W_dec: list[Tensor], b_dec: Tensor, grad_out: Tensor) -> object:
    """Dense decoder (one GEMM per source) forward + backward."""
    z = z.detach().requires_grad_()
    batch, n_layers, n_latents = z.shape
    y = b_dec.expand(batch, n_layers, -1).clone()
    for source, weight in enumerate(W_dec):
        y[:, source:] += (z[:, source] @ weight.reshape(n_latents, -1)).view(
            batch, n_layers - source, -1
        )
    return torch.autograd.grad(y, [z, *W_dec, b_dec], grad_out)


def _sparse_step(
    values: Tensor,
    indices: Tensor,
    W_dec: list[Tensor],
    b_dec: Tensor,
    grad_out: Tensor,
    backend: str = "torch",
) -> object:
    """Sparse decoder forward + backward (``gather``: the baseline of `gather_decode.py`)."""
    if backend == "gather":
        y = gather_decode((values, indices), W_dec, b_dec)
    else:
        y = sparse_decode((values, indices), W_dec, b_dec, backend=backend)
    return torch.autograd.grad(y, [values, *W_dec, b_dec], grad_out)


def _interleaved_times(
    variants: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each step, variants interleaved, after one warm-up step of each."""
    for step in variants.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one step, beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
