"""Checkpoints are checked after the safe load, on every path that reads one (issue 12, kind 3).

Each bad checkpoint is a real file given to the real CLI (`clt_lightning.cli.main`) of
fit, validate, evaluate and export: exit 2, no traceback, one `clt: error:` line naming the
file and what is wrong or missing. On the original code these were an AttributeError
(a list), a KeyError (no state_dict), a load_state_dict RuntimeError (wrong shape), an
UnpicklingError (an export), a KeyError about optimizer states (weights-only checkpoint),
"the evaluation set is empty" / NaNs written to the export (NaN weights) and an executed
pickle (`--weights_only false`).

`CASES` collects what ran (printed by `test_report_checkpoint_contents` with `-s`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clt_lightning.errors import CheckpointMismatchError
from clt_lightning.models.clt import CrossLayerTranscoder
from tests.integration.tiny_run import quiet_cli, write_config

CASES: list[str] = []
COMMANDS = ("fit", "validate", "evaluate", "export")


def expect_error(args: list[str], *needles: str, name: str) -> str:
    code, err = quiet_cli(args)
    assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "clt: error: " in err, err[-2000:]
    for needle in needles:
        assert needle in err, f"{name}: {needle!r} not in\n{err[-2000:]}"
    CASES.append(name)
    return err


def command_args(command: str, config: Path, ckpt: Path | str, tmp_path: Path) -> list[str]:
    extra = {
        "export": ["--output_dir", str(tmp_path / "export")],
        "evaluate": ["--evaluation.output_dir", str(tmp_path / "evaluation"),
                     "--evaluation.n_images", "4", "--evaluation.figures", "false"],
        "fit": ["--trainer.max_steps", "4"],
    }.get(command, [])  # fmt: skip
    return [command, "--config", str(config), *extra, "--ckpt_path", str(ckpt)]


def edited(source: Path, target: Path, edit) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


@pytest.fixture
def bad_checkpoints(two_runs, tiny_cache, tmp_path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (file, needles the message must hold)."""
    good = two_runs[0]
    files = {}
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    files["a list"] = (tmp_path / "list.ckpt", ("holds a list, not a checkpoint",))
    torch.save({"epoch": 1}, tmp_path / "no_state.ckpt")
    files["no state_dict"] = (tmp_path / "no_state.ckpt", ("has no 'state_dict'",))

    def wrong_shape(c):
        c["state_dict"]["clt.W_enc"] = torch.zeros(3, 32, 16)

    files["a wrongly shaped tensor"] = (
        edited(good, tmp_path / "shape.ckpt", wrong_shape),
        ("tensor clt.W_enc has shape [3, 32, 16]", "needs [3, 32, 64]"),
    )
    files["a missing tensor"] = (
        edited(good, tmp_path / "missing.ckpt", lambda c: c["state_dict"].pop("clt.b_dec")),
        ("missing ['clt.b_dec']",),
    )

    def nan(c):
        c["state_dict"]["clt.W_dec.1"][0, 0, 0] = float("nan")

    files["NaN weights"] = (
        edited(good, tmp_path / "nan.ckpt", nan),
        ("tensor clt.W_dec.1 holds NaN or Inf",),
    )
    code, err = quiet_cli(["export", "--config", str(write_config(tmp_path / "e.yaml", tiny_cache,
                           tmp_path / "e")), "--ckpt_path", str(good),
                           "--output_dir", str(tmp_path / "exported")])  # fmt: skip
    assert code == 0, err[-2000:]
    files["an exported clt.safetensors"] = (
        tmp_path / "exported" / "clt.safetensors",
        ("is a safetensors file (an exported CLT?)",),
    )
    return {name: (path, (str(path), *needles)) for name, (path, needles) in files.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_checkpoint_contents_are_one_line(command, bad_checkpoints, tiny_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run")
    for name, (path, needles) in bad_checkpoints.items():
        expect_error(command_args(command, config, path, tmp_path), *needles,
                     name=f"{command}: checkpoint with {name}")  # fmt: skip
    assert not (tmp_path / "export").exists()  # nothing written, NaN weights included
    assert not (tmp_path / "evaluation").exists()


def test_weights_only_checkpoint_cannot_resume(tiny_cache, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run)
    code, err = quiet_cli(["fit", "--config", str(config), "--trainer.max_steps", "2",
                           "--checkpoint.save_weights_only", "true"])  # fmt: skip
    assert code == 0, err[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    expect_error(["fit", "--config", str(config), "--trainer.max_steps", "4", "--ckpt_path",
                  "last"], str(last), "optimizer_states", "save_weights_only",
                 name="fit: --ckpt_path last after checkpoint.save_weights_only true")  # fmt: skip
    code, err = quiet_cli(command_args("export", config, last, tmp_path))
    assert code == 0, err[-2000:]  # the weights themselves are fine for export
    CASES.append("export: a weights-only checkpoint exports")


def test_unsafe_loading_is_refused_on_every_path(tiny_cache, tmp_path):
    marker = tmp_path / "pickle_was_executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_cache, run)
    (run / "checkpoints").mkdir(parents=True)
    evil = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": Payload()}, evil)
    for command, ckpt in (("fit", "last"), ("fit", evil), ("validate", evil), ("test", evil)):
        expect_error([command, "--config", str(config), "--weights_only", "false",
                      "--ckpt_path", str(ckpt)], "weights_only=False is refused",
                     name=f"{command}: --weights_only false --ckpt_path {Path(ckpt).name}")  # fmt: skip
    for command in ("evaluate", "export"):
        expect_error(command_args(command, config, evil, tmp_path), "cannot read the checkpoint",
                     str(evil), name=f"{command}: a pickle with code as checkpoint")  # fmt: skip
    assert not marker.exists()


def test_exports_with_nan_are_refused(two_runs, tiny_cache, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run")
    code, err = quiet_cli(command_args("export", config, two_runs[0], tmp_path))
    assert code == 0, err[-2000:]
    weights = tmp_path / "export" / "clt.safetensors"
    tensors = load_file(weights)
    tensors["W_enc_1"][3, 4] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(CheckpointMismatchError, match="tensor W_enc_1 holds NaN or Inf"):
        CrossLayerTranscoder.from_pretrained(weights.parent)
    CASES.append("from_pretrained: an export with an Inf weight")


def test_report_checkpoint_contents():
    print(f"\nbad checkpoints handled: {len(CASES)}")
    for case in CASES:
        print(f"  - {case}")
