"""Benchmark suite: run the benchmarks and write the report, docs/benchmarks.md.

Usage::

    python -m benchmarks.run [--quick] [--only NAME[,NAME...]] [--render] [--out PATH]

``make bench`` runs the full suite (each benchmark within its own time budget,
`BUDGET_S`; about 40 minutes in all on the project's shared 2-core machine) and writes
``docs/benchmarks.md``; ``make bench BENCH_ARGS="--only decode,online"`` re-runs some
benchmarks and re-renders the whole report; ``make bench-quick`` passes ``--quick``: tiny
shapes that only check that every benchmark runs, reported to a temporary file (its path
is printed), never to ``docs/``; ``--render`` runs nothing and re-renders the report from
the stored rows (after editing the prose or the targets here).

Design decisions:

- Every benchmark is a module ``benchmarks/bench_{name}.py`` with ``run(quick) ->
  list[dict]`` (one dict per row). Each runs in its own subprocess (``--worker``): a crash,
  an out-of-memory kill, a timeout or a missing module becomes an error row instead of
  ending the suite, memory and thread settings do not leak from one benchmark into the
  next, and each gets its own peak-RSS reading. (``--quick`` runs them in-process.) The exit status is 1 if any benchmark
  failed or is missing (after the report is written).
- Raw rows are kept next to the report (``docs/benchmarks.json``: per benchmark its rows,
  run facts, date, git revision and machine). A full run replaces the file; ``--only``
  replaces the named benchmarks' entries and keeps the others, then renders the report
  from all stored entries, each section stating when, at which revision and on which
  machine it was measured. Cross-benchmark ratios (``data`` and ``online`` against the
  training step) then compare sections of possibly different runs; the dates say so.
- Ratios, not absolute speeds: every table compares against a baseline measured in the
  same run, because the project's machines are shared (load 4-8 on 2 cores) and absolute
  numbers vary several-fold from one run to the next; ratios of interleaved measurements
  vary much less. The machine, the load and the settings are written with the tables.
- The report's prose (what each benchmark measures, its columns: `benchmarks.specs`) lives
  in code next to the code that checks the targets (`benchmarks.targets`), so that the
  generated file (`benchmarks.report`) never needs editing by hand. This module runs the
  benchmarks and keeps the store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import render
from benchmarks.targets import annotate
from clt_lightning.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
BUDGET_S = {
    "train_step": 600,
    "memory": 240,
    "batch_size": 900,
    "decode": 300,
    "online": 420,
    "cache": 240,
    "data": 180,
    "cascade": 180,
    "retrieval": 420,
}
"""Seconds each benchmark's worker may run (about twice what it took on the project's
loaded 2-core machine); one that runs over is stopped and reported as an error row."""
DEFAULT_BUDGET_S = 300
"""Budget of a benchmark that `BUDGET_S` does not name."""


BENCHMARKS = (
    "train_step",
    "memory",
    "batch_size",
    "online",
    "cache",
    "data",
    "cascade",
    "suite",
    "features",
    "decode",
    "retrieval",
)
"""Every benchmark of the suite, in the order they run: those with targets first, so that
they get the suite's time budget first."""


def _execute(name: str, quick: bool) -> dict[str, Any]:
    """Import ``benchmarks.bench_{name}`` and run it; return its rows or its error."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    payload: dict[str, Any]
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        payload = {"rows": module.run(quick=quick)}
    except ModuleNotFoundError as err:
        if err.name != f"benchmarks.bench_{name}":
            payload = {"error": _short_traceback()}
        else:
            payload = {"error": f"missing: benchmarks/bench_{name}.py does not exist"}
    except Exception:  # noqa: BLE001 - any failure becomes an error row
        payload = {"error": _short_traceback()}
    payload["wall_seconds"] = time.perf_counter() - start
    payload["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    payload["load"] = (load_before, os.getloadavg()[0])
    return payload


def _worker(name: str, quick: bool, result_path: Path) -> int:
    """Subprocess side of `_run_one`: run one benchmark, write the payload as JSON."""
    payload = _execute(name, quick)
    result_path.write_text(json.dumps(payload, default=str))
    return 0 if "rows" in payload else 1


def _short_traceback(lines: int = 6) -> str:
    return " | ".join(traceback.format_exc().strip().splitlines()[-lines:])


def _run_one(name: str, timeout: float, log_dir: Path) -> dict[str, Any]:
    """Run `name` (full size) in a subprocess stopped after `timeout` seconds; return its
    payload (rows or error) plus run facts."""
    result_path = log_dir / f"{name}.json"
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", name, "--result", str(result_path)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    payload: dict[str, Any] = {}
    if result_path.exists():
        payload = json.loads(result_path.read_text())
    if code is None:
        payload = {"error": f"stopped after {timeout:.0f} s, its budget (run.BUDGET_S)"}
    elif "rows" not in payload and "error" not in payload:
        tail = " | ".join(log_path.read_text().strip().splitlines()[-4:])
        payload = {"error": f"worker exited with status {code}: {tail}"}
    payload["wall_seconds"] = time.perf_counter() - start  # with the interpreter start
    payload["load"] = (load_before, os.getloadavg()[0])
    return payload


def machine_info() -> dict[str, Any]:
    """The machine, software and time of this run (for the report)."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": mem_kb / 2**20,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "default_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git_revision(),
    }


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.run``; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check that all run")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--out", type=Path, default=None, help="report path")
    parser.add_argument(
        "--render", action="store_true", help="run nothing: re-render the report from the store"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.quick, args.result)
    names = BENCHMARKS if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
    info = machine_info()
    out = args.out
    if out is None:
        quick_out = tempfile.mkstemp(prefix="benchmarks-quick-", suffix=".md")[1]
        out = Path(quick_out) if args.quick else DEFAULT_OUT
    store_path = out.with_suffix(".json")
    keep = args.render or args.only is not None
    stored = load_store(store_path) if keep and not args.quick else {}
    fresh = {} if args.render else run_benchmarks(names, args.quick, info)
    stored.update(fresh)
    ordered = {n: stored[n] for n in (*BENCHMARKS, *stored) if n in stored}
    results = {name: entry["rows"] for name, entry in ordered.items()}
    facts = {name: entry["facts"] for name, entry in ordered.items()}
    annotate(results)
    report = render(results, facts, info, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        atomic_write_text(store_path, json.dumps(ordered, indent=1, default=str) + "\n")
    atomic_write_text(out, report)
    print(f"[bench] report written to {out}")
    if args.quick:
        print(report)
    failed = [n for n, rows in results.items() if n in fresh and any("error" in r for r in rows)]
    return 1 if failed else 0


def run_benchmarks(names: Sequence[str], quick: bool, info: dict) -> dict[str, dict]:
    """Run ``names``; return ``{name: {"rows": [...], "facts": {...}}}`` with the run's date,
    git revision and machine in the facts."""
    entries: dict[str, dict] = {}
    machine = {key: info[key] for key in ("cpu", "cores", "memory_gib", "torch", "cuda")}
    with tempfile.TemporaryDirectory(prefix="clt-bench-") as tmp:
        for name in names:
            budget = BUDGET_S.get(name, DEFAULT_BUDGET_S)
            print(f"[bench] {name} (budget {budget} s) ...", flush=True)
            # Quick runs share this process (a smoke test: one interpreter start instead
            # of one per benchmark); full runs isolate every benchmark in a subprocess.
            payload = _execute(name, True) if quick else _run_one(name, budget, Path(tmp))
            rows = payload.get("rows") or []
            if "error" in payload:
                rows = [*rows, {"name": name, "error": payload["error"]}]
            facts = {k: v for k, v in payload.items() if k != "rows"}
            facts |= {"date": info["date"], "git": info["git"], "machine": machine}
            entries[name] = {"rows": rows, "facts": facts}
            status = "FAILED: " + payload["error"] if "error" in payload else "ok"
            print(f"[bench] {name}: {status} ({payload['wall_seconds']:.0f} s)", flush=True)
    return entries


def load_store(path: Path) -> dict[str, dict]:
    """The stored entries of an earlier run (``{}`` if there is none).

    Raises:
        SystemExit: If the file exists but is not a store this runner wrote.
    """
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        if not all({"rows", "facts"} <= set(entry) for entry in stored.values()):
            raise ValueError("an entry lacks 'rows' or 'facts'")
    except (ValueError, AttributeError, OSError) as err:
        raise SystemExit(
            f"{path}: not a benchmark store ({err}); delete it and run the full suite"
        ) from err
    return stored


if __name__ == "__main__":
    sys.exit(main())
