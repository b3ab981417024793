"""The evaluation and retrieval callbacks inside `clt fit`: files in the run folder, numbers
in the loggers (CSV here; W&B offline takes the same calls plus tables and images)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.tiny_run import quiet_cli, read_metrics, write_config


def test_fit_with_evaluation_and_retrieval_callbacks(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    callbacks = [
        {
            "class_path": "clt_lightning.callbacks.EvaluationCallback",
            "init_args": {"config": {"n_images": 8, "batch_size": 4}, "every_n_epochs": 1},
        },
        {
            "class_path": "clt_lightning.callbacks.RetrievalCallback",
            "init_args": {"query_indices": [0, 1], "k": 2},
        },
    ]
    config = write_config(tmp_path / "run.yaml", tiny_cache, run, **{"trainer.max_epochs": 1})
    code, err = quiet_cli(
        ["fit", "--config", str(config), "--trainer.callbacks", json.dumps(callbacks)]
    )
    assert code == 0, err
    # at fit end and after the (only) validation epoch
    for folder in (run / "evaluation", run / "evaluation" / "epoch_00"):
        assert (folder / "run.json").is_file()
        assert (folder / "contributions.png").is_file()
    cascade = json.loads((run / "evaluation" / "cascade.json").read_text())
    rows = read_metrics(run)
    logged = {k: float(r[k]) for r in rows for k in r if k.startswith("eval/") and r[k]}
    assert logged["eval/baseline_top1"] == cascade["baseline"]["top1"]
    last = cascade["n_layers"] - 1
    assert (
        logged[f"eval/cascade_top1/cls/start_{last:02d}"] == cascade["modes"]["cls"]["top1"][last]
    )
    grids = sorted((run / "retrieval").glob("retrieval_*.png"))
    assert len(grids) == 2
