"""Tests for the activation cache (`clt_lightning.data.cache_*`).

The fakes below are shared with `tests/integration/test_cache_resume.py`. The fake teacher
computes its activations with exact float32 arithmetic (small integers times multiples of
1/8), so its output does not depend on the batch it is computed in and the cache can be
compared bit for bit with a single reference capture.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from clt_lightning.data import cache_format
from clt_lightning.data.cache_format import parse_safetensors, safetensors_header
from clt_lightning.data.cache_reader import open_cache, verify_cache
from clt_lightning.data.cache_stats import Moments
from clt_lightning.data.cache_writer import write_cache
from clt_lightning.errors import (
    CacheError,
    ConfigError,
    CorruptShardError,
    DiskSpaceError,
    UnreadableImageError,
)

REPO = Path(__file__).resolve().parents[2]
N_LAYERS, D_MODEL, TOKENS, N_IMAGES = 3, 8, 6, 30
WRITE_OPTIONS: dict[str, Any] = {"images_per_shard": 8, "batch_size": 3, "progress": False}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Capture(NamedTuple):
    x: Tensor
    y: Tensor


class FakeTeacher:
    """Stand-in for `Teacher`: x is an exact linear function of the image, y a nonlinearity.

    Args:
        variant: Goes into `identity()` (two variants are two different teachers).
        scale: Multiplies x and y (large values overflow fp16).
        fail_after_images: Raise once this many images were captured (a simulated crash).
    """

    n_layers, d_model, tokens_per_image = N_LAYERS, D_MODEL, TOKENS

    def __init__(
        self, variant: str = "a", scale: float = 1.0, fail_after_images: int | None = None
    ) -> None:
        g = torch.Generator().manual_seed(1234)
        self.weight = torch.randint(-4, 5, (48, TOKENS * N_LAYERS * D_MODEL), generator=g) / 8
        self.offset = torch.randint(-8, 9, (N_LAYERS, D_MODEL), generator=g) / 2
        self.variant, self.scale, self.fail_after_images = variant, scale, fail_after_images
        self.images_seen = 0
        self.delay = float(os.environ.get("CLT_TEST_CAPTURE_DELAY", "0"))

    def identity(self) -> dict[str, Any]:
        return {"model_name": "fake-vit", "variant": self.variant, "input_site": "ln2_out"}

    def capture(self, images: Tensor) -> Capture:
        if self.fail_after_images is not None and self.images_seen >= self.fail_after_images:
            raise RuntimeError("simulated crash")
        self.images_seen += len(images)
        if self.delay:  # only the subprocess of the kill test sets this
            time.sleep(self.delay)
        x = (images.flatten(1) @ self.weight).view(-1, TOKENS, N_LAYERS, D_MODEL) + self.offset
        y = torch.tanh(x) * 3 + 0.1 * x * x
        return Capture(x * self.scale, y * self.scale)


class FakeDataset(torch.utils.data.Dataset):
    """Images of small integers seeded by their id; ids in `bad` do not decode."""

    def __init__(
        self,
        n: int = N_IMAGES,
        bad: tuple[int, ...] = (),
        split: str = "train",
        transform: str = "none",
    ) -> None:
        self.n, self.bad, self.split, self.transform = n, set(bad), split, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if i in self.bad:
            raise UnreadableImageError(f"/data/fake/{i:04d}.png: cannot identify image file")
        g = torch.Generator().manual_seed(10_000 + i)
        return torch.randint(-4, 5, (3, 4, 4), generator=g).float(), i % 7

    def identity(self) -> dict[str, Any]:
        return {
            "name": "fake",
            "split": self.split,
            "n_images": self.n,
            "transform": self.transform,
        }


def reference_capture(ids: list[int], dtype: torch.dtype) -> Capture:
    """The fake teacher's activations of `ids`, cast to the cache dtype."""
    images = torch.stack([FakeDataset()[i][0] for i in ids])
    capture = FakeTeacher().capture(images)
    return Capture(capture.x.to(dtype), capture.y.to(dtype))


def cache_files(path: Path) -> dict[str, bytes]:
    """Every non-lock file of a cache folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".lock"}


def load_all(path: Path) -> dict[str, Tensor]:
    """All shards of a cache concatenated along the image axis."""
    cache = open_cache(path)
    shards = [cache.load_shard(i) for i in range(cache.n_shards)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def numpy_stats(values: Tensor) -> dict[str, np.ndarray]:
    """Direct float64 statistics of [N, T, L, d] values."""
    rows = values.to(torch.float64).numpy().reshape(-1, N_LAYERS, D_MODEL)
    mean = rows.mean(axis=0)
    return {
        "mean": mean,
        "mean_sq_norm": (rows**2).sum(axis=-1).mean(axis=0),
        "var": ((rows - mean) ** 2).sum(axis=-1).mean(axis=0),
    }


def crash_then_resume(out: Path, fail_after: int = 17, **options: Any) -> FakeTeacher:
    """Write until the teacher crashes, check the partial state, resume; return the resumer."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_cache(FakeTeacher(fail_after_images=fail_after), FakeDataset(), out, **options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == fail_after // 8
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    resumer = FakeTeacher()
    write_cache(resumer, FakeDataset(), out, **options)
    return resumer


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted fp16 cache of the fake teacher (read-only: copy before changing it)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    write_cache(FakeTeacher(), FakeDataset(), out, **WRITE_OPTIONS)
    return out


@pytest.fixture
def reference_copy(reference: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "cache"))


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_round_trip_values_labels_ids_and_stats(tmp_path: Path, dtype: str) -> None:
    out = write_cache(FakeTeacher(), FakeDataset(), tmp_path / "c", dtype=dtype, **WRITE_OPTIONS)
    cache = open_cache(out)
    assert cache.shard_image_counts == [8, 8, 8, 6] and cache.n_images == N_IMAGES
    assert sorted(p.name for p in out.glob("shard_*")) == [
        f"shard_{i:05d}.safetensors" for i in range(4)
    ]
    data, ref = load_all(out), reference_capture(list(range(N_IMAGES)), DTYPES[dtype])
    assert data["x"].dtype == DTYPES[dtype]
    assert torch.equal(data["x"], ref.x) and torch.equal(data["y"], ref.y)
    assert data["image_id"].tolist() == list(range(N_IMAGES))
    assert data["label"].tolist() == [i % 7 for i in range(N_IMAGES)]
    assert torch.equal(data["token_index"], torch.arange(TOKENS).repeat(N_IMAGES, 1))
    stats = cache.stats()
    assert stats.n_tokens == N_IMAGES * TOKENS and stats.x_mean.dtype == torch.float64
    for name in ("x", "y"):
        expected = numpy_stats(data[name])
        np.testing.assert_allclose(getattr(stats, f"{name}_mean"), expected["mean"], rtol=1e-12)
        np.testing.assert_allclose(
            getattr(stats, f"{name}_mean_sq_norm"), expected["mean_sq_norm"], rtol=1e-12
        )
        np.testing.assert_allclose(getattr(stats, f"{name}_var"), expected["var"], rtol=1e-12)


def test_manifest_describes_the_cache(reference: Path) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["complete"] is True
    assert manifest["teacher"] == FakeTeacher().identity()
    assert manifest["dataset"] == FakeDataset().identity()
    assert manifest["input_site"] == "ln2_out" and manifest["dtype"] == "fp16"
    assert (manifest["n_layers"], manifest["d_model"]) == (N_LAYERS, D_MODEL)
    assert manifest["tokens_per_image"] == manifest["teacher_tokens_per_image"] == TOKENS
    assert manifest["tokens"] == {"mode": "all"} and manifest["images_per_shard"] == 8
    for i, record in enumerate(manifest["shards"]):
        raw = (reference / record["file"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(raw).hexdigest()
        assert record["bytes"] == len(raw) and record["first_image_id"] == 8 * i
    assert manifest["skipped"] == [] and manifest["stats"]["n_tokens"] == N_IMAGES * TOKENS


def test_shards_are_standard_safetensors(reference: Path) -> None:
    path = reference / "shard_00001.safetensors"
    ours = open_cache(reference).load_shard(1)
    theirs = safetensors.torch.load_file(path)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "clt-activation-shard", "shard_index": "1"}


def test_streaming_writer_matches_the_library_byte_for_byte(tmp_path: Path) -> None:
    tensors = {
        "y": torch.randn(3, 2, 5).half(),
        "x": torch.randn(3, 2, 5).half(),
        "label": torch.arange(3),
        "token_index": torch.zeros(3, 2, dtype=torch.int64),
        "e": torch.zeros(0, 4, dtype=torch.float32),
    }
    metadata = {"format": "clt-activation-shard"}  # one key: the library's order is then fixed
    cache_format.write_safetensors(tmp_path / "a.safetensors", tensors, metadata)
    assert (tmp_path / "a.safetensors").read_bytes() == safetensors.torch.save(tensors, metadata)
    header = safetensors_header(tensors, metadata)
    assert len(header) % 8 == 0


def test_numpy_reader_from_the_docs_reads_the_same_arrays(tmp_path: Path) -> None:
    text = (REPO / "docs" / "cache-format.md").read_text()
    code = re.search(r"<!-- snippet: read_shard -->\s*```python\n(.*?)```", text, re.S)
    assert code is not None, "docs/cache-format.md lost its read_shard snippet"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # the snippet imports only json, struct and numpy
    for dtype in ("fp16", "bf16"):
        out = write_cache(
            FakeTeacher(), FakeDataset(n=10), tmp_path / dtype, dtype=dtype, **WRITE_OPTIONS
        )
        expected = open_cache(out).load_shard(1)
        arrays = namespace["read_shard"](str(out / "shard_00001.safetensors"))
        assert arrays.keys() == expected.keys()
        for name, tensor in expected.items():
            np.testing.assert_array_equal(arrays[name], tensor.float().numpy())


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "options",
    [{}, {"tokens": "cls"}, {"tokens": "cls+random", "n_random_patches": 3, "seed": 5}],
    ids=["all", "cls", "cls+random"],
)
def test_resume_after_crash_is_byte_identical(tmp_path: Path, options: dict[str, Any]) -> None:
    whole = write_cache(
        FakeTeacher(), FakeDataset(), tmp_path / "whole", **WRITE_OPTIONS, **options
    )
    resumer = crash_then_resume(tmp_path / "resumed", **WRITE_OPTIONS, **options)
    assert resumer.images_seen == N_IMAGES - 16  # only the two missing shards were computed
    assert cache_files(tmp_path / "resumed") == cache_files(whole)  # shards and manifest


def test_resume_overwrites_orphans_and_stale_temp_files(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        write_cache(FakeTeacher(fail_after_images=17), FakeDataset(), out, **WRITE_OPTIONS)
    (out / "shard_00002.safetensors").write_bytes(b"half a shard from a killed run")
    (out / ".shard_00003.safetensors.tmp").write_bytes(b"stale")
    with pytest.raises(CacheError, match="incomplete.*resume"):
        open_cache(out)
    write_cache(FakeTeacher(), FakeDataset(), out, **WRITE_OPTIONS)
    assert cache_files(out) == cache_files(reference)


def test_complete_cache_is_a_no_op(reference_copy: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in reference_copy.iterdir()}
    teacher = FakeTeacher()
    write_cache(teacher, FakeDataset(), reference_copy, **WRITE_OPTIONS)
    assert teacher.images_seen == 0
    assert {p.name: p.stat().st_mtime_ns for p in reference_copy.iterdir()} == before


@pytest.mark.parametrize(
    ("teacher", "dataset", "options", "field", "old", "new"),
    [
        (FakeTeacher(variant="b"), FakeDataset(), {}, "teacher.variant", "'a'", "'b'"),
        (FakeTeacher(), FakeDataset(split="val"), {}, "dataset.split", "'train'", "'val'"),
        (FakeTeacher(), FakeDataset(transform="flip"), {}, "dataset.transform", "'none'", "'flip'"),
        (FakeTeacher(), FakeDataset(n=31), {}, "dataset.n_images", "30", "31"),
        (FakeTeacher(), FakeDataset(), {"dtype": "bf16"}, "dtype", "'fp16'", "'bf16'"),
        (FakeTeacher(), FakeDataset(), {"tokens": "cls"}, "tokens.mode", "'all'", "'cls'"),
        (FakeTeacher(), FakeDataset(), {"images_per_shard": 4}, "images_per_shard", "8", "4"),
    ],
    ids=["teacher", "split", "transform", "size", "dtype", "tokens", "shard-size"],
)
def test_cache_made_for_something_else_is_refused(
    reference_copy: Path,
    teacher: FakeTeacher,
    dataset: FakeDataset,
    options: dict[str, Any],
    field: str,
    old: str,
    new: str,
) -> None:
    before = cache_files(reference_copy)
    with pytest.raises(CacheError) as info:
        write_cache(teacher, dataset, reference_copy, **{**WRITE_OPTIONS, **options})
    assert f"{field}: {old} (cache) vs {new} (requested)" in str(info.value)
    assert teacher.images_seen == 0 and cache_files(reference_copy) == before


def test_incomplete_cache_for_another_teacher_is_not_appended_to(tmp_path: Path) -> None:
    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        write_cache(FakeTeacher(fail_after_images=9), FakeDataset(), out, **WRITE_OPTIONS)
    before = cache_files(out)
    with pytest.raises(CacheError, match="teacher.variant"):
        write_cache(FakeTeacher(variant="b"), FakeDataset(), out, **WRITE_OPTIONS)
    assert cache_files(out) == before


def test_folder_with_foreign_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="notes.txt"):
        write_cache(FakeTeacher(), FakeDataset(), tmp_path, **WRITE_OPTIONS)


def test_second_writer_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    with open(tmp_path / ".lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CacheError, match="another process"):
            write_cache(FakeTeacher(), FakeDataset(), tmp_path, **WRITE_OPTIONS)


# ------------------------------------------------------------------------ disk space


def test_not_enough_disk_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=900)
    )
    with pytest.raises(DiskSpaceError) as info:
        write_cache(FakeTeacher(), FakeDataset(), tmp_path / "c", **WRITE_OPTIONS)
    needed = N_IMAGES * TOKENS * N_LAYERS * D_MODEL * 2 * 2  # images x T x L x d x (x, y) x fp16
    assert f"{needed / 1000:.2f} KB" in str(info.value) and "only 900 B is free" in str(info.value)
    assert (
        not list((tmp_path / "c").glob("shard_*")) and not (tmp_path / "c/manifest.json").exists()
    )


def test_enospc_mid_write_leaves_a_resumable_cache(
    tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = cache_format._write_chunks

    def full_disk(f: Any, data: memoryview, digest: Any) -> None:
        if "shard_00001" in f.name:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        original(f, data, digest)

    monkeypatch.setattr(cache_format, "_write_chunks", full_disk)
    out = tmp_path / "c"
    with pytest.raises(DiskSpaceError, match="no space left.*shard_00001.*resume"):
        write_cache(FakeTeacher(), FakeDataset(), out, **WRITE_OPTIONS)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["file"] for r in manifest["shards"]] == ["shard_00000.safetensors"]
    monkeypatch.setattr(cache_format, "_write_chunks", original)
    write_cache(FakeTeacher(), FakeDataset(), out, **WRITE_OPTIONS)
    assert cache_files(out) == cache_files(reference)


# ---------------------------------------------------------------------- verification


def test_flipped_byte_is_caught_and_named(reference_copy: Path) -> None:
    path = reference_copy / "shard_00001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 100] ^= 0x01
    path.write_bytes(bytes(raw))
    cache = open_cache(reference_copy)
    cache.load_shard(0)
    with pytest.raises(CorruptShardError) as info:
        cache.load_shard(1)
    expected = cache.manifest["shards"][1]["sha256"]
    message = str(info.value)
    assert str(path) in message and expected in message
    assert hashlib.sha256(raw).hexdigest() in message
    with pytest.raises(CorruptShardError, match="1 of 4 shards") as info:
        verify_cache(reference_copy)
    assert "shard_00001" in str(info.value) and "shard_00000" not in str(info.value)


def test_truncated_shard_is_caught_and_named(reference_copy: Path) -> None:
    path = reference_copy / "shard_00002.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CorruptShardError, match="shard_00002.*truncated"):
        open_cache(reference_copy)
    cache = open_cache(reference_copy, verify=False)  # even unverified, parsing refuses it
    with pytest.raises(CorruptShardError, match="shard_00002.*not a valid safetensors"):
        cache.load_shard(2)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptShardError, match="shard_00002"):
        cache.load_shard(2)


class _Trap:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_in_place_of_a_shard_is_never_unpickled(
    reference_copy: Path, tmp_path: Path, writer: str
) -> None:
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Trap(tmp_path / "control")))
    assert (tmp_path / "control").exists()  # the payload is live
    path = reference_copy / "shard_00000.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"x": _Trap(marker)}))
    else:
        torch.save({"x": _Trap(marker)}, path)
    with pytest.raises(CorruptShardError, match="shard_00000"):
        open_cache(reference_copy).load_shard(0)
    # Even with a manifest that vouches for the file, it is parsed as safetensors only.
    manifest = json.loads((reference_copy / "manifest.json").read_text())
    raw = path.read_bytes()
    manifest["shards"][0].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    (reference_copy / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):
        with pytest.raises(CorruptShardError, match="shard_00000.*not a valid safetensors"):
            open_cache(reference_copy, verify=verify).load_shard(0)
    assert not marker.exists()


def test_shard_with_wrong_shapes_is_refused(reference_copy: Path) -> None:
    cache = open_cache(reference_copy)
    shard = cache.load_shard(3)
    shard["x"] = shard["x"][:, :2].contiguous()
    path = reference_copy / "shard_00003.safetensors"
    safetensors.torch.save_file(shard, path)
    cache.manifest["shards"][3]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CorruptShardError, match=r"shard_00003.*'x' is \(6, 2, 3, 8\)"):
        cache.load_shard(3)


def test_missing_and_incomplete_caches_say_what_to_do(tmp_path: Path, reference_copy: Path) -> None:
    with pytest.raises(CacheError, match="no activation cache.*clt cache --config"):
        open_cache(tmp_path / "nothing")
    (reference_copy / "shard_00003.safetensors").unlink()
    with pytest.raises(CacheError, match="shard_00003.safetensors.*missing"):
        open_cache(reference_copy)


def test_parser_rejects_malformed_headers() -> None:
    def file(header: Any, data: bytes = b"") -> bytearray:
        raw = json.dumps(header).encode()
        return bytearray(len(raw).to_bytes(8, "little") + raw + data)

    parse_safetensors(file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"0000"))
    bad = [
        file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"0000"),
        file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"0000"),
        file({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, b"0000"),
        file({"a": "nonsense"}),
        file([1, 2, 3]),
        bytearray(b"\xff" * 8 + b"{}"),
    ]
    for data in bad:
        with pytest.raises(CorruptShardError, match="<memory>"):
            parse_safetensors(data)


# ------------------------------------------------------------------- bad images, tokens


def test_unreadable_image_raises_by_default_and_names_it(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match=r"image 11 .*/data/fake/0011\.png"):
        write_cache(FakeTeacher(), FakeDataset(bad=(11,)), tmp_path, **WRITE_OPTIONS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]  # shard 0 survives


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_images_are_skipped_and_recorded(tmp_path: Path, num_workers: int) -> None:
    bad = (3, *range(8, 16))  # shard 1 is entirely unreadable
    out = write_cache(
        FakeTeacher(),
        FakeDataset(bad=bad),
        tmp_path / "c",
        on_bad_image="skip",
        num_workers=num_workers,
        **WRITE_OPTIONS,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["image_id"] for s in manifest["skipped"]] == list(bad)
    assert all(f"/data/fake/{s['image_id']:04d}.png" in s["reason"] for s in manifest["skipped"])
    assert manifest["n_skipped"] == len(bad) and manifest["n_images"] == N_IMAGES - len(bad)
    cache = open_cache(out)
    assert cache.shard_image_counts == [7, 0, 8, 6]
    assert cache.load_shard(1)["x"].shape == (0, TOKENS, N_LAYERS, D_MODEL)
    good = [i for i in range(N_IMAGES) if i not in bad]
    data, ref = load_all(out), reference_capture(good, torch.float16)
    assert data["image_id"].tolist() == good and torch.equal(data["x"], ref.x)
    np.testing.assert_allclose(cache.stats().y_var, numpy_stats(data["y"])["var"], rtol=1e-12)


def test_cls_tokens(tmp_path: Path) -> None:
    out = write_cache(FakeTeacher(), FakeDataset(), tmp_path, tokens="cls", **WRITE_OPTIONS)
    data, ref = load_all(out), reference_capture(list(range(N_IMAGES)), torch.float16)
    assert open_cache(out).tokens_per_image == 1
    assert torch.equal(data["token_index"], torch.zeros(N_IMAGES, 1, dtype=torch.int64))
    assert torch.equal(data["x"], ref.x[:, :1]) and torch.equal(data["y"], ref.y[:, :1])


def test_cls_plus_random_tokens_are_seeded_per_image(tmp_path: Path) -> None:
    options = {"tokens": "cls+random", "n_random_patches": 3, "seed": 7, **WRITE_OPTIONS}
    out = write_cache(FakeTeacher(), FakeDataset(), tmp_path / "a", **options)
    data, ref = load_all(out), reference_capture(list(range(N_IMAGES)), torch.float16)
    expected = np.zeros((N_IMAGES, 4), dtype=np.int64)
    for i in range(N_IMAGES):  # independent re-derivation of the documented rule
        rng = np.random.default_rng([7, i])
        expected[i, 1:] = np.sort(rng.choice(TOKENS - 1, size=3, replace=False)) + 1
    np.testing.assert_array_equal(data["token_index"].numpy(), expected)
    rows = torch.arange(N_IMAGES)[:, None]
    index = data["token_index"]
    assert torch.equal(data["x"], ref.x[rows, index]) and torch.equal(data["y"], ref.y[rows, index])
    other = write_cache(FakeTeacher(), FakeDataset(), tmp_path / "b", **{**options, "seed": 8})
    assert not torch.equal(load_all(other)["token_index"], data["token_index"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "fp8"}, "dtype='fp8'.*'bf16', 'fp16', 'fp32'"),
        ({"tokens": "patches"}, "tokens='patches'"),
        ({"on_bad_image": "ignore"}, "on_bad_image='ignore'"),
        ({"tokens": "cls+random", "n_random_patches": 6}, "n_random_patches=6.*1..5"),
        ({"images_per_shard": 0}, "images_per_shard=0"),
    ],
)
def test_invalid_arguments_name_the_key(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        write_cache(FakeTeacher(), FakeDataset(), tmp_path, **{**WRITE_OPTIONS, **options})


def test_fp16_overflow_is_refused_with_advice(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"layer\(s\) \[.*not finite.*fp16.*bf16"):
        write_cache(FakeTeacher(scale=1e4), FakeDataset(), tmp_path / "a", **WRITE_OPTIONS)
    out = write_cache(
        FakeTeacher(scale=1e4), FakeDataset(), tmp_path / "b", dtype="bf16", **WRITE_OPTIONS
    )
    assert torch.isfinite(open_cache(out).stats().y_mean_sq_norm).all()


# ------------------------------------------------------------------------- statistics


def test_chunked_moments_match_numpy_despite_a_large_offset() -> None:
    rng = np.random.default_rng(0)
    values = 1e4 + rng.standard_normal((1000, 2, 5))  # mean >> std: naive sums lose digits
    moments = Moments.empty(2, 5)
    for piece in np.split(values, [1, 3, 200, 201, 640]):
        moments = moments.merge(Moments.of(torch.from_numpy(piece)))
    np.testing.assert_allclose(moments.mean, values.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(moments.var(), values.var(axis=0).sum(axis=-1), rtol=1e-10)
    chunked = Moments.of_chunks(torch.from_numpy(values), chunk_tokens=64)
    np.testing.assert_allclose(chunked.m2, moments.m2, rtol=1e-10)
    assert Moments.empty(2, 5).merge(chunked) is chunked


# ----------------------------------------------------------------------- real teacher


def test_real_tiny_teacher_matches_open_clip_modules(tiny_teacher: Any, tmp_path: Path) -> None:
    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> tuple[Tensor, int]:
            return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), i

        def identity(self) -> dict[str, Any]:
            return {"name": "random", "split": "test", "n_images": 5}

    dataset = Images()
    out = write_cache(
        tiny_teacher, dataset, tmp_path, images_per_shard=3, batch_size=2, progress=False
    )
    data = load_all(out)
    images = torch.stack([dataset[i][0] for i in range(5)])
    blocks = tiny_teacher.clip.visual.transformer.resblocks
    seen: dict[str, list[Tensor]] = {"x": [], "y": []}
    hooks = [
        h
        for block in blocks
        for h in (
            block.ln_2.register_forward_hook(lambda m, i, o: seen["x"].append(o)),
            block.mlp.register_forward_hook(lambda m, i, o: seen["y"].append(o)),
        )
    ]
    with torch.no_grad():
        tiny_teacher.clip.visual(images)
    for hook in hooks:
        hook.remove()
    for name in ("x", "y"):
        expected = torch.stack(seen[name], dim=2)  # [N, T, L, d] (open_clip is batch first)
        assert data[name].shape == expected.shape == (5, 17, 3, 32)
        torch.testing.assert_close(data[name].float(), expected, rtol=1e-3, atol=1e-5)
    assert open_cache(out).manifest["teacher"] == tiny_teacher.identity()
