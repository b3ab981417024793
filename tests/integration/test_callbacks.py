"""The evaluation and retrieval callbacks inside `clt fit`: files in the run folder, per-epoch
numbers in the CSV log and in an offline W&B run (read back from its files), the fit-end
evaluation equal to `clt evaluate`, and the switch that turns them off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.tiny_run import quiet_cli, read_metrics, write_config
from tests.integration.wandb_records import read_run

STEMS = ("cascade", "faithfulness", "contributions", "ablations", "reconstruction")


def callbacks(epoch_images: int = 6) -> list[dict]:
    return [
        {
            "class_path": "clt_lightning.callbacks.EvaluationCallback",
            "init_args": {
                "config": {"n_images": 8, "batch_size": 4, "ablation_k": 2},
                "every_n_epochs": 1,
                "epoch_n_images": epoch_images,
            },
        },
        {
            "class_path": "clt_lightning.callbacks.RetrievalCallback",
            "init_args": {"query_indices": [0, 1], "k": 2},
        },
    ]


def loggers(run: Path) -> list[dict]:
    return [
        {
            "class_path": "clt_lightning.loggers.ResumableCSVLogger",
            "init_args": {"save_dir": str(run), "name": "", "version": ""},
        },
        {
            "class_path": "clt_lightning.loggers.AutoWandbLogger",
            "init_args": {"save_dir": str(run), "name": "tiny", "offline": True},
        },
    ]


@pytest.fixture(scope="module")
def fitted(tiny_cache: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A 2-epoch tiny fit with both callbacks, the CSV log and an offline W&B run."""
    tmp = tmp_path_factory.mktemp("callbacks")
    run = tmp / "run"
    overrides = {"trainer.max_epochs": 2, "trainer.logger": loggers(run)}
    overrides["trainer.callbacks"] = callbacks()
    config = write_config(tmp / "run.yaml", tiny_cache, run, **overrides)
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 0, err
    return run, config


def _csv_eval_rows(run: Path, key: str) -> list[dict[str, str]]:
    return [r for r in read_metrics(run) if r.get(key)]


def test_per_epoch_and_final_keys_in_the_csv_log(fitted) -> None:
    run, _ = fitted
    for folder in ("evaluation", "evaluation/epoch_00", "evaluation/epoch_01"):
        assert (run / folder / "run.json").is_file()
        assert (run / folder / "contributions.png").is_file()
    per_epoch = _csv_eval_rows(run, "eval/epoch")
    assert [float(r["eval/epoch"]) for r in per_epoch] == [0.0, 1.0]
    for epoch, row in enumerate(per_epoch):
        cascade = json.loads((run / f"evaluation/epoch_{epoch:02d}/cascade.json").read_text())
        assert cascade["n_images"] == 6 and float(row["eval/n_images"]) == 6
        for mode in ("cls", "patches", "all"):
            for start, top1 in zip(
                cascade["modes"][mode]["starts"], cascade["modes"][mode]["top1"], strict=True
            ):
                assert float(row[f"eval/cascade_top1/{mode}/start_{start:02d}"]) == top1
        recon = json.loads((run / f"evaluation/epoch_{epoch:02d}/reconstruction.json").read_text())
        assert float(row["eval/reconstruction/r2/patches/layer_02"]) == recon["patches"]["r2"][2]
        assert float(row["eval/reconstruction/l0/all/layer_00"]) == recon["all"]["l0"][0]
        assert 0.0 <= float(row["eval/dead_fraction/layer_01"]) <= 1.0
        faithfulness = json.loads(
            (run / f"evaluation/epoch_{epoch:02d}/faithfulness.json").read_text()
        )
        first = faithfulness["rows"][0]
        key = f"eval/faithfulness/{first['mode']}/start_{first['start']:02d}/kl"
        assert float(row[key]) == first["kl"]
    (final,) = _csv_eval_rows(run, "eval_full/epoch")
    cascade = json.loads((run / "evaluation" / "cascade.json").read_text())
    assert cascade["n_images"] == 8
    assert float(final["eval_full/baseline_top1"]) == cascade["baseline"]["top1"]
    assert len(sorted((run / "retrieval").glob("retrieval_*.png"))) == 2


def test_per_epoch_keys_images_and_tables_in_the_offline_wandb_run(fitted) -> None:
    run, _ = fitted
    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    records = read_run(wandb_dir)
    history = [row for row in records["history"] if "eval/epoch" in row]
    assert [row["eval/epoch"] for row in history] == [0.0, 1.0]
    for epoch, row in enumerate(history):
        cascade = json.loads((run / f"evaluation/epoch_{epoch:02d}/cascade.json").read_text())
        assert row["eval/cascade_top1/patches/start_01"] == cascade["modes"]["patches"]["top1"][1]
        assert row["eval/figure/contributions"]["_type"] == "image-file"
        assert row["eval/table/faithfulness"]["_type"] == "table-file"
        assert row["eval/chart/cascade_top1_table"]["_type"] == "table-file"  # line chart data
    summary = records["summary"]
    final = json.loads((run / "evaluation" / "cascade.json").read_text())
    assert summary["eval_full/baseline_top1"] == final["baseline"]["top1"]
    assert summary["eval/epoch"] == 1.0
    assert summary["retrieval/grids/cls"]["count"] == 2
    media = wandb_dir / "files" / "media"
    contribution_images = sorted((media / "images" / "eval" / "figure").glob("contributions_*.png"))
    assert len(contribution_images) == 2  # one per epoch
    assert len(list((media / "images" / "retrieval" / "grids").glob("cls_*.png"))) == 2
    # the faithfulness Table of the last epoch holds faithfulness.json's rows
    last = history[-1]["eval/table/faithfulness"]["path"]
    table = json.loads((wandb_dir / "files" / last).read_text())
    rows = json.loads((run / "evaluation/epoch_01/faithfulness.json").read_text())["rows"]
    assert [r[table["columns"].index("window")] for r in table["data"]] == [
        r["window"] for r in rows
    ]
    assert len(list((media / "table" / "eval" / "table").glob("faithfulness_*.table.json"))) == 2
    chart_file = wandb_dir / "files" / history[-1]["eval/chart/cascade_top1_table"]["path"]
    chart = json.loads(chart_file.read_text())
    assert {row[1] for row in chart["data"]} == {"cls", "patches", "all", "baseline"}


def test_fit_end_evaluation_equals_clt_evaluate(fitted, tmp_path: Path) -> None:
    run, config = fitted
    out = tmp_path / "standalone"
    code, err = quiet_cli(
        [
            "evaluate",
            "--config",
            str(config),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--evaluation.output_dir",
            str(out),
            "--evaluation.n_images",
            "8",
            "--evaluation.batch_size",
            "4",
            "--evaluation.ablation_k",
            "2",
        ]
    )
    assert code == 0, err
    for stem in STEMS:
        callback = json.loads((run / "evaluation" / f"{stem}.json").read_text())
        standalone = json.loads((out / f"{stem}.json").read_text())
        assert callback == standalone, stem


def test_callbacks_switched_off_from_the_command_line(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = {"trainer.max_epochs": 1, "trainer.callbacks": callbacks()}
    config = write_config(tmp_path / "run.yaml", tiny_cache, run, **overrides)
    code, err = quiet_cli(["fit", "--config", str(config), "--trainer.callbacks", "[]"])
    assert code == 0, err
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not (run / "evaluation").exists() and not (run / "retrieval").exists()
    assert not any(k.startswith("eval") for r in read_metrics(run) for k in r if r[k])


def test_dashboard_picture_is_drawn_from_the_logged_data(fitted, tmp_path: Path) -> None:
    from experiments.logged_figures import dashboard_figure, eval_history, training_curves

    run, _ = fitted
    history = eval_history(run)
    assert [r["eval/epoch"] for r in history] == [0.0, 1.0]
    fig = dashboard_figure(run, tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("eval/chart/cascade_top1") for t in titles)
    assert any(t.startswith("eval/figure/contributions") for t in titles)
    cascade = json.loads((run / "evaluation/epoch_01/cascade.json").read_text())
    (first,) = [ax for ax in fig.axes if ax.get_title().startswith("eval/chart/cascade_top1")]
    drawn = {line.get_label(): list(line.get_ydata()) for line in first.get_lines()}
    assert drawn["patches"] == cascade["modes"]["patches"]["top1"]
    curves = training_curves({"tiny": history}, None)
    (line,) = [ln for ln in curves.axes[3].get_lines() if ln.get_label() == "tiny"]
    assert list(line.get_ydata()) == [r["eval/reconstruction/r2/all/mean"] for r in history]
