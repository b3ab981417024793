"""Settings are validated before any work, and messages name the user's setting.

Issue 12 kinds 7 and 9, through the real CLI (`clt_lightning.cli.main`, in-process):
devices this machine does not have, model configs with no layers or a patch larger than
the image, negative worker counts, zero batch sizes and gradient clipping values that
Lightning would silently reinterpret, negative progress counters in a checkpoint, a
memory budget of 0, a checkpoint of another teacher in `clt retrieve`, and a teacher
`.pt` holding code. Every case: exit 2, no traceback, one `clt: error:` line naming the
key (or file) and what is valid. The image folder of the config holds only an image that
does not decode, so an error about the setting (not about the image) proves the setting
was checked before any image was read.

`SETTING_CASES` collects every case that ran (printed by `test_report_setting_cases`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_run import TINY_VIT, quiet_cli, write_config

SETTING_CASES: list[str] = []


def expect_setting_error(args: list[str], *needles: str, name: str) -> str:
    code, err = quiet_cli(args)
    assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    message = err.split("clt: error: ", 1)[1].rstrip("\n")
    assert "\n" not in message, f"{name}: not one line:\n{message}"
    assert "cannot read image" not in message  # the setting was checked before the images
    for needle in needles:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"
    SETTING_CASES.append(name)
    return message


@pytest.fixture
def bad_images(tmp_path) -> dict:
    """An imagefolder whose only image does not decode (read first = the wrong error)."""
    for split in ("train", "val"):
        folder = tmp_path / "images" / split / "cat"
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return {"name": "imagefolder", "root": str(tmp_path / "images")}


@pytest.fixture
def config(tiny_cache, tmp_path):
    made = []

    def make(**overrides) -> str:
        made.append(1)
        path = write_config(tmp_path / f"run{len(made)}.yaml", tiny_cache, tmp_path / "run",
                            **overrides)  # fmt: skip
        return str(path)

    return make


def _absent_cuda() -> str:
    """A CUDA device this machine does not have."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def test_devices_are_checked_before_work(config, bad_images, tmp_path):
    cuda = _absent_cuda()
    cache = ["cache", "--config", config(**{"data.dataset": bad_images}),
             "--data.cache_dir", str(tmp_path / "act")]  # fmt: skip
    expect_setting_error([*cache, "--data.teacher.device", "tpu9"], "teacher.device='tpu9'",
                         "is not a device", "'cpu'", name="teacher.device tpu9")  # fmt: skip
    expect_setting_error([*cache, "--data.teacher.device", cuda], f"teacher.device='{cuda}'",
                         "cannot be used", name="teacher.device: a CUDA device this machine lacks")  # fmt: skip
    fit = ["fit", "--config", config(), "--data.source", "online"]
    expect_setting_error([*fit, "--data.online_device", cuda], f"data.online_device='{cuda}'",
                         name="data.online_device: a CUDA device this machine lacks")  # fmt: skip
    expect_setting_error([*fit, "--data.online_device", "tpu9"], "data.online_device='tpu9'",
                         "is not a device", name="data.online_device tpu9")  # fmt: skip


@pytest.mark.parametrize(
    ("vision", "needle"),
    [
        ({"layers": 0}, "vision_cfg.layers must be a positive integer, got 0"),
        ({"layers": -2}, "vision_cfg.layers must be a positive integer, got -2"),
        ({"patch_size": 64}, "patch_size 64 is larger than vision_cfg.image_size 32"),
        ({"width": 0}, "vision_cfg.width must be a positive integer"),
        ({"image_size": 0}, "vision_cfg.image_size must be a positive integer"),
        ({"head_width": 64}, "head_width 64 is larger than vision_cfg.width 32"),
    ],
    ids=[
        "0 layers",
        "-2 layers",
        "patch larger than image",
        "width 0",
        "image_size 0",
        "head wider than the model",
    ],  # fmt: skip
)
def test_model_config_is_checked_before_work(config, bad_images, tmp_path, vision, needle):
    model = json.loads(TINY_VIT.read_text())
    model["vision_cfg"].update(vision)
    path = tmp_path / "bad-vit.json"
    path.write_text(json.dumps(model))
    args = ["cache", "--config", config(**{"data.dataset": bad_images}),
            "--data.cache_dir", str(tmp_path / "act"), "--data.teacher.model_config", str(path)]  # fmt: skip
    expect_setting_error(args, str(path), needle, name=f"model config: {vision}")
    assert not (tmp_path / "act").exists()


def test_values_never_silently_replaced(config, bad_images, tmp_path):
    """val_batch_size 0 used to fall back to batch_size; gradient_clip_val -1 or 0 meant no
    clipping; negative worker counts reached DataLoader as a traceback."""
    fit = ["fit", "--config", config()]
    expect_setting_error([*fit, "--data.val_batch_size", "0"], "data.val_batch_size", ">= 1",
                         name="data.val_batch_size 0")  # fmt: skip
    for value in ("-1", "0"):
        expect_setting_error([*fit, "--trainer.gradient_clip_val", value],
                             "trainer.gradient_clip_val", "null for no clipping",
                             name=f"trainer.gradient_clip_val {value}")  # fmt: skip
    expect_setting_error([*fit, "--data.num_workers", "-1"], "data.num_workers", ">= 0",
                         name="data.num_workers -1")  # fmt: skip
    ckpt = str(tmp_path / "unused.ckpt")
    for command in ("evaluate", "retrieve"):
        expect_setting_error([command, "--config", config(), "--ckpt_path", ckpt,
                              f"--{command.replace('evaluate', 'evaluation').replace('retrieve', 'retrieval')}.num_workers", "-1"],
                             "num_workers must be >= 0", name=f"{command}: num_workers -1")  # fmt: skip


def test_sparsifier_name_is_checked_before_the_data(config, tmp_path):
    """An unknown sparsifier used to surface only when the CLT was built in `setup`, after
    the data: with no cache yet, the user was told about the cache instead."""
    fit = ["fit", "--config", config(), "--data.cache_dir", str(tmp_path / "no-cache-yet")]
    expect_setting_error([*fit, "--model.sparsifier.name", "relu_tpok"], "'relu_tpok'",
                         "relu_topk", name="model.sparsifier.name unknown, no cache yet")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_fit")
    config = write_config(root / "run.yaml", tiny_cache, root / "run")
    code, err = quiet_cli(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    assert code == 0, err[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c.update(global_step=-3), "global_step=-3"),
        (lambda c: c.update(epoch=-1), "epoch=-1"),
        (
            lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].update(completed=-2),
            "epoch_progress.total.completed=-2",
        ),
    ],
    ids=["global_step", "epoch", "loop counter"],
)
def test_negative_progress_counters_in_a_checkpoint(
    config, tiny_checkpoint, tmp_path, edit, needle
):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    edit(checkpoint)
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    for command in ("fit", "export"):
        extra = ["--output_dir", str(tmp_path / "export")] if command == "export" else []
        expect_setting_error([command, "--config", config(), "--ckpt_path", str(edited), *extra],
                             needle, "negative progress counters",
                             name=f"negative {needle.split('=')[0]} in a checkpoint ({command})")  # fmt: skip
    assert not (tmp_path / "export").exists()


def test_memory_budget_names_the_setting(config, tiny_checkpoint):
    base = ["retrieve", "--config", config(), "--ckpt_path", str(tiny_checkpoint)]
    expect_setting_error([*base, "--retrieval.memory_budget_gb", "0"],
                         "retrieval.memory_budget_gb must be > 0", name="retrieval.memory_budget_gb 0")  # fmt: skip
    for value in ("1e-9", "1e-6"):  # under 1 B per layer; under even IVF,PQ1's needs
        message = expect_setting_error([*base, "--retrieval.memory_budget_gb", value],
                                       "retrieval.memory_budget_gb", "too small",
                                       name=f"retrieval.memory_budget_gb {value} (too small)")  # fmt: skip
        assert "memory_budget_bytes" not in message


def test_evaluation_and_retrieval_settings_name_the_key(config, tiny_checkpoint, tmp_path):
    ckpt = str(tiny_checkpoint)
    retrieve = ["retrieve", "--config", config(), "--ckpt_path", ckpt]
    for key, value in {"aggregation": "mean", "similarity": "dot", "k": "0", "batch_size": "0",
                       "query_index": "-1"}.items():  # fmt: skip
        expect_setting_error([*retrieve, f"--retrieval.{key}", value], f"retrieval.{key}",
                             name=f"retrieval.{key} {value}")  # fmt: skip
    evaluate = ["evaluate", "--config", config(), "--ckpt_path", ckpt,
                "--evaluation.output_dir", str(tmp_path / "eval")]  # fmt: skip
    expect_setting_error([*evaluate, "--evaluation.starts", "[99]"], "evaluation.starts", "0..3",
                         name="evaluation.starts [99]")  # fmt: skip
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    expect_setting_error([*evaluate, "--evaluation.classifier_cache", str(a_file)],
                         "evaluation.classifier_cache", "is a file",
                         name="evaluation.classifier_cache is a file")  # fmt: skip


@pytest.fixture(scope="module")
def other_teacher_checkpoint(tmp_path_factory) -> Path:
    """A CLTModule checkpoint for d_model=8 (the tiny teacher has 32)."""
    from clt_lightning.models.sparsifiers import SparsifierConfig
    from clt_lightning.module import CLTModule
    from tests.unit.test_module import PlantedData, make_trainer

    root = tmp_path_factory.mktemp("other_teacher")
    model = CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="relu_topk", k=4))
    trainer = make_trainer(root, max_epochs=1)
    trainer.fit(model, PlantedData(n_train=2))
    trainer.save_checkpoint(root / "d8.ckpt")
    return root / "d8.ckpt"


def test_checkpoint_of_another_teacher_in_retrieve(config, other_teacher_checkpoint, tmp_path):
    """`clt retrieve` used to fail with a bare matmul shape error deep in the encoder."""
    ckpt = str(other_teacher_checkpoint)
    expect_setting_error(["retrieve", "--config", config(), "--ckpt_path", ckpt,
                          "--retrieval.output_dir", str(tmp_path / "r")],
                         ckpt, "n_layers=3, d_model=8", "data.teacher", "d_model=32",
                         name="checkpoint of another teacher (clt retrieve)")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_teacher_pt_with_code_is_refused_in_one_line(config, tmp_path):
    marker = tmp_path / "pickle_was_executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "teacher.pt"
    torch.save({"visual.proj": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):  # torch's own advice
        torch.load(evil, weights_only=True)
    message = expect_setting_error(
        ["cache", "--config", config(), "--data.cache_dir", str(tmp_path / "act"),
         "--data.teacher.weights", str(evil)],
        "teacher.weights", str(evil), "refused unread", name="teacher .pt holding code",
    )  # fmt: skip
    assert "weights_only" not in message and "WeightsUnpickler" not in message
    assert not marker.exists()


def test_report_setting_cases():
    """Print the cases that ran (for docs/reliability.md; run with -s)."""
    print(f"\n{len(SETTING_CASES)} setting cases refused before work:")
    for name in SETTING_CASES:
        print(f"  - {name}")
