"""Read finished run folders: `<runs>/<run>/evaluation/*.json`, written by `clt evaluate`.

The folder layout is a fixed contract (one folder per run, named
`{dataset}_{backbone}_{sparsifier}`, but the identity is read from `run.json`):

- `run.json`: run_name, dataset, backbone, sparsifier, n_images, checkpoint.
- `cascade.json`: n_layers, baseline {top1, top5}, modes {cls|patches|all: {starts, top1, top5}}.
- `faithfulness.json`: rows [{window, start, mode, delta_acc, flip_rate, kl, ...}].
- `contributions.json`: {cls, patches}: [L + 1 rows (sources, then bias)] x [L targets].
- `reconstruction.json`: {all|cls|patches: {mse, r2, cosine}: [L]}.
- `ablations.json`: k, rows [{mode, baseline, all_sources, drop_top1, keep_topk, ranking}].

Only `run.json` is required; every other file may be missing (an evaluation that is still
running, or one that skipped a part), and the report leaves the matching cells blank.
A file that does not parse, or whose shape is wrong (cascade lists of unequal length,
ragged contribution matrices, rows that are not objects), is reported as a problem and
treated as missing, so one broken run never hides the others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"
OPTIONAL_FILES: tuple[str, ...] = (
    "cascade",
    "faithfulness",
    "contributions",
    "reconstruction",
    "ablations",
)
_REQUIRED_RUN_KEYS: tuple[str, ...] = ("dataset", "backbone", "sparsifier")


@dataclass
class RunResult:
    """Everything `clt evaluate` wrote for one run; missing files are None.

    Attributes:
        name: `run_name` from run.json (the folder name when absent).
        dataset: Dataset name, e.g. `cifar100`.
        backbone: Backbone name, e.g. `b32`.
        sparsifier: Sparsifier name, e.g. `relu_topk`.
        n_images: Number of evaluation images (None when not recorded).
        path: The run folder.
        cascade: Parsed cascade.json.
        faithfulness: Parsed faithfulness.json.
        contributions: Parsed contributions.json.
        reconstruction: Parsed reconstruction.json.
        ablations: Parsed ablations.json.
    """

    name: str
    dataset: str
    backbone: str
    sparsifier: str
    n_images: int | None
    path: Path
    cascade: dict[str, Any] | None = None
    faithfulness: dict[str, Any] | None = None
    contributions: dict[str, Any] | None = None
    reconstruction: dict[str, Any] | None = None
    ablations: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """(dataset, backbone, sparsifier)."""
        return (self.dataset, self.backbone, self.sparsifier)

    def top1(self, mode: str) -> dict[int, float]:
        """Cascaded replacement top-1 (%) by start layer s for a token mode ({} if absent).

        Args:
            mode: `cls`, `patches` or `all`.
        """
        entry = ((self.cascade or {}).get("modes") or {}).get(mode)
        if not entry:
            return {}
        return {int(s): float(v) for s, v in zip(entry["starts"], entry["top1"], strict=True)}

    def baseline_top1(self) -> float | None:
        """The frozen teacher's top-1 (%) on this run's evaluation set."""
        baseline = (self.cascade or {}).get("baseline") or {}
        return None if baseline.get("top1") is None else float(baseline["top1"])

    def n_layers(self) -> int | None:
        """Number of teacher layers, from cascade.json (None when absent)."""
        value = (self.cascade or {}).get("n_layers")
        return None if value is None else int(value)


@dataclass
class LoadedRuns:
    """The runs found under a folder, and what could not be read.

    Attributes:
        runs: One entry per (dataset, backbone, sparsifier), sorted by name.
        problems: Human-readable lines: unreadable files, duplicates, bad run.json.
    """

    runs: list[RunResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def get(self, dataset: str, backbone: str, sparsifier: str) -> RunResult | None:
        """The run for (dataset, backbone, sparsifier), or None."""
        for run in self.runs:
            if run.key == (dataset, backbone, sparsifier):
                return run
        return None


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        problems.append(f"{path}: unreadable JSON ({error}); treated as missing")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object, got {type(data).__name__}")
        return None
    return data


def load_run(run_dir: Path, problems: list[str]) -> RunResult | None:
    """Read one run folder; None (with a problem line) when its run.json is missing or bad.

    Args:
        run_dir: `<runs>/<run>`.
        problems: Where to append what went wrong.
    """
    evaluation = run_dir / EVALUATION_DIR
    meta = _read_json(evaluation / "run.json", problems)
    if meta is None:
        return None
    missing = [key for key in _REQUIRED_RUN_KEYS if not meta.get(key)]
    if missing:
        problems.append(f"{evaluation / 'run.json'}: missing {', '.join(missing)}; run skipped")
        return None
    files = {name: _read_json(evaluation / f"{name}.json", problems) for name in OPTIONAL_FILES}
    for name, check in _CHECKS.items():
        error = check(files[name]) if files[name] is not None else None
        if error:
            problems.append(f"{evaluation / name}.json: {error}; treated as missing")
            files[name] = None
    n_images = meta.get("n_images")
    return RunResult(
        name=str(meta.get("run_name") or run_dir.name),
        dataset=str(meta["dataset"]),
        backbone=str(meta["backbone"]),
        sparsifier=str(meta["sparsifier"]),
        n_images=None if n_images is None else int(n_images),
        path=run_dir,
        **files,
    )


def _check_cascade(data: dict[str, Any]) -> str | None:
    for mode, entry in (data.get("modes") or {}).items():
        if not isinstance(entry, dict) or len(entry.get("starts", [])) != len(
            entry.get("top1", [])
        ):
            return f"modes.{mode} needs 'starts' and 'top1' of the same length"
    return None


def _check_matrices(data: dict[str, Any]) -> str | None:
    for mode, rows in data.items():
        if (
            not isinstance(rows, list)
            or len({len(r) if isinstance(r, list) else -1 for r in rows}) > 1
        ):
            return f"{mode} must be a list of equally long rows"
    return None


def _check_rows(data: dict[str, Any]) -> str | None:
    rows = data.get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return "'rows' must be a list of objects"
    return None


_CHECKS = {
    "cascade": _check_cascade,
    "contributions": _check_matrices,
    "faithfulness": _check_rows,
    "ablations": _check_rows,
}


def load_runs(runs_dir: str | Path) -> LoadedRuns:
    """Read every `<runs_dir>/*/evaluation/run.json` run.

    Two folders for the same (dataset, backbone, sparsifier) keep the one whose evaluation
    was written last, and the other is listed as a problem.

    Args:
        runs_dir: The sweep's runs folder (a missing folder gives no runs and one problem).
    """
    loaded = LoadedRuns()
    root = Path(runs_dir)
    if not root.is_dir():
        loaded.problems.append(f"{root}: no such runs folder")
        return loaded
    by_key: dict[tuple[str, str, str], RunResult] = {}
    for run_dir in sorted(p for p in root.iterdir() if (p / EVALUATION_DIR).is_dir()):
        run = load_run(run_dir, loaded.problems)
        if run is None:
            continue
        previous = by_key.get(run.key)
        if previous is not None:
            keep, drop = sorted((previous, run), key=_evaluation_mtime, reverse=True)
            loaded.problems.append(
                f"{drop.path} and {keep.path} are both {run.key}; using {keep.path}"
            )
            run = keep
        by_key[run.key] = run
    loaded.runs = sorted(by_key.values(), key=lambda r: r.name)
    log.info("found %d runs under %s", len(loaded.runs), root)
    return loaded


def _evaluation_mtime(run: RunResult) -> float:
    return (run.path / EVALUATION_DIR / "run.json").stat().st_mtime
