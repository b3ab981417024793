"""Callbacks that a child `clt fit` loads by class path to report what ran on which rank."""

from __future__ import annotations

import os

import torch.distributed as dist

import clt_lightning.callbacks as callbacks
from clt_lightning.callbacks import EvaluationCallback
from clt_lightning.evaluation.suite import EvaluationConfig


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CountingEvaluationCallback(EvaluationCallback):
    """EvaluationCallback whose evaluation suite appends "rank <r>" to `count_file` each
    time it runs (in whichever process runs it).

    Args:
        count_file: File receiving one line per run of the suite.
        config: As EvaluationCallback.
        every_n_epochs: As EvaluationCallback.
        at_fit_end: As EvaluationCallback.
    """

    def __init__(
        self,
        count_file: str,
        config: EvaluationConfig = EvaluationConfig(n_images=4, figures=False),
        every_n_epochs: int = 0,
        at_fit_end: bool = True,
    ) -> None:
        super().__init__(config, every_n_epochs, at_fit_end)
        real = callbacks.run_suite

        def counted(*args, **kwargs):
            with open(count_file, "a") as f:
                f.write(f"rank {_rank()} pid {os.getpid()}\n")
            return real(*args, **kwargs)

        callbacks.run_suite = counted
