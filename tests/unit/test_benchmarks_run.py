"""The benchmark runner: missing or failing benchmarks become error rows, targets are checked."""

from __future__ import annotations

import sys
import types

import pytest

from benchmarks import run as bench_run


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
    met = bench_run._train_step_targets({"train_step": step_rows(3.2, 0.0)})
    assert [v.met for v in met] == [True, None]  # abs_topk was not measured
    assert bench_run._train_step_targets({"train_step": step_rows(2.9, 0.0)})[0].met is False
    assert bench_run._train_step_targets({"train_step": step_rows(4.0, 1e-3)})[0].met is False
    data = {"train_step": step_rows(4.0, 0.0), "data": [{"name": "d", "tokens_per_s": 250.0}]}
    (verdict,) = bench_run._data_targets(data)
    assert verdict.met is True and "6.25x" in verdict.measured  # 250 / 40 tokens/s


def test_report_names_errors_and_machine() -> None:
    results = {
        "train_step": step_rows(3.5, 0.0),
        "retrieval": [{"name": "retrieval", "error": "stopped after 60 s"}],
    }
    bench_run.annotate(results)
    info = bench_run.machine_info()
    report = bench_run.render(results, {}, info, quick=False)
    assert "**Error**: stopped after 60 s" in report
    assert "**Failed or missing**: retrieval" in report
    assert info["cpu"] in report and info["torch"] in report
    assert "| train_step_relu_topk_sparse | 35 | 3.50x |" in report


def test_suite_target_needs_a_faster_shared_pass_with_the_same_numbers() -> None:
    def rows(ratio: float, same: bool) -> dict:
        return {
            "suite": [
                {"name": "suite_four_passes", "ratio": 1.0, "matches_four_passes": True},
                {"name": "suite_shared_pass", "ratio": ratio, "matches_four_passes": same},
            ]
        }

    assert bench_run._suite_targets(rows(0.6, True))[0].met is True
    assert bench_run._suite_targets(rows(1.1, True))[0].met is False
    (differ,) = bench_run._suite_targets(rows(0.6, False))
    assert differ.met is False and "numbers differ" in differ.measured
    assert bench_run._suite_targets({})[0].met is None
