"""experiments/: the sweep's plan and execution (with a stand-in for `clt`) and the report."""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import paper_numbers as pn
from experiments import sweep, sweep_agent, tables

REPO_ROOT = Path(__file__).parents[2]
ALL_RUNS = [f"{d}_{b}_{s}" for d in pn.DATASETS for b in pn.BACKBONES for s in pn.SPARSIFIERS]

# A stand-in for `clt`: records its argv, fails `fit` for COCO runs, and makes `evaluate`
# write cascade.json where it is told to.
FAKE_CLT = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
with open(Path(__file__).with_name("calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
value = lambda flag: args[args.index(flag) + 1]
print("fake clt", args[0])
if args[0] == "fit" and "coco" in value("--config"):
    sys.exit(3)
if args[0] == "fit" and "evaluating_fit" in value("--config"):  # fit-end evaluation callback
    out = Path(value("--trainer.default_root_dir")) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text("{}")
    (out / "run.json").write_text("{}")
if args[0] == "evaluate":
    out = Path(value("--evaluation.output_dir"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text("{}")
    (out / "run.json").write_text("{}")
"""


def _write_configs(folder: Path) -> Path:
    """The 18 run configs, named like the real ones: B/32 reads a disk cache, B/16 is online."""
    folder.mkdir(parents=True)
    for name in ALL_RUNS:
        source = "cache" if "_b32_" in name else "online"
        (folder / f"{name}.yaml").write_text(f"data:\n  source: {source}\n")
    return folder


def _plan_lines(output: str, verb: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"clt {verb} ")]


def test_grid_filters_by_pattern_or_substring() -> None:
    assert [s.name for s in sweep.grid()] == ALL_RUNS
    assert [s.name for s in sweep.grid(["cifar100_b32_*"])] == ALL_RUNS[:3]
    assert len(sweep.grid(["b16"])) == 9
    assert [s.name for s in sweep.grid(["coco_b16_abs_topk", "*_jumprelu"])] == [
        n for n in ALL_RUNS if n.endswith("jumprelu") or n == "coco_b16_abs_topk"
    ]


def test_dry_run_plans_every_run_and_skips_or_resumes(tmp_path: Path, capsys) -> None:
    configs, runs = _write_configs(tmp_path / "configs"), tmp_path / "runs"
    (runs / "cifar100_b32_jumprelu").mkdir(parents=True)
    (runs / "cifar100_b32_jumprelu" / "FINISHED").write_text("{}")
    (runs / "coco_b16_abs_topk" / "evaluation").mkdir(parents=True)
    (runs / "coco_b16_abs_topk" / "evaluation" / "cascade.json").write_text("{}")
    (runs / "coco_b16_abs_topk" / "evaluation" / "run.json").write_text("{}")
    (runs / "coco_b32_jumprelu" / "evaluation").mkdir(parents=True)  # interrupted evaluation
    (runs / "coco_b32_jumprelu" / "evaluation" / "cascade.json").write_text("{}")
    ckpt = runs / "cifar100_b32_relu_topk" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")

    argv = ["--data-root", "/data", "--runs", str(runs), "--devices", "8", "--dry-run"]
    code = sweep.main([*argv, "--configs", str(configs), "--clt", "clt", "--max-epochs", "2"])
    out = capsys.readouterr().out

    assert code == 0
    for name in ALL_RUNS:
        assert name in out
    fits = _plan_lines(out, "fit")
    assert len(fits) == 16 and len(_plan_lines(out, "evaluate")) == 16
    assert not any("cifar100_b32_jumprelu" in f or "coco_b16_abs_topk" in f for f in fits)
    resumed = [f for f in fits if "cifar100_b32_relu_topk" in f]
    assert resumed == [
        f"clt fit --config {configs}/cifar100_b32_relu_topk.yaml --trainer.default_root_dir "
        f"{runs}/cifar100_b32_relu_topk --trainer.devices 8 --data.dataset.root "
        f"/data/cifar100 --trainer.max_epochs 2 --ckpt_path {ckpt}"
    ]
    assert sum("--ckpt_path" in f for f in fits) == 1
    evaluate = next(e for e in _plan_lines(out, "evaluate") if "imagenet100_b16_jumprelu" in e)
    assert evaluate.endswith("--data.dataset.root /data/imagenet100")
    assert f"--evaluation.output_dir {runs}/imagenet100_b16_jumprelu/evaluation" in evaluate
    # One cache per B/32 pair (their configs read a disk cache), none for the online B/16 ones.
    caches = _plan_lines(out, "cache")
    assert [shlex.split(c)[3].split("/")[-1] for c in caches] == [
        "cifar100_b32_relu_topk.yaml",
        "coco_b32_jumprelu.yaml",
        "imagenet100_b32_jumprelu.yaml",
    ]
    settings = sweep.Settings(data_root=Path("/data"), runs=runs, configs=configs, clt=("clt",))
    statuses = {p.spec.name: p.status for p in sweep.build_plan(settings, sweep.grid())}
    assert statuses["cifar100_b32_jumprelu"] == statuses["coco_b16_abs_topk"] == sweep.FINISHED
    assert statuses["cifar100_b32_relu_topk"] == sweep.RESUME
    assert statuses["coco_b32_jumprelu"] == sweep.NEW  # cascade.json without run.json
    assert sum(status == sweep.NEW for status in statuses.values()) == 15
    assert not (runs / sweep.SWEEP_DIR).exists()  # nothing ran


def test_sweep_continues_after_a_failure_and_skips_finished_runs(tmp_path: Path, capsys) -> None:
    configs, runs = _write_configs(tmp_path / "configs"), tmp_path / "runs"
    fake = tmp_path / "fake_clt.py"
    fake.write_text(FAKE_CLT)
    argv = ["--runs", str(runs), "--configs", str(configs), "--clt", f"{sys.executable} {fake}"]
    argv += ["--only", "coco_b32_jumprelu,cifar100_b32_jumprelu"]

    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    calls = [json.loads(line)[0] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    # cifar100: cache, fit, evaluate; coco (runs after cifar100): cache, fit fails, no evaluate.
    assert calls == ["cache", "fit", "evaluate", "cache", "fit"]
    assert (runs / "cifar100_b32_jumprelu" / "FINISHED").is_file()
    assert not (runs / "coco_b32_jumprelu" / "FINISHED").exists()
    assert "fit exited 3" in out and "Sweep summary" in out
    assert "fake clt fit" in (runs / "coco_b32_jumprelu" / "logs" / "fit.log").read_text()
    assert (runs / sweep.SWEEP_DIR / "cache_cifar100_b32.log").is_file()

    # A second sweep skips the finished run and retries the failed one.
    assert sweep.main(argv) == 1
    calls = [json.loads(line)[0] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls[5:] == ["cache", "fit"]


def test_sweep_skips_evaluate_when_fit_evaluated(tmp_path: Path) -> None:
    """The configs' fit-end evaluation callback writes evaluation/: no second `evaluate`."""
    configs, runs = _write_configs(tmp_path / "evaluating_fit"), tmp_path / "runs"
    fake = tmp_path / "fake_clt.py"
    fake.write_text(FAKE_CLT)
    argv = ["--runs", str(runs), "--configs", str(configs), "--clt", f"{sys.executable} {fake}"]
    assert sweep.main([*argv, "--only", "imagenet100_b16_jumprelu"]) == 0
    calls = [json.loads(line)[0] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls == ["fit"]
    assert (runs / "imagenet100_b16_jumprelu" / "FINISHED").is_file()


def test_sweep_agent_runs_one_cell(tmp_path: Path, capsys) -> None:
    configs, runs = _write_configs(tmp_path / "configs"), tmp_path / "runs"
    fake = tmp_path / "fake_clt.py"
    fake.write_text(FAKE_CLT)
    args = ["--dataset=imagenet100", "--backbone=b16", "--sparsifier=abs_topk"]
    args += ["--runs", str(runs), "--configs", str(configs), "--clt", f"{sys.executable} {fake}"]
    assert sweep_agent.main(args) == 0
    calls = [json.loads(line)[0] for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls == ["fit", "evaluate"]  # B/16 configs here are online: no cache step
    assert (runs / "imagenet100_b16_abs_topk" / "FINISHED").is_file()


def test_wandb_sweep_file_matches_the_grid() -> None:
    import yaml

    spec = yaml.safe_load((REPO_ROOT / "experiments" / "wandb_sweep.yaml").read_text())
    assert spec["method"] == "grid"
    assert spec["command"] == [
        "${env}",
        "${interpreter}",
        "-m",
        "experiments.sweep_agent",
        "${args}",
    ]
    params = spec["parameters"]
    assert params["dataset"]["values"] == list(pn.DATASETS)
    assert params["backbone"]["values"] == list(pn.BACKBONES)
    assert params["sparsifier"]["values"] == list(pn.SPARSIFIERS)


@pytest.mark.skipif(
    not (REPO_ROOT / "configs" / f"{ALL_RUNS[0]}.yaml").is_file(), reason="no configs"
)
def test_shipped_configs_exist_for_every_run() -> None:
    for name in ALL_RUNS:
        assert isinstance(sweep.config_uses_cache(REPO_ROOT / "configs" / f"{name}.yaml"), bool)


# ----------------------------------------------------------------------------- tables


def _write_run(runs: Path, name: str, top1: dict[str, list[float]], extra: bool = True) -> None:
    dataset, backbone, sparsifier = name.split("_", 2)
    folder = runs / name / "evaluation"
    folder.mkdir(parents=True)
    n_layers = 12

    def write(stem: str, data: dict) -> None:
        (folder / f"{stem}.json").write_text(json.dumps(data))

    write("run", {"run_name": name, "dataset": dataset, "backbone": backbone,
                  "sparsifier": sparsifier, "n_images": 500, "checkpoint": "last.ckpt"})  # fmt: skip
    modes = {m: {"starts": list(range(n_layers)), "top1": v, "top5": v} for m, v in top1.items()}
    write(
        "cascade", {"n_layers": n_layers, "baseline": {"top1": 61.0, "top5": 87.0}, "modes": modes}
    )
    curve = {"mse": [0.002] * n_layers, "r2": [0.8] * n_layers, "cosine": [0.9] * n_layers}
    write("reconstruction", {"all": curve, "cls": curve, "patches": curve})
    if extra:
        scores = np.triu(np.full((n_layers + 1, n_layers), 0.1))
        write("contributions", {"cls": scores.tolist(), "patches": scores.tolist()})
        write("faithfulness", {"rows": [{"window": "7-11", "start": 7, "mode": "cls",
              "delta_acc": 0.2, "flip_rate": 0.125, "kl": 0.05, "top1_agreement": 87.5,
              "top5_agreement": 86.0, "cosine": 0.97, "cka": 0.9, "spearman": 0.88,
              "prompt_r": 0.99, "prompt_kl": 0.04}]})  # fmt: skip
        write("ablations", {"k": 4, "rows": [{"mode": "cls", "baseline": 61.0,
              "all_sources": 60.5, "drop_top1": 57.0, "keep_topk": 60.0,
              "ranking": [0, 11, 1, 4, 3, 5, 6, 2, 7, 8, 10, 9]}]})  # fmt: skip


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["range"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report from two synthetic runs, one run with a malformed cascade and one broken folder."""
    root = tmp_path_factory.mktemp("tables")
    runs = root / "runs"
    ours_cls = [60.0 + 0.1 * s for s in range(12)]
    ours_patches = [40.0 + s for s in range(12)]
    _write_run(runs, "cifar100_b32_relu_topk", {"cls": ours_cls, "patches": ours_patches,
                                                "all": ours_patches})  # fmt: skip
    _write_run(runs, "coco_b16_abs_topk", {"patches": [30.0 + s for s in range(12)]}, extra=False)
    _write_run(runs, "imagenet100_b32_jumprelu", {"cls": [80.0] * 12}, extra=False)
    bad = runs / "imagenet100_b32_jumprelu" / "evaluation"
    (bad / "reconstruction.json").unlink()
    (bad / "cascade.json").write_text(
        json.dumps({"modes": {"cls": {"starts": [0, 1], "top1": [1.0]}}})
    )
    (runs / "broken" / "evaluation").mkdir(parents=True)
    (runs / "broken" / "evaluation" / "run.json").write_text("{not json")
    out = root / "out"
    assert tables.main(["--runs", str(runs), "--out", str(out)]) == 0
    return out


def test_cascade_tables_put_our_numbers_beside_the_papers(report: Path) -> None:
    cls = _csv_rows(report / "csv" / "cascade_cifar100_b32_cls.csv")
    assert list(cls) == [f"{s}→11" for s in range(12)] + ["baseline"]
    row = cls["0→11"]
    assert float(row["RTK paper"]) == pn.cascade_table("cifar100", "b32", "cls").rows[0][1] == 61.74
    assert float(row["RTK ours"]) == 60.0
    assert float(row["RTK Δ"]) == pytest.approx(60.0 - 61.74)
    assert float(row["JR paper"]) == 61.33 and row["JR ours"] == "" and row["JR Δ"] == ""
    assert float(row["ATK paper"]) == 61.43 and row["ATK ours"] == ""
    assert (
        float(cls["baseline"]["RTK paper"]) == 61.65 and float(cls["baseline"]["RTK ours"]) == 61.0
    )

    patches = _csv_rows(report / "csv" / "cascade_coco_b16_patches.csv")
    assert (
        float(patches["0→11"]["ATK paper"]) == 35.46 and float(patches["0→11"]["ATK ours"]) == 30.0
    )
    assert float(patches["11→11"]["ATK ours"]) == 41.0 and patches["11→11"]["RTK ours"] == ""
    coco_cls = _csv_rows(report / "csv" / "cascade_coco_b16_cls.csv")  # no cls numbers in that run
    assert coco_cls["3→11"]["ATK ours"] == "" and float(coco_cls["3→11"]["ATK paper"]) == 42.64
    untouched = _csv_rows(report / "csv" / "cascade_imagenet100_b32_all.csv")
    assert all(r["JR ours"] == r["RTK ours"] == r["ATK ours"] == "" for r in untouched.values())
    assert float(untouched["5→11"]["ATK paper"]) == 77.30

    markdown = (report / "paper_tables.md").read_text()
    assert "### Table 6. CIFAR-100, ViT-B/32, [CLS] tokens" in markdown
    assert "| 0→11 | 61.33 |  |  | 61.74 | 60.00 | **-1.74** | 61.43 |  |  |" in markdown
    assert "| 11→11 | 61.23 |  |  | 61.31 | 61.10 | -0.21 | 61.03 |  |  |" in markdown
    assert "### Table 23. ImageNet-100, ViT-B/16, all tokens" in markdown


def test_summary_baselines_and_problems(report: Path) -> None:
    with (report / "csv" / "summary.csv").open(newline="") as handle:
        summary = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(summary) == {
        "cifar100_b32_relu_topk",
        "coco_b16_abs_topk",
        "imagenet100_b32_jumprelu",
    }
    assert summary["imagenet100_b32_jumprelu"]["missing"].startswith("cascade")
    assert summary["imagenet100_b32_jumprelu"]["cls: mean abs diff"] == ""
    paper = pn.paper_top1("cifar100", "b32", "cls", "relu_topk")
    expected = np.mean([abs(60.0 + 0.1 * s - p) for s, p in enumerate(paper)])
    assert float(summary["cifar100_b32_relu_topk"]["cls: mean abs diff"]) == pytest.approx(expected)
    assert summary["coco_b16_abs_topk"]["missing"] == "faithfulness, contributions, ablations"
    with (report / "csv" / "baselines.csv").open(newline="") as handle:
        baselines = {(r["dataset"], r["backbone"]): r for r in csv.DictReader(handle)}
    assert float(baselines[("coco", "b16")]["paper"]) == 43.56
    assert float(baselines[("coco", "b16")]["ours"]) == 61.0
    assert baselines[("coco", "b32")]["ours"] == ""
    markdown = (report / "paper_tables.md").read_text()
    assert "## Problems" in markdown and "unreadable JSON" in markdown
    assert "cascade.json: modes.cls needs 'starts' and 'top1' of the same length" in markdown


def test_faithfulness_ablation_reconstruction_tables(report: Path) -> None:
    with (report / "csv" / "faithfulness.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sources = [(r["window"], r["tokens"], r["source"]) for r in rows]
    at = sources.index(("7-11", "cls", "paper"))
    assert sources[at + 1] == ("7-11", "cls", "ours cifar100_b32_relu_topk")
    assert float(rows[at]["flip_pct"]) == 9.5 and float(rows[at + 1]["flip_pct"]) == 12.5
    assert len(rows) == len(pn.FAITHFULNESS) + 1

    with (report / "csv" / "ablations.csv").open(newline="") as handle:
        ablations = list(csv.DictReader(handle))
    ours = next(r for r in ablations if r["run"] == "cifar100_b32_relu_topk")
    assert (ours["dataset"], ours["tokens"], float(ours["drop top-1 paper"])) == (
        "cifar100",
        "cls",
        59.91,
    )
    assert float(ours["drop Δ"]) == pytest.approx(57.0 - 59.91)
    assert ours["ranking ours"].startswith("0 11 1 4")

    with (report / "csv" / "reconstruction.csv").open(newline="") as handle:
        recon = {(r["dataset"], r["backbone"], r["sparsifier"]): r for r in csv.DictReader(handle)}
    row = recon[("cifar100", "b32", "relu_topk")]
    assert (float(row["R² paper"]), float(row["R² ours"])) == (0.910, 0.8)
    assert recon[("coco", "b16", "abs_topk")]["R² paper"] == ""
    assert recon[("imagenet100", "b16", "jumprelu")]["R² ours"] == ""


def test_figures_are_written(report: Path) -> None:
    names = {p.name for p in (report / "figures").glob("*.png")}
    assert names == {
        "cascade_cifar100_b32.png",
        "reconstruction_cifar100_b32.png",
        "contributions_cifar100_b32.png",  # Figures 11-16 layout
        "contributions_cifar100_b32_relu_topk.png",  # per run
        "cascade_coco_b16.png",
        "reconstruction_coco_b16.png",  # the COCO run has no contributions.json
    }
    for path in (report / "figures").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert "](figures/cascade_cifar100_b32.png)" in (report / "paper_tables.md").read_text()
