"""Peak memory of the CLT training step: sparse against dense decoding (TopK targets).

The step is `benchmarks/bench_train_step.py`'s (``CLTModule.compute_loss``, backward,
fused AdamW, ``zero_grad(set_to_none=True)``; paper shape, 128 tokens, fp32), one
profiled step per mode for ReLU-TopK and Abs-TopK after one unprofiled step that
allocates the AdamW moments.

Definitions (all bytes of PyTorch tensors; scratch memory that MKL/oneDNN allocate for
themselves is not seen):

- ``peak_new_bytes``: the peak of the bytes allocated during the step and not yet freed,
  from ``torch.profiler``'s memory events (``profile_memory=True``), as in
  ``bench_decode``.
- ``static_bytes``: parameters + gradients + the two AdamW moments = 4 x 4 bytes per
  parameter (13.59 GB at the paper shape); the same in both modes.
- ``peak_total_bytes``: what existed at the start of the step (parameters, AdamW moments,
  and in sparse mode the gradient buffers that `gradient_recycler.GRAD_RECYCLER` keeps between
  steps) + ``peak_new_bytes``. A dense-only run keeps no such buffers: they are released
  before every dense step, so the dense step is measured as in a dense-only run.
- ``peak_activation_bytes`` = ``peak_total_bytes`` - ``static_bytes``: what the step needs
  beyond the model and its optimizer (activations, their gradients, temporaries). This is
  the part that sparse decoding can change; the issue's target (sparse <= half of dense)
  is checked on it. ``*_ratio_vs_dense`` = sparse / dense.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from benchmarks.bench_train_step import (
    TARGETED,
    peak_new_bytes,
    set_mode,
    settings,
    setup,
    step,
    use_sparsifier,
)
from clt_lightning.models.gradient_recycler import GRAD_RECYCLER
from clt_lightning.models.sparsifiers import SparsifierConfig
from clt_lightning.module import CLTModule


def run(quick: bool = False) -> list[dict]:
    """Peak memory of one training step per mode for the TopK targets.

    Args:
        quick: Tiny shape (a smoke run).

    Returns:
        Two rows per sparsifier (``memory_{name}_{dense|sparse}``) with peak_total_bytes,
        peak_activation_bytes, peak_new_bytes, static_bytes, recycled_grad_bytes, the
        sparse rows' ``*_ratio_vs_dense``, and the settings of ``bench_train_step``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, optimizer, batch = setup(quick)
        rows = []
        for name in TARGETED:
            config = SparsifierConfig(name, k=module.clt.sparsifier_config.k)
            optimizer = use_sparsifier(module, optimizer, config)
            dense, sparse = (
                {"name": f"memory_{name}_{mode}", "sparsifier": name, "decode": mode}
                | step_memory(module, optimizer, batch, mode)
                for mode in ("dense", "sparse")
            )
            for key in ("peak_total_bytes", "peak_activation_bytes"):
                sparse[f"{key}_ratio_vs_dense"] = sparse[key] / dense[key]
            rows += [dense, sparse]
        return [{**row, **settings(module, optimizer, batch)} for row in rows]
    finally:
        torch.set_num_threads(threads)
        GRAD_RECYCLER.clear()


def step_memory(
    module: CLTModule, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], mode: str
) -> dict[str, Any]:
    """Peak memory of one step in ``mode`` (definitions in the module docstring)."""
    set_mode(module, mode)
    param_bytes = sum(p.nbytes for p in module.clt.parameters())
    state_bytes = sum(
        t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0
    )
    recycled = GRAD_RECYCLER.nbytes()
    peak_new = peak_new_bytes(lambda: step(module, optimizer, batch))
    static = 2 * param_bytes + state_bytes
    total = param_bytes + state_bytes + recycled + peak_new
    return {
        "peak_total_bytes": total,
        "peak_activation_bytes": total - static,
        "peak_new_bytes": peak_new,
        "static_bytes": static,
        "recycled_grad_bytes": recycled,
    }


if __name__ == "__main__":
    import json
    import sys

    for result in run(quick="--quick" in sys.argv):
        print(json.dumps(result))
