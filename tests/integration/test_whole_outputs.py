"""Multi-file outputs are committed as a unit, and `last.ckpt` is always the run's latest.

Issue 12, kinds 1 and 8. Exports, evaluation folders and retrieval index folders are
written into a hidden sibling folder and swapped in (`files.commit_folder`): a real `clt`
child process is SIGKILLed half-way through re-writing each of them, and the folder must
then be byte-identical to the previous output (and load); a rerun gives the new one. A new
`clt fit` into a run folder that holds checkpoints is refused (or resumes, or starts over
with `--checkpoint.overwrite true`), never leaving a stale `last.ckpt`.

`CASES` collects what ran (printed by `test_report_whole_outputs` with `-s`).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clt_lightning.errors import CheckpointMismatchError, ConfigError
from clt_lightning.models.clt import CrossLayerTranscoder
from tests.integration.tiny_run import kill, quiet_cli, spawn_clt, wait_for, write_config

CASES: list[str] = []

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def run_ok(args: list[str]) -> None:
    code, err = quiet_cli(args)
    assert code == 0, err[-3000:]


def kill_at(args: list[str], pause: str, tmp_path: Path) -> None:
    """Run `clt <args>` in a child process, SIGKILL it at the pause point."""
    marker, log = tmp_path / f"paused_{pause}", tmp_path / f"{pause}.log"
    child = spawn_clt(args, log, pause=pause, marker=marker)
    try:
        wait_for(marker.exists, child, log)
    finally:
        assert kill(child) == -signal.SIGKILL


def same_weights(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def same_export(a: Path, b: Path) -> bool:
    configs = [json.loads((f / "config.json").read_text()) for f in (a, b)]
    for config in configs:
        config.pop("weights_sha256", None)
    tensors = [load_file(f / "clt.safetensors") for f in (a, b)]
    return (
        configs[0] == configs[1]
        and tensors[0].keys() == tensors[1].keys()
        and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    )


# ----------------------------------------------------------------------------- exports
@pytest.mark.parametrize("pause", ["export_after_weights", "between_folder_renames"])
def test_killed_re_export_leaves_the_old_export(pause, two_runs, tiny_cache, tmp_path):
    """Export A, then re-export B into the same folder and SIGKILL the child once B's
    clt.safetensors is written (or between the two renames of the swap): the folder is
    export A, byte for byte, and loads as A; the rerun gives B, with nothing left over."""
    a, b = two_runs
    config = str(write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run"))
    out, reference = tmp_path / "export", tmp_path / "export_b"
    run_ok(["export", "--config", config, "--ckpt_path", str(a), "--output_dir", str(out)])
    run_ok(["export", "--config", config, "--ckpt_path", str(b), "--output_dir", str(reference)])
    export_a = tree(out)
    assert not same_export(out, reference)  # different weights, same shapes
    kill_at(["export", "--config", config, "--ckpt_path", str(b), "--output_dir", str(out)],
            pause, tmp_path)  # fmt: skip
    loaded = CrossLayerTranscoder.from_pretrained(out)  # recovers a half-done swap
    assert tree(out) == export_a
    old = CrossLayerTranscoder.from_pretrained(tmp_path / "export")
    assert same_weights(loaded, old)
    run_ok(["export", "--config", config, "--ckpt_path", str(b), "--output_dir", str(out)])
    assert same_export(out, reference)  # (safetensors orders its metadata at random)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    CASES.append(f"export: SIGKILL while re-exporting ({pause}) -> old export whole")


def test_mixed_export_folder_is_refused(two_runs, tiny_cache, tmp_path):
    """An export's config.json with another export's weights (same shapes) is refused."""
    a, b = two_runs
    config = str(write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run"))
    for name, ckpt in (("a", a), ("b", b)):
        run_ok(["export", "--config", config, "--ckpt_path", str(ckpt),
                "--output_dir", str(tmp_path / name)])  # fmt: skip
    shutil.copy(tmp_path / "b" / "clt.safetensors", tmp_path / "a" / "clt.safetensors")
    with pytest.raises(CheckpointMismatchError, match="sha256 differs.*mixes two exports"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "a")
    CASES.append("export: config.json of one export with the weights of another -> refused")


def test_export_into_a_folder_of_other_files_is_refused(two_runs, tiny_cache, tmp_path):
    config = str(write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run"))
    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("mine")
    code, err = quiet_cli(["export", "--config", config, "--ckpt_path", str(two_runs[0]),
                           "--output_dir", str(out)])  # fmt: skip
    assert code == 2 and "README.md" in err and "new or empty folder" in err, err[-2000:]
    assert [p.name for p in out.iterdir()] == ["README.md"]
    CASES.append("export: into a folder holding other files -> refused, nothing deleted")


# ------------------------------------------------------------------ evaluation, retrieval
def test_killed_re_evaluation_leaves_the_old_results(two_runs, tiny_cache, tmp_path):
    a, b = two_runs
    config = str(write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run"))
    out = tmp_path / "evaluation"

    def args(ckpt: Path) -> list[str]:
        return ["evaluate", "--config", config, "--ckpt_path", str(ckpt),
                "--evaluation.n_images", "4", "--evaluation.figures", "false",
                "--evaluation.classifier_cache", str(tmp_path / "classifiers"),
                "--evaluation.output_dir", str(out)]  # fmt: skip

    run_ok(args(a))
    before = tree(out)
    assert json.loads(before["run.json"])["checkpoint"] == str(a)
    kill_at(args(b), "evaluate_after_1_file", tmp_path)
    assert tree(out) == before  # the old evaluation, whole (old code: run.json deleted)
    run_ok(args(b))
    assert json.loads((out / "run.json").read_text())["checkpoint"] == str(b)
    assert not (tmp_path / ".evaluation.partial").exists()
    CASES.append("evaluate: SIGKILL while re-evaluating -> old results whole")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "last.ckpt").write_text("a checkpoint")
    code, err = quiet_cli([*args(b)[:-1], str(tmp_path / "run")])
    assert code == 2 and "last.ckpt" in err and "new or empty folder" in err, err[-2000:]
    CASES.append("evaluate: output_dir holding other files (a run folder) -> refused")


def test_killed_index_rebuild_leaves_the_old_index(two_runs, tiny_cache, tmp_path):
    a, b = two_runs
    config = str(write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run"))
    out = tmp_path / "retrieval"
    index = out / "index_cls"

    def args(ckpt: Path) -> list[str]:
        return ["retrieve", "--config", config, "--ckpt_path", str(ckpt), "--retrieval.output_dir",
                str(out), "--retrieval.query_index", "1", "--retrieval.rebuild", "true"]  # fmt: skip

    run_ok(args(a))
    before = tree(index)
    kill_at(args(b), "retrieve_after_1_index", tmp_path)
    assert tree(index) == before  # old code: its manifest was deleted first
    run_ok(args(a)[:-2])  # reused (not rebuilt): the old index is whole and matches A
    assert tree(index) == before
    run_ok(args(b))
    assert tree(index) != before and not (out / ".index_cls.partial").exists()
    CASES.append("retrieve: SIGKILL while rebuilding the index -> old index whole and reused")


# ----------------------------------------------------------------------------- last.ckpt
def test_new_fit_over_a_run_is_refused_or_overwrites(tiny_cache, tmp_path):
    """The issue's example: fit 3 steps, then the same with another lr. Old code: the new
    model went to last-v1.ckpt and last.ckpt kept the old weights."""
    run = tmp_path / "run"
    config = str(write_config(tmp_path / "run.yaml", tiny_cache, run))
    last = run / "checkpoints" / "last.ckpt"
    run_ok(["fit", "--config", config, "--trainer.max_steps", "3"])
    saved = {p.name: p.read_bytes() for p in (last, run / "config.yaml")}
    code, err = quiet_cli(["fit", "--config", config, "--trainer.max_steps", "3",
                           "--model.lr", "1e-4"])  # fmt: skip
    assert code == 2, err[-2000:]
    assert (
        "--ckpt_path last" in err
        and "--checkpoint.overwrite true" in err
        and "Traceback" not in err
    )
    assert {p.name: p.read_bytes() for p in (last, run / "config.yaml")} == saved  # untouched
    CASES.append("fit: new fit into a run folder with last.ckpt -> refused, run untouched")

    run_ok(["fit", "--config", config, "--trainer.max_steps", "3", "--model.lr", "1e-4",
            "--checkpoint.overwrite", "true"])  # fmt: skip
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["hyper_parameters"]["lr"] == 1e-4 and checkpoint["global_step"] == 3
    CASES.append("fit: --checkpoint.overwrite true -> last.ckpt is the new run's")

    run_ok(["fit", "--config", config, "--trainer.max_steps", "5", "--model.lr", "1e-4",
            "--ckpt_path", "last"])  # fmt: skip
    assert torch.load(last, weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    CASES.append("fit: --ckpt_path last over the run -> resumes into last.ckpt")


def test_trainer_from_python_refuses_a_stale_last_ckpt(tmp_path):
    """The same rule without the CLI: CLTCheckpoint checks at on_fit_start."""
    from clt_lightning.checkpointing import CLTCheckpoint
    from clt_lightning.models.sparsifiers import SparsifierConfig
    from clt_lightning.module import CLTModule
    from tests.unit.test_module import PlantedData, make_trainer

    def fit(overwrite: bool = False) -> None:
        trainer = make_trainer(tmp_path, max_steps=2, accelerator="cpu",
                               callbacks=[CLTCheckpoint(dirpath=str(tmp_path / "ckpt"),
                                                        overwrite=overwrite)])  # fmt: skip
        model = CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="relu_topk", k=4))
        trainer.fit(model, PlantedData(n_train=2))

    fit()
    with pytest.raises(ConfigError, match="already holds checkpoints of a run"):
        fit()
    fit(overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    CASES.append("Trainer (Python): new fit over last.ckpt -> refused; overwrite=True replaces")


def test_report_whole_outputs():
    print(f"\nwhole-output and last.ckpt cases handled: {len(CASES)}")
    for case in CASES:
        print(f"  - {case}")
