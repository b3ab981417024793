"""The benchmark runner: missing or failing benchmarks become error rows, targets are checked."""

from __future__ import annotations

import sys
import types

import pytest

from benchmarks import run as bench_run
from benchmarks import targets as bench_targets
from benchmarks.report import render


def test_missing_and_failing_benchmarks_become_error_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = bench_run._execute("does_not_exist", quick=True)
    assert "missing: benchmarks/bench_does_not_exist.py" in missing["error"]
    failing = types.ModuleType("benchmarks.bench_failing")
    failing.run = lambda quick: 1 / 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.bench_failing", failing)
    error = bench_run._execute("failing", quick=True)["error"]
    assert "ZeroDivisionError" in error
    fine = types.ModuleType("benchmarks.bench_fine")
    fine.run = lambda quick: [{"name": "fine", "quick": quick}]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fine", fine)
    assert bench_run._execute("fine", quick=True)["rows"] == [{"name": "fine", "quick": True}]


def step_rows(ratio: float, rel_diff: float) -> list[dict]:
    return [
        {"name": "train_step_relu_topk_dense", "tokens_per_s": 10.0, "ratio_vs_dense": 1.0},
        {
            "name": "train_step_relu_topk_sparse",
            "tokens_per_s": 10.0 * ratio,
            "ratio_vs_dense": ratio,
            "loss_rel_diff": rel_diff,
            "losses_equal": rel_diff <= 1e-5,
        },
    ]


def test_targets_follow_the_numbers() -> None:
    met = bench_targets.train_step_targets({"train_step": step_rows(5.2, 0.0)})
    assert [v.met for v in met] == [True, None, None]  # abs_topk, breakdown not measured
    assert bench_targets.train_step_targets({"train_step": step_rows(4.9, 0.0)})[0].met is False
    assert bench_targets.train_step_targets({"train_step": step_rows(6.0, 1e-3)})[0].met is False
    floors = [{"name": "breakdown_step_full", "ratio_vs_floors": 2.1}]
    verdict = bench_targets.train_step_targets({"train_step": step_rows(6.0, 0.0) + floors})[-1]
    assert verdict.met is False and "2.10x" in verdict.measured
    floors[0]["ratio_vs_floors"] = 1.9
    assert bench_targets.train_step_targets({"train_step": floors})[-1].met is True
    online = {
        "train_step": step_rows(6.0, 0.0),  # the sparse step consumes 60 tokens/s
        "online": [{"name": "online_ViT-B-32", "tokens_per_s": 54.0}],
    }
    bench_targets.annotate(online)
    (verdict,) = bench_targets.online_targets(online)
    assert verdict.met is False and "0.90x" in verdict.measured
    data = {"train_step": step_rows(4.0, 0.0), "data": [{"name": "d", "tokens_per_s": 250.0}]}
    (verdict,) = bench_targets.data_targets(data)
    assert verdict.met is True and "6.25x" in verdict.measured  # 250 / 40 tokens/s


def test_report_names_errors_and_machine() -> None:
    results = {
        "train_step": step_rows(3.5, 0.0),
        "retrieval": [{"name": "retrieval", "error": "stopped after 60 s"}],
    }
    bench_targets.annotate(results)
    info = bench_run.machine_info()
    report = render(results, {}, info, quick=False)
    assert "**Error**: stopped after 60 s" in report
    assert "**Failed or missing**: retrieval" in report
    assert info["cpu"] in report and info["torch"] in report
    assert "| train_step_relu_topk_sparse | 35 | 3.50x |" in report
    assert "same loss | 3.50x, loss rel. diff 0.0e+00 | **no** |" in report  # short of 5x


def test_only_reruns_named_benchmarks_and_keeps_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A full run stores every benchmark's rows next to the report; `--only b` replaces
    b's rows and re-renders the whole report from the store, each section dated."""
    calls: list[tuple[str, float]] = []
    value = {"a": 1.0, "b": 2.0}

    def fake_run_one(name: str, timeout: float, log_dir) -> dict:
        calls.append((name, timeout))
        return {"rows": [{"name": f"{name}_row", "speed": value[name]}], "wall_seconds": 1.0}

    revision = {"git": "rev1"}
    real_info = bench_run.machine_info()
    monkeypatch.setattr(bench_run, "BENCHMARKS", ("a", "b"))
    monkeypatch.setattr(bench_run, "_run_one", fake_run_one)
    monkeypatch.setattr(bench_run, "machine_info", lambda: {**real_info, **revision})
    monkeypatch.setitem(bench_run.BUDGET_S, "a", 11)
    out = tmp_path / "bench.md"
    assert bench_run.main(["--out", str(out)]) == 0
    assert calls == [("a", 11), ("b", bench_run.DEFAULT_BUDGET_S)]
    value["a"], value["b"], revision["git"] = 10.0, 20.0, "rev2"
    assert bench_run.main(["--only", "b", "--out", str(out)]) == 0
    assert calls[-1][0] == "b" and len(calls) == 3
    stored = bench_run.load_store(out.with_suffix(".json"))
    assert stored["a"]["rows"][0]["speed"] == 1.0  # kept from the first run
    assert stored["b"]["rows"][0]["speed"] == 20.0  # re-run
    report = out.read_text()
    assert "| a_row | 1 |" in report and "| b_row | 20 |" in report
    assert report.index("at git rev1") < report.index("at git rev2")  # per section
    out.write_text("stale")
    assert bench_run.main(["--render", "--out", str(out)]) == 0  # runs nothing
    assert len(calls) == 3 and "| b_row | 20 |" in out.read_text()
    (tmp_path / "bench.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a benchmark store"):
        bench_run.main(["--only", "b", "--out", str(out)])


def test_suite_target_needs_a_faster_shared_pass_with_the_same_numbers() -> None:
    def rows(ratio: float, same: bool) -> dict:
        return {
            "suite": [
                {"name": "suite_four_passes", "ratio": 1.0, "matches_four_passes": True},
                {"name": "suite_shared_pass", "ratio": ratio, "matches_four_passes": same},
            ]
        }

    assert bench_targets.suite_targets(rows(0.6, True))[0].met is True
    assert bench_targets.suite_targets(rows(1.1, True))[0].met is False
    (differ,) = bench_targets.suite_targets(rows(0.6, False))
    assert differ.met is False and "numbers differ" in differ.measured
    assert bench_targets.suite_targets({})[0].met is None
