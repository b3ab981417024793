"""Bad input to every `clt` command gets a clear one-line answer and a non-zero exit.

Each case runs `clt_lightning.cli.main([...])` in-process (a few run as real
subprocesses) and asserts: exit status 2, no traceback, and a message that names the
culprit (the key, value, file or shard) and, where it helps, what would be valid. Parse
errors come from jsonargparse (`error: ...` with the key); everything the package detects
is a `CLTError` printed as `clt: error: ...`. Property-based tests throw random bytes at
the shard reader and random values at the config parser.

`BAD_INPUTS` collects every case that ran (printed by `test_report_bad_inputs`, run with
`-s`, for docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.errors import CLTError, CorruptShardError
from tests.integration.tiny_run import (
    REPO,
    TINY_VIT,
    child_env,
    run_cli,
    write_config,
)

BAD_INPUTS: list[str] = []
PROPERTY_EXAMPLES: dict[str, int] = {}


def expect_error(capsys, args: list[str], *needles: str, name: str, clt_error: bool = True) -> str:
    """Run the CLI; assert exit 2, no traceback, and every needle in stderr."""
    capsys.readouterr()
    code = run_cli(args)
    err = capsys.readouterr().err
    assert code == 2, f"{name}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    if clt_error:
        assert "clt: error: " in err, err[-2000:]
    for needle in needles:
        assert needle in err, f"{name}: {needle!r} not in\n{err[-2000:]}"
    BAD_INPUTS.append(name)
    return err


@pytest.fixture
def config(tiny_cache, tmp_path):
    """Factory: a tiny run YAML (with overrides) over the session's cache."""

    def make(name: str = "run.yaml", cache_dir: Path | None = None, **overrides) -> str:
        path = write_config(tmp_path / name, cache_dir or tiny_cache, tmp_path / "run", **overrides)
        return str(path)

    return make


# ----------------------------------------------------------------------------- parsing
PARSE_CASES = {
    "unknown top-level key in the YAML": ({"modle": {"lr": 1}}, [], ["modle.lr"]),
    "misspelt model key in the YAML": ({"model.lrr": 1e-3}, [], ["model.lrr"]),
    "misspelt data key in the YAML": ({"data.bach_size": 8}, [], ["data.bach_size"]),
    "misspelt option on the command line": ({}, ["--model.lrr", "1"], ["--model.lrr"]),
    "wrong type on the command line": ({}, ["--model.lr", "abc"], ["model.lr", "abc"]),
    "wrong type in the YAML": ({"data.batch_size": "many"}, [], ["data.batch_size", "many"]),
    "a list where an int goes": ({"model.sparsifier.k": [1, 2]}, [], ["model.sparsifier.k"]),
    "unknown token_filter": ({}, ["--data.token_filter", "patch"], ["data.token_filter"]),
    "unknown decode mode": ({}, ["--model.decode", "fast"], ["model.decode"]),
    "unknown precision": ({}, ["--trainer.precision", "17"], ["trainer.precision"]),
    "unknown source": ({}, ["--data.source", "disk"], ["data.source"]),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_config_errors_name_the_key(case, config, capsys):
    overrides, extra, needles = PARSE_CASES[case]
    args = ["fit", "--config", config(**overrides), *extra]
    expect_error(capsys, args, "error:", *needles, name=case, clt_error=False)


def test_bad_config_files(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    expect_error(capsys, ["fit", "--config", str(missing)], "missing.yaml",
                 name="config file that does not exist", clt_error=False)  # fmt: skip
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(pickle.dumps({"model": object()}))
    expect_error(capsys, ["fit", "--config", str(binary)], "not UTF-8 text",
                 name="config file that is binary", clt_error=False)  # fmt: skip
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    expect_error(capsys, ["fit", "--config", str(broken)], "Problems parsing config",
                 name="YAML syntax error", clt_error=False)  # fmt: skip
    expect_error(capsys, ["fitt", "--config", str(broken)], "'fitt'", "choose from",
                 name="misspelt subcommand", clt_error=False)  # fmt: skip


SEMANTIC_CASES = {
    "unknown sparsifier": (
        ["--model.sparsifier.name", "relu_tpok"],
        ["'relu_tpok'", "abs_topk, batch_topk, jumprelu, relu_topk"],
    ),
    "k larger than the number of latents": (
        ["--model.sparsifier.k", "1000"],
        ["sparsifier.k=1000", "n_latents=64"],
    ),
    "k = 0": (["--model.sparsifier.k", "0"], ["sparsifier.k=0", "an integer >= 1"]),
    "negative learning rate": (["--model.lr", "-1"], ["model.lr=-1.0", "a float > 0"]),
    "betas out of range": (["--model.betas", "[0.9, 1.5]"], ["model.betas"]),
    "zero latents": (["--model.n_latents", "0"], ["model.n_latents=0"]),
    "expansion 0": (["--model.n_latents", "null", "--model.expansion", "0"], ["model.expansion"]),
    "unknown dataset": (
        ["--data.dataset.name", "cifar1000"],
        ["'cifar1000'", "'cifar100', 'coco', 'digits', 'imagefolder', 'imagenet100'"],
    ),
    "batch_size 0": (["--data.batch_size", "0"], ["data.batch_size must be >= 1, got 0"]),
    "max_images 0": (["--data.dataset.max_images", "0"], ["dataset.max_images"]),
    "negative checkpoint interval": (
        ["--checkpoint.every_n_train_steps", "-1"],
        ["checkpoint.every_n_train_steps"],
    ),
    "GPU accelerator on a machine without one": (
        ["--trainer.accelerator", "gpu"],
        ["invalid trainer settings", "gpu"],
    ),
    "misspelt strategy": (["--trainer.strategy", "dpp"], ["invalid trainer settings", "'dpp'"]),
    "zero devices": (["--trainer.devices", "0"], ["invalid trainer settings", "devices"]),
    "cache written with other settings": (
        ["--data.cache_dtype", "fp16"],
        ["cache_dtype: cache has 'fp32', config has 'fp16'"],
    ),
}


@pytest.mark.parametrize("case", list(SEMANTIC_CASES))
def test_semantic_errors_name_the_value(case, config, capsys):
    extra, needles = SEMANTIC_CASES[case]
    expect_error(capsys, ["fit", "--config", config(), *extra], *needles, name=case)


def test_nan_in_the_yaml(config, capsys):
    args = ["fit", "--config", config(**{"model.lr": float("nan")})]  # YAML `.nan`
    expect_error(capsys, args, "model.lr=nan", "a float > 0", name="NaN learning rate (YAML)")
    args = ["fit", "--config", config(), "--model.lr", "nan"]
    expect_error(capsys, args, "model.lr", "nan", name="NaN learning rate (flag)", clt_error=False)


def test_no_cache_says_how_to_write_it(config, tmp_path, capsys):
    args = ["fit", "--config", config(cache_dir=tmp_path / "nothing")]
    expect_error(capsys, args, "no train activation cache", "clt cache --config",
                 name="fit before clt cache")  # fmt: skip


# ----------------------------------------------------------------------------- caches
@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A private copy of the tiny cache to break."""
    copy = tmp_path / "activations"
    shutil.copytree(tiny_cache, copy)
    return copy


def _shard(cache_dir: Path, index: int = 0) -> Path:
    return cache_dir / "train" / f"shard_{index:05d}.safetensors"


def _rewrite_manifest_record(cache_dir: Path, index: int, data: bytes) -> None:
    """Make the manifest vouch for `data` as shard `index` (size and sha256)."""
    path = cache_dir / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][index].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(manifest))


def test_shard_missing_from_the_cache(config, cache_copy, capsys):
    _shard(cache_copy, 3).unlink()
    expect_error(capsys, ["fit", "--config", config(cache_dir=cache_copy)],
                 "shard_00003.safetensors", "missing", name="shard listed in the manifest missing")  # fmt: skip


def test_truncated_shard(config, cache_copy, capsys):
    shard = _shard(cache_copy, 2)
    shard.write_bytes(shard.read_bytes()[:1000])
    expect_error(capsys, ["fit", "--config", config(cache_dir=cache_copy)],
                 str(shard), "truncated", name="truncated shard")  # fmt: skip


def test_bit_flipped_shard_is_caught_while_training(config, cache_copy, capsys):
    shard = _shard(cache_copy, 5)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensors: the file still parses
    shard.write_bytes(bytes(data))
    expect_error(capsys, ["fit", "--config", config(cache_dir=cache_copy)],
                 str(shard), "corrupted", "sha256", name="bit-flipped shard")  # fmt: skip


@pytest.mark.parametrize("verify", ["true", "false"])
def test_pickle_in_place_of_a_shard_is_never_unpickled(
    config, cache_copy, tmp_path, capsys, verify
):
    marker = tmp_path / "pickle_was_executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    data = pickle.dumps({"x": Payload()})
    shard = _shard(cache_copy, 0)
    shard.write_bytes(data)
    _rewrite_manifest_record(
        cache_copy, 0, data
    )  # size and checksum pass: only the format can tell
    args = ["fit", "--config", config(cache_dir=cache_copy), "--data.verify_cache", verify]
    expect_error(capsys, args, str(shard), "not a valid safetensors file",
                 name=f"pickle where a shard should be (verify_cache={verify})")  # fmt: skip
    assert not marker.exists()


def test_cache_of_another_teacher_is_refused_by_clt_cache(config, cache_copy, tmp_path, capsys):
    other = json.loads(TINY_VIT.read_text())
    other["vision_cfg"]["head_width"] = 8  # same shapes, another model
    (tmp_path / "other-vit.json").write_text(json.dumps(other))
    args = ["cache", "--config", config(cache_dir=cache_copy),
            "--data.teacher.model_config", str(tmp_path / "other-vit.json")]  # fmt: skip
    expect_error(capsys, args, "model_config_sha256", "(cache) vs", name="clt cache over a cache of another teacher")  # fmt: skip


def test_cache_of_another_teacher_is_refused_by_clt_fit(config, tmp_path, capsys):
    other = json.loads(TINY_VIT.read_text())
    other["vision_cfg"]["head_width"] = 8
    (tmp_path / "other-vit.json").write_text(json.dumps(other))
    args = ["fit", "--config", config(), "--trainer.max_steps", "1",
            "--data.teacher.model_config", str(tmp_path / "other-vit.json")]  # fmt: skip
    expect_error(capsys, args, "model_config", name="clt fit on a cache of another teacher")


def test_incomplete_cache(config, cache_copy, capsys):
    path = cache_copy / "train" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "complete": False}))
    expect_error(capsys, ["fit", "--config", config(cache_dir=cache_copy)],
                 "incomplete", "clt cache --config", name="incomplete cache")  # fmt: skip


@pytest.mark.parametrize(
    ("case", "text", "needle"),
    [
        ("manifest that is not JSON", "{not json", "cannot read cache manifest"),
        ("manifest of a future format", None, "format_version 99"),
    ],
)
def test_bad_manifest(config, cache_copy, capsys, case, text, needle):
    path = cache_copy / "train" / "manifest.json"
    if text is None:
        text = json.dumps({**json.loads(path.read_text()), "format_version": 99})
    path.write_text(text)
    expect_error(capsys, ["fit", "--config", config(cache_dir=cache_copy)], needle, str(path.parent),
                 name=case)  # fmt: skip


# ----------------------------------------------------------------------------- images, NaN
def _image_folder(root: Path, n: int = 3, bad: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        folder = root / split / "cat"
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = (rng.random((32, 32, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{i}.png")
    if bad:
        (root / "train" / "cat" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_image_that_does_not_decode(config, tmp_path, capsys):
    root = _image_folder(tmp_path / "images", bad=True)
    dataset = {"name": "imagefolder", "root": str(root)}
    args = ["cache", "--config", config(cache_dir=tmp_path / "act", **{"data.dataset": dataset})]
    expect_error(capsys, args, str(root / "train" / "cat" / "zz_bad.png"), "on_bad_image='skip'",
                 name="image that does not decode")  # fmt: skip


def test_empty_and_missing_datasets(config, tmp_path, capsys):
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "cat").mkdir(parents=True)
    args = ["cache", "--config",
            config(cache_dir=tmp_path / "act", **{"data.dataset": {"name": "imagefolder", "root": str(empty)}})]  # fmt: skip
    expect_error(capsys, args, "no images", str(empty / "train"), name="empty dataset")
    args = ["cache", "--config",
            config(cache_dir=tmp_path / "act", **{"data.dataset": {"name": "imagefolder", "root": str(tmp_path / "nope")}})]  # fmt: skip
    expect_error(
        capsys, args, "root folder not found", str(tmp_path / "nope"), name="missing dataset root"
    )


@pytest.fixture
def nan_teacher_weights(tmp_path) -> Path:
    """The tiny teacher's weights with one NaN in layer 1's MLP (every later x and y is NaN)."""
    from safetensors.torch import save_file

    from clt_lightning.teacher import Teacher, TeacherConfig

    teacher = Teacher(TeacherConfig(model_config=str(TINY_VIT)))
    state = {k: v.detach().clone().contiguous() for k, v in teacher.clip.state_dict().items()}
    key = next(k for k in state if k.endswith("resblocks.1.mlp.c_fc.weight"))
    state[key][0, 0] = float("nan")
    path = tmp_path / "nan-teacher.safetensors"
    save_file(state, str(path))
    return path


def test_non_finite_activations_refused_by_the_cache_writer(
    config, tmp_path, nan_teacher_weights, capsys
):
    args = ["cache", "--config",
            config(cache_dir=tmp_path / "act", **{"data.teacher.weights": str(nan_teacher_weights)})]  # fmt: skip
    expect_error(
        capsys, args, "shard 0 (images 0..1)", "not finite", name="NaN activations (clt cache)"
    )
    assert not list(
        (tmp_path / "act" / "train").glob("shard_*")
    )  # nothing written that looks complete


def test_non_finite_activations_refused_online(config, tmp_path, nan_teacher_weights, capsys):
    args = ["fit", "--config",
            config(cache_dir=tmp_path / "act", **{"data.teacher.weights": str(nan_teacher_weights)}),
            "--data.source", "online", "--trainer.max_steps", "1"]  # fmt: skip
    expect_error(capsys, args, "image", "not finite", name="NaN activations (online)")


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def other_shape_checkpoint(tmp_path_factory) -> Path:
    """A CLTModule checkpoint for d_model=8 (the tiny teacher has 32)."""
    from clt_lightning.models.sparsifiers import SparsifierConfig
    from clt_lightning.module import CLTModule
    from tests.unit.test_module import PlantedData, make_trainer

    root = tmp_path_factory.mktemp("other_shape")
    model = CLTModule(n_latents=16, sparsifier=SparsifierConfig(name="relu_topk", k=4))
    trainer = make_trainer(root, max_epochs=1)
    trainer.fit(model, PlantedData(n_train=2))
    trainer.save_checkpoint(root / "d8.ckpt")
    return root / "d8.ckpt"


def test_checkpoint_of_another_shape(config, other_shape_checkpoint, capsys):
    ckpt = str(other_shape_checkpoint)
    expect_error(capsys, ["fit", "--config", config(), "--ckpt_path", ckpt],
                 "checkpoint holds a CLT for n_layers=3, d_model=8", "d_model=32",
                 name="checkpoint of another shape (fit)")  # fmt: skip
    expect_error(capsys, ["evaluate", "--config", config(), "--ckpt_path", ckpt],
                 "d_model=8", "d_model=32", name="checkpoint of another shape (evaluate)")  # fmt: skip
    out = other_shape_checkpoint.parent / "features_out"
    expect_error(capsys, ["features", "--config", config(), "--ckpt_path", ckpt,
                          "--latents.output_dir", str(out)],
                 "d_model=8", "d_model=32", name="checkpoint of another shape (features)")  # fmt: skip
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "command", ["fit", "validate", "evaluate", "retrieve", "export", "features"]
)
def test_unreadable_checkpoints(command, config, tmp_path, capsys):
    marker = tmp_path / "pickle_was_executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Payload()}, evil)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not a zip")
    extra = ["--output_dir", str(tmp_path / "out")] if command == "export" else []
    base = [command, "--config", config(), *extra, "--ckpt_path"]
    expect_error(capsys, [*base, str(tmp_path / "nope.ckpt")], "nope.ckpt", "not found",
                 name=f"missing checkpoint ({command})")  # fmt: skip
    expect_error(capsys, [*base, str(truncated)], "cannot read the checkpoint", str(truncated),
                 name=f"truncated checkpoint ({command})")  # fmt: skip
    expect_error(capsys, [*base, str(evil)], "cannot read the checkpoint", str(evil),
                 name=f"pickle with code as checkpoint ({command})")  # fmt: skip
    assert not marker.exists()


# ----------------------------------------------------------------------------- subprocesses
def _clt_subprocess(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clt_lightning.cli", *args],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_real_process_misspelt_key_exits_2(config):
    result = _clt_subprocess(["fit", "--config", config(**{"model.lrr": 1})])
    assert result.returncode == 2
    assert "model.lrr" in result.stderr and "Traceback" not in result.stderr
    BAD_INPUTS.append("misspelt key (real process)")


@pytest.mark.slow
def test_real_processes_semantic_errors_exit_2(config, tmp_path):
    cases = {
        "k larger than the number of latents (real process)": (
            ["fit", "--config", config(), "--model.sparsifier.k", "1000"],
            "clt: error: sparsifier.k=1000 exceeds n_latents=64",
        ),
        "missing checkpoint (real process)": (
            [
                "export",
                "--config",
                config(),
                "--ckpt_path",
                str(tmp_path / "x.ckpt"),
                "--output_dir",
                str(tmp_path / "out"),
            ],
            "clt: error: checkpoint not found",
        ),  # fmt: skip
    }
    for name, (args, needle) in cases.items():
        result = _clt_subprocess(args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert needle in result.stderr and "Traceback" not in result.stderr
        BAD_INPUTS.append(name)


# ----------------------------------------------------------------------------- properties
@pytest.fixture(scope="module")
def shard_bytes(tiny_cache) -> bytes:
    return _shard(tiny_cache, 0).read_bytes()


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@st.composite
def mutations(draw, size: int, header_only: bool = False, header_end: int = 0):
    """(flips [(position, xor mask)], truncate_to or None); never the identity."""
    high = header_end if header_only else size
    truncate = None if header_only else draw(st.none() | st.integers(0, size - 1))
    flips = draw(st.lists(st.tuples(st.integers(0, high - 1), st.integers(1, 255)), max_size=8))
    assume(flips or truncate is not None)
    return flips, truncate


def _mutate(data: bytes, flips, truncate) -> bytes:
    out = bytearray(data)
    for position, mask in flips:
        out[position] ^= mask
    out = out if truncate is None else out[:truncate]
    return bytes(out)


@pytest.mark.parametrize("verify", [True, False])
def test_shard_reader_never_returns_garbage(tiny_cache, shard_bytes, tmp_path_factory, verify):
    """Random flips and truncations: with checksums (the default) every change is a
    CorruptShardError naming the file; without them, changes to the header are either a
    CorruptShardError or still the manifest's tensors, never another exception."""
    folder = tmp_path_factory.mktemp(f"mutated_{verify}") / "train"
    shutil.copytree(tiny_cache / "train", folder)
    original = open_cache(folder).load_shard(0)
    end = _header_end(shard_bytes)
    strategy = mutations(len(shard_bytes), header_only=not verify, header_end=end)
    examples = [0]

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(strategy)
    def check(mutation):
        examples[0] += 1
        data = _mutate(shard_bytes, *mutation)
        assume(data != shard_bytes)
        (folder / "shard_00000.safetensors").write_bytes(data)
        try:
            shard = open_cache(folder, verify=verify).load_shard(0)
        except CorruptShardError as error:
            assert "shard_00000.safetensors" in str(error)
            return
        assert not verify, "a changed shard passed the checksum"
        for name, tensor in original.items():
            assert shard[name].shape == tensor.shape and shard[name].dtype == tensor.dtype

    check()
    PROPERTY_EXAMPLES[f"shard reader (verify={verify})"] = examples[0]


FIELDS = {  # CLI key -> what the error must mention
    "model.sparsifier.k": "sparsifier.k",
    "model.sparsifier.aux_k": "sparsifier.aux_k",
    "model.n_latents": "n_latents",
    "model.expansion": "expansion",
    "model.lr": "model.lr",
    "model.warmup_steps": "warmup_steps",
    "data.batch_size": "batch_size",
    "data.val_batch_size": "val_batch_size",
    "data.images_per_shard": "images_per_shard",
    "data.dataset.max_images": "max_images",
}
VALUES = st.one_of(
    st.integers(-3, 200),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "null", "abc", "1e3", "[1, 2]", "{}", "true", "0x10", " 7 "]),
)


def test_config_values_parse_or_name_the_key(tiny_cache, tmp_path, capsys):
    """Random values for one numeric setting at a time, through the real CLI parser: either
    valid objects (and a CLT that builds for the tiny teacher's shape) or an error that
    names the key; never another exception."""
    from clt_lightning.cli import build_cli

    config = write_config(tmp_path / "run.yaml", tiny_cache, tmp_path / "run",
                          **{"trainer.logger": False})  # fmt: skip
    examples = [0]
    outcomes = {"parse error": 0, "named error": 0, "valid": 0}

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(st.sampled_from(sorted(FIELDS)), VALUES)
    def check(key, value):
        examples[0] += 1
        extra = ["--model.n_latents", "null"] if key == "model.expansion" else []
        args = ["--config", str(config), *extra, f"--{key}={value}"]  # run=False: no subcommand
        capsys.readouterr()
        try:
            cli = build_cli(args, run=False)
        except SystemExit as exit_:
            assert exit_.code == 2
            message = capsys.readouterr().err.rsplit("error:", 1)[-1]  # not the usage text
            assert key in message, message
            outcomes["parse error"] += 1
            return
        except CLTError as error:
            assert FIELDS[key] in str(error), (key, value, str(error))
            outcomes["named error"] += 1
            return
        try:  # valid so far: the model must also build for the teacher's shape
            n_latents = cli.model.hparams.n_latents or cli.model.hparams.expansion * 32
            assume(n_latents <= 8192)  # keep the memory small
            cli.model.build(3, 32)
        except CLTError as error:
            assert FIELDS[key] in str(error) or "sparsifier.k" in str(error), str(error)
            outcomes["named error"] += 1
            return
        outcomes["valid"] += 1
        assert cli.datamodule.batch_size >= 1 and cli.datamodule.val_batch_size >= 1
        assert 1 <= cli.model.clt.sparsifier.config.k <= cli.model.clt.n_latents

    check()
    PROPERTY_EXAMPLES["config values"] = examples[0]
    print(f"\nconfig values: {outcomes}")
    assert all(outcomes.values())  # every branch was exercised


def test_report_bad_inputs():
    """Prints what was tried (run with -s; the numbers go into docs/reliability.md)."""
    print(f"\nbad inputs tried in this session: {len(BAD_INPUTS)}, all answered with exit 2")
    for name in BAD_INPUTS:
        print(f"  - {name}")
    for name, n in PROPERTY_EXAMPLES.items():
        print(f"  property {name}: {n} random examples")
