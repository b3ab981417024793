"""One run of the paper's grid, for a W&B sweep agent (`experiments/wandb_sweep.yaml`).

    wandb sweep experiments/wandb_sweep.yaml          # prints the sweep id
    CLT_DATA_ROOT=/data wandb agent <entity>/<project>/<sweep id>

The agent calls `python -m experiments.sweep_agent --dataset=... --backbone=...
--sparsifier=...`; this module maps those three values to the run's config
(`configs/{dataset}_{backbone}_{sparsifier}.yaml`) and runs exactly what
`experiments.sweep` runs for it: the (dataset, backbone)'s activation cache when the config
reads one (under the same lock, so agents on one machine never write a cache together),
`clt fit` (resuming from `last.ckpt`), `clt evaluate` and the FINISHED marker; a finished
run is skipped. The W&B run the agent opened is picked up by the Lightning W&B logger of
`clt fit` through the environment the agent sets.

Settings that are not sweep parameters come from flags or, for agents, the environment:
`CLT_DATA_ROOT` (default `data`), `CLT_RUNS` (default `runs/sweep`), `CLT_DEVICES`
(default `1`), `CLT_MAX_EPOCHS` (default: the config's).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console

from experiments import sweep
from experiments.paper_numbers import BACKBONES, DATASETS, SPARSIFIERS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """W&B's `${args}` (`--dataset=cifar100 ...`) plus the sweep's settings."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep_agent",
        description="Run one (dataset, backbone, sparsifier) of the paper's grid.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--backbone", required=True, choices=BACKBONES)
    parser.add_argument("--sparsifier", required=True, choices=SPARSIFIERS)
    env = os.environ.get
    parser.add_argument("--data-root", default=env("CLT_DATA_ROOT", sweep.DEFAULT_DATA_ROOT))
    parser.add_argument("--runs", default=env("CLT_RUNS", sweep.DEFAULT_RUNS))
    parser.add_argument("--devices", default=env("CLT_DEVICES", sweep.DEFAULT_DEVICES))
    max_epochs = env("CLT_MAX_EPOCHS")
    parser.add_argument("--max-epochs", type=int, default=int(max_epochs) if max_epochs else None)
    parser.add_argument("--configs", default=sweep.DEFAULT_CONFIGS)
    parser.add_argument("--clt", default=None, help="command that runs clt (default: the venv's)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Plan and run one grid cell; the exit status is non-zero when it failed."""
    args = parse_args(argv)
    settings = sweep.settings_from_args(args)
    spec = sweep.RunSpec(args.dataset, args.backbone, args.sparsifier)
    console = Console()
    plan = sweep.build_plan(settings, [spec])
    sweep.print_plan(plan, console)
    if args.dry_run:
        return 0
    outcomes = sweep.execute(plan, settings, console)
    sweep.print_summary(outcomes, console)
    return int(any(o.result == "failed" for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
