"""Run the paper's grid: 3 datasets x 2 backbones x 3 sparsifiers, one run after another.

    python -m experiments.sweep --data-root DIR --runs DIR --devices N \\
        [--dry-run] [--only PATTERN] [--max-epochs N] [--configs DIR] [--clt COMMAND]

`make sweep` and `make sweep-dry` call it with DATA_ROOT=data, RUNS=runs/sweep, DEVICES=1
unless told otherwise (`make sweep DATA_ROOT=/data DEVICES=8`). Run it from the repository
root: configs are read from `configs/{dataset}_{backbone}_{sparsifier}.yaml`, the only thing
this script knows about them besides `data.source`.

For every (dataset, backbone), in the paper's order:

1. `clt cache --config C --data.dataset.root DATA/<dataset>`, once, when a run of the pair
   still has work and its config reads activations from disk (`data.source: cache`, the
   default). The configs of a pair share one `data.cache_dir`; the cache resumes after its
   last complete shard, so a rerun costs a verification pass. A lock file keeps two sweep
   processes (e.g. W&B agents) from writing the same cache at once.
2. Per sparsifier, `clt fit --config C --trainer.default_root_dir RUNS/<run>
   --trainer.devices N --data.dataset.root DATA/<dataset>` (+ `--ckpt_path
   RUNS/<run>/checkpoints/last.ckpt` when that file exists: the run resumes), then
   `clt evaluate --config C --ckpt_path RUNS/<run>/checkpoints/last.ckpt
   --evaluation.output_dir RUNS/<run>/evaluation --data.dataset.root DATA/<dataset>`
   unless the configs' fit-end evaluation callback already wrote `evaluation/` during this
   fit (the same numbers), then the marker `RUNS/<run>/FINISHED`.

A run with `FINISHED`, or with `evaluation/cascade.json` and `evaluation/run.json` (which
`clt evaluate` writes last), is skipped. A failing step is reported and
the sweep goes on with the next run; the exit status is 1 if any run failed. Each step's
output goes to the console and to `RUNS/<run>/logs/<step>.log` (cache: `RUNS/_sweep/`).
`--dry-run` prints the plan (status and commands of every run) and runs nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clt_lightning.files import atomic_write_text
from experiments.paper_numbers import BACKBONES, DATASETS, SPARSIFIERS

DEFAULT_DATA_ROOT = "data"
DEFAULT_RUNS = "runs/sweep"
DEFAULT_DEVICES = "1"
DEFAULT_CONFIGS = "configs"
FINISHED_MARKER = "FINISHED"
SWEEP_DIR = "_sweep"  # under the runs folder: cache logs and locks

NEW, RESUME, FINISHED, NO_CONFIG = "new", "resume", "finished", "no config"


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid.

    Attributes:
        dataset: `cifar100`, `coco` or `imagenet100`.
        backbone: `b32` or `b16`.
        sparsifier: `jumprelu`, `relu_topk` or `abs_topk`.
    """

    dataset: str
    backbone: str
    sparsifier: str

    @property
    def name(self) -> str:
        """`{dataset}_{backbone}_{sparsifier}`: the config's stem and the run folder's name."""
        return f"{self.dataset}_{self.backbone}_{self.sparsifier}"

    @property
    def pair(self) -> tuple[str, str]:
        """(dataset, backbone): the runs that share one activation cache."""
        return (self.dataset, self.backbone)


@dataclass(frozen=True)
class Settings:
    """What the command line fixed for the whole sweep.

    Attributes:
        data_root: Dataset roots live in `data_root/<dataset>`.
        runs: Run folders live in `runs/<run>`.
        devices: Passed to `--trainer.devices` of `clt fit`.
        configs: Folder of the run configs.
        clt: Command prefix that runs `clt`.
        max_epochs: Overrides `trainer.max_epochs` of `clt fit` when set.
    """

    data_root: Path
    runs: Path
    devices: str = DEFAULT_DEVICES
    configs: Path = Path(DEFAULT_CONFIGS)
    clt: tuple[str, ...] = ()
    max_epochs: int | None = None


@dataclass
class PlannedRun:
    """A run's status before the sweep and the commands it needs (empty when finished).

    Attributes:
        spec: The grid cell.
        status: `new`, `resume`, `finished` or `no config`.
        uses_cache: The config reads a disk cache (`data.source: cache`).
        fit: `clt fit` argv.
        evaluate: `clt evaluate` argv.
        cache: `clt cache` argv (the same for every run of a pair; run once).
        error: Why the run cannot start (missing or unreadable config).
    """

    spec: RunSpec
    status: str
    uses_cache: bool = False
    fit: list[str] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=list)
    cache: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class Outcome:
    """What happened to one run.

    Attributes:
        name: Run name.
        status: Status before the sweep.
        result: `skipped`, `ok` or `failed`.
        detail: The failing step and its exit code, or a note.
        seconds: Wall time spent on the run (its share of the cache not included).
    """

    name: str
    status: str
    result: str
    detail: str = ""
    seconds: float = 0.0


def default_clt_command() -> tuple[str, ...]:
    """The `clt` console script next to this interpreter, else `python -m clt_lightning.cli`."""
    script = Path(sys.executable).with_name("clt")
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (sys.executable, "-m", "clt_lightning.cli")


def grid(only: Sequence[str] = ()) -> list[RunSpec]:
    """The 18 runs in the paper's order, filtered by name patterns.

    Args:
        only: fnmatch patterns on the run name (`cifar100_b32_*`); a pattern without
            wildcards matches as a substring (`b32`). Empty: every run.
    """
    specs = [RunSpec(d, b, s) for d in DATASETS for b in BACKBONES for s in SPARSIFIERS]
    if not only:
        return specs
    globs = [p if any(c in p for c in "*?[") else f"*{p}*" for p in only]
    return [s for s in specs if any(fnmatch.fnmatchcase(s.name, g) for g in globs)]


def run_status(spec: RunSpec, runs: Path) -> str:
    """`finished`, `resume` (last.ckpt exists) or `new`.

    Finished: the FINISHED marker, or a complete evaluation folder (cascade.json and
    run.json; `clt evaluate` writes run.json last), e.g. from a run made outside the sweep.
    """
    folder = runs / spec.name
    evaluation = folder / "evaluation"
    complete = (evaluation / "cascade.json").exists() and (evaluation / "run.json").exists()
    if (folder / FINISHED_MARKER).exists() or complete:
        return FINISHED
    if last_checkpoint(spec, runs).exists():
        return RESUME
    return NEW


def last_checkpoint(spec: RunSpec, runs: Path) -> Path:
    """`<runs>/<run>/checkpoints/last.ckpt`: where `clt fit` leaves its last checkpoint."""
    return runs / spec.name / "checkpoints" / "last.ckpt"


def config_uses_cache(config: Path) -> bool:
    """Whether a run config reads activations from a disk cache (`data.source`, default cache).

    Raises:
        OSError, yaml.YAMLError: The config cannot be read.
    """
    document = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    data = document.get("data") or {}
    return data.get("source", "cache") == "cache"


def plan_run(spec: RunSpec, settings: Settings) -> PlannedRun:
    """Status and commands of one run.

    Args:
        spec: The grid cell.
        settings: Sweep settings.
    """
    config = settings.configs / f"{spec.name}.yaml"
    status = run_status(spec, settings.runs)
    if status == FINISHED:
        return PlannedRun(spec, status)
    try:
        uses_cache = config_uses_cache(config)
    except (OSError, yaml.YAMLError) as error:
        return PlannedRun(spec, NO_CONFIG, error=f"cannot read {config}: {error}")
    folder = settings.runs / spec.name
    clt, common = list(settings.clt), ["--config", str(config)]
    data = ["--data.dataset.root", str(settings.data_root / spec.dataset)]
    fit = [*clt, "fit", *common, "--trainer.default_root_dir", str(folder)]
    fit += ["--trainer.devices", settings.devices, *data]
    if settings.max_epochs is not None:
        fit += ["--trainer.max_epochs", str(settings.max_epochs)]
    if status == RESUME:
        fit += ["--ckpt_path", str(last_checkpoint(spec, settings.runs))]
    evaluate = [*clt, "evaluate", *common, "--ckpt_path", str(last_checkpoint(spec, settings.runs))]
    evaluate += ["--evaluation.output_dir", str(folder / "evaluation"), *data]
    cache = [*clt, "cache", *common, *data] if uses_cache else []
    return PlannedRun(spec, status, uses_cache, fit, evaluate, cache)


def build_plan(settings: Settings, specs: Sequence[RunSpec]) -> list[PlannedRun]:
    """Plan every run of `specs` (in their order)."""
    return [plan_run(spec, settings) for spec in specs]


def print_plan(plan: Sequence[PlannedRun], console: Console) -> None:
    """The status table, then each (dataset, backbone)'s commands in the order they will run."""
    table = Table(title=f"Sweep plan: {len(plan)} runs")
    for column in ("run", "status", "cache", "action"):
        table.add_column(column)
    actions = {NEW: "fit + evaluate", RESUME: "resume fit + evaluate", FINISHED: "skip"}
    for run in plan:
        cache = "disk" if run.uses_cache else ("-" if run.status == FINISHED else "online")
        table.add_row(run.spec.name, run.status, cache, escape(actions.get(run.status, run.error)))
    console.print(table)
    cached: set[tuple[str, str]] = set()
    for run in plan:
        if run.status in (FINISHED, NO_CONFIG):
            continue
        lines = []
        if run.cache and run.spec.pair not in cached:
            cached.add(run.spec.pair)
            lines.append(shlex.join(run.cache))
        lines += [shlex.join(run.fit), shlex.join(run.evaluate)]
        console.print(f"# {run.spec.name} ({run.status})", markup=False, highlight=False)
        for line in lines:
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def stream_command(argv: Sequence[str], log_path: Path) -> int:
    """Run a command, copying its output (bytes, so progress bars survive) to stdout and a log.

    Args:
        argv: The command.
        log_path: Log file (appended to; parent folders are created).

    Returns:
        The exit status (127 when the program does not exist).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sys.stdout.flush()  # what the console printed so far comes before the command's output
    with log_path.open("ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        try:
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
        except OSError as error:
            log.write(f"cannot start: {error}\n".encode())
            sys.stdout.write(f"cannot start {argv[0]}: {error}\n")
            return 127
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log.write(chunk)
        return process.wait()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_cache(run: PlannedRun, settings: Settings, console: Console) -> int:
    """`clt cache` for a run's (dataset, backbone), under a lock shared by all sweep processes."""
    stem = f"cache_{run.spec.dataset}_{run.spec.backbone}"
    sweep_dir = settings.runs / SWEEP_DIR
    console.rule(f"cache {run.spec.dataset} {run.spec.backbone}")
    with file_lock(sweep_dir / f"{stem}.lock"):
        return stream_command(run.cache, sweep_dir / f"{stem}.log")


def evaluated_by_fit(run_dir: Path, fit_started: float) -> bool:
    """Whether `clt fit`'s evaluation callback wrote a complete `evaluation/` (run.json,
    written last) during this fit: then `clt evaluate` would recompute the same numbers."""
    run_json = run_dir / "evaluation" / "run.json"
    return run_json.is_file() and run_json.stat().st_mtime >= fit_started


def execute_run(run: PlannedRun, settings: Settings, console: Console) -> Outcome:
    """fit, evaluate and the FINISHED marker for one planned run (its cache already done)."""
    name, started = run.spec.name, time.monotonic()
    logs = settings.runs / name / "logs"
    fit_started = time.time()
    for step, argv in (("fit", run.fit), ("evaluate", run.evaluate)):
        if step == "evaluate" and evaluated_by_fit(settings.runs / name, fit_started):
            console.print(
                f"{name}: the fit-end evaluation callback wrote evaluation/: no `evaluate`"
            )
            continue
        console.rule(f"{step} {name}")
        code = stream_command(argv, logs / f"{step}.log")
        if code != 0:
            detail = f"{step} exited {code}; log: {logs / f'{step}.log'}"
            return Outcome(name, run.status, "failed", detail, time.monotonic() - started)
    marker = {
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fit": run.fit,
        "evaluate": run.evaluate,
    }
    atomic_write_text(settings.runs / name / FINISHED_MARKER, json.dumps(marker, indent=2) + "\n")
    return Outcome(name, run.status, "ok", "", time.monotonic() - started)


def execute(plan: Sequence[PlannedRun], settings: Settings, console: Console) -> list[Outcome]:
    """Run the plan: each pair's cache once (when needed), then every run; never stops early.

    Args:
        plan: From `build_plan`, in the order to run.
        settings: Sweep settings.
        console: Where progress goes.

    Returns:
        One outcome per planned run, in plan order.
    """
    cache_codes: dict[tuple[str, str], int] = {}
    outcomes: list[Outcome] = []
    for run in plan:
        if run.status == FINISHED:
            outcomes.append(Outcome(run.spec.name, run.status, "skipped", "already finished"))
            continue
        if run.status == NO_CONFIG:
            outcomes.append(Outcome(run.spec.name, run.status, "failed", run.error))
            continue
        if run.cache and run.spec.pair not in cache_codes:
            cache_codes[run.spec.pair] = run_cache(run, settings, console)
        if run.cache and cache_codes[run.spec.pair] != 0:
            detail = f"cache exited {cache_codes[run.spec.pair]}; log: {settings.runs / SWEEP_DIR}"
            outcomes.append(Outcome(run.spec.name, run.status, "failed", detail))
            continue
        outcomes.append(execute_run(run, settings, console))
    return outcomes


def print_summary(outcomes: Sequence[Outcome], console: Console) -> None:
    """One row per run: status before, result, time, and what failed."""
    table = Table(title="Sweep summary")
    for column in ("run", "before", "result", "time", "detail"):
        table.add_column(column)
    styles = {"ok": "green", "failed": "bold red", "skipped": "dim"}
    for outcome in outcomes:
        minutes = f"{outcome.seconds / 60:.1f} min" if outcome.seconds else "-"
        result = f"[{styles[outcome.result]}]{outcome.result}[/]"
        table.add_row(outcome.name, outcome.status, result, minutes, escape(outcome.detail))
    console.print(table)
    failed = sum(o.result == "failed" for o in outcomes)
    console.print(f"{len(outcomes)} runs: {len(outcomes) - failed} ok or skipped, {failed} failed")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description="Run the paper's 18 CLTs (cache, fit, evaluate), resumable.",
    )
    parser.add_argument(
        "--data-root", default=DEFAULT_DATA_ROOT, help="dataset roots: DIR/<dataset>"
    )
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="run folders: DIR/<run>")
    parser.add_argument("--devices", default=DEFAULT_DEVICES, help="--trainer.devices of clt fit")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run names to keep: fnmatch pattern or substring; repeat or comma-separate",
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="folder of the run configs")
    parser.add_argument("--clt", default=None, help="command that runs clt (default: the venv's)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Sweep settings from parsed arguments (shared with `experiments.sweep_agent`)."""
    clt = tuple(shlex.split(args.clt)) if args.clt else default_clt_command()
    return Settings(
        data_root=Path(args.data_root),
        runs=Path(args.runs),
        devices=str(args.devices),
        configs=Path(args.configs),
        clt=clt,
        max_epochs=args.max_epochs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: plan, then (unless --dry-run) execute and summarise; 1 if any run failed."""
    args = parse_args(argv)
    settings = settings_from_args(args)
    only = [p for item in args.only for p in item.split(",") if p]
    specs = grid(only)
    console = Console()
    if not specs:
        console.print(f"no run matches --only {only}", markup=False)
        return 2
    plan = build_plan(settings, specs)
    print_plan(plan, console)
    if args.dry_run:
        return 0
    outcomes = execute(plan, settings, console)
    print_summary(outcomes, console)
    return int(any(o.result == "failed" for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
