"""Which cache is this: its settings, whether a cache matches them, and resuming it.

Owns the settings a cache is made with (`cache_settings`), the one answer to "does this
cache match these settings" (`manifest_mismatches`: `clt cache` before resuming and the
datamodule before training, through `config_mismatches`, both ask it), starting or resuming a cache from its manifest
(`start_or_resume`), the safety checks before writing (foreign files, listed shards, free
disk space) and the exclusive writer lock.

Design decision: shard i always covers dataset image ids [i * images_per_shard,
(i + 1) * images_per_shard) minus skipped unreadable images, and batches never straddle
shards. The resume point is therefore a function of the manifest's shard count alone, and
a resumed run feeds the teacher exactly the batches an uninterrupted run would; a cache is
never appended to with other settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from torch import Tensor
from tqdm.auto import tqdm

from clt_lightning.data.cache_format import (
    DTYPES,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_FILE_RE,
    StoredTokens,
    read_manifest,
)
from clt_lightning.data.cache_manifest import validate_manifest
from clt_lightning.data.cache_shards import CacheState
from clt_lightning.data.cache_stats import Moments
from clt_lightning.data.datasets import resolve_split
from clt_lightning.errors import CacheError, ConfigError, CorruptShardError, DiskSpaceError
from clt_lightning.files import human_bytes
from clt_lightning.hashing import file_sha256, json_sha256
from clt_lightning.teacher_loading import read_model_config

if TYPE_CHECKING:
    from clt_lightning.data.datasets import DatasetConfig
    from clt_lightning.teacher import TeacherConfig

try:  # POSIX only; elsewhere concurrent writers are not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("clt_lightning.data.cache")  # one logger for all cache_* modules


class CacheTeacher(Protocol):
    """What `write_cache` needs from `clt_lightning.teacher.Teacher`."""

    n_layers: int
    d_model: int
    tokens_per_image: int

    def identity(self) -> dict[str, Any]: ...

    def capture(self, images: Tensor) -> Any: ...  # Capture(x [N,T,L,d], y [N,T,L,d])


class CacheDataset(Protocol):
    """What `write_cache` needs from `clt_lightning.data.image_datasets.ImageDataset`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Tensor, int]: ...

    def identity(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------ settings & matching


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, paths -> strings)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def cache_settings(
    teacher: CacheTeacher,
    dataset: CacheDataset,
    dtype: str,
    stored: StoredTokens,
    images_per_shard: int,
) -> dict[str, Any]:
    """The manifest fields that must match for a cache to be resumed or reused.

    Args:
        teacher: The teacher (its `identity()` is stored).
        dataset: The split's image dataset (its `identity()` is stored).
        dtype: Stored dtype of x and y ("fp16", "bf16" or "fp32").
        stored: Which tokens of each image are stored.
        images_per_shard: Dataset ids per shard file.
    """
    teacher_identity = _jsonable(teacher.identity())
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_identity,
        "dataset": _jsonable(dataset.identity()),
        "dataset_n_images": len(dataset),
        "input_site": teacher_identity.get("input_site"),
        "n_layers": int(teacher.n_layers),
        "d_model": int(teacher.d_model),
        "tokens_per_image": stored.n_tokens,
        "teacher_tokens_per_image": int(teacher.tokens_per_image),
        "dtype": dtype,
        "tokens": stored.settings(),
        "images_per_shard": images_per_shard,
    }


class Mismatch(NamedTuple):
    """A manifest field whose value is not the one requested.

    Attributes:
        field: Dotted manifest field (`dtype`, `teacher.weights_sha256`).
        cached: Its value in the manifest (None when the manifest lacks it).
        requested: The value asked for.
    """

    field: str
    cached: Any
    requested: Any


def manifest_mismatches(
    manifest: Mapping[str, Any], requested: Mapping[str, Any]
) -> list[Mismatch]:
    """Does this cache match these settings? The fields that say no, in `requested` order.

    The one check of a cache against settings: `start_or_resume` (the writer, with every
    field of `cache_settings`) and the datamodule (with the fields its config knows, before
    loading the teacher) both call it. Values are compared whole (a nested object differs
    when any of its fields does, including a field only one side has).

    Args:
        manifest: A cache manifest (as read from manifest.json).
        requested: Dotted manifest field -> the value these settings need there.

    Returns:
        One `Mismatch` per differing field; empty when the cache matches.
    """
    out = []
    for field, want in requested.items():
        have: Any = manifest
        for part in field.split("."):
            have = have.get(part) if isinstance(have, Mapping) else None
        if have != want:
            out.append(Mismatch(field, have, want))
    return out


_CONFIG_KEYS = {  # manifest field -> the config key users see in the message
    "dtype": "cache_dtype",
    "tokens": "cache_tokens",
    "teacher.model_config_sha256": "teacher.model_config (sha256)",
    "teacher.weights_sha256": "teacher.weights (sha256)",
}


def config_mismatches(
    manifest: Mapping[str, Any],
    teacher: TeacherConfig,
    dataset: DatasetConfig,
    split: str,
    cache_options: Mapping[str, Any],
    seed: int,
) -> list[str]:
    """Config fields that disagree with a cache manifest, checked without loading the teacher.

    Asks `manifest_mismatches` (the check `clt cache` makes before resuming) about what is
    cheap to know from the config: teacher name, pretrained tag, precision and input site;
    dataset name, split and max_images; stored dtype and token selection. (Weights are
    identified by hash in the manifest; `clt cache` checks those on resume.)

    Args:
        manifest: The cache's manifest.
        teacher: `data.teacher` of the config.
        dataset: `data.dataset` of the config.
        split: "train" or "val".
        cache_options: The datamodule's `write_cache` keyword arguments (dtype, tokens, ...).
        seed: `data.seed` (the "cls+random" draw's seed).

    Returns:
        One "key: cache has A, config has B" line per mismatch.
    """
    tokens = {"mode": cache_options["tokens"]}
    if tokens["mode"] == "cls+random":
        tokens.update(n_random_patches=cache_options["n_random_patches"], seed=seed)
    requested = {
        "teacher.pretrained": teacher.pretrained,
        "teacher.precision": teacher.precision,
        "teacher.input_site": teacher.input_site,
        "dataset.name": dataset.name,
        "dataset.split": resolve_split(dataset, split),
        "dataset.max_images": dataset.max_images,
        "dtype": cache_options["dtype"],
        "tokens": tokens,
    }
    if teacher.model_config is None:
        requested["teacher.model_name"] = teacher.model_name
    else:  # same shapes, another model: only the hash tells (what `clt cache` compares)
        requested["teacher.model_config_sha256"] = _model_config_sha256(teacher.model_config)
    if teacher.weights is not None:  # reads the file once per setup (~1 s per GB)
        requested["teacher.weights_sha256"] = file_sha256(teacher.weights)
    return [
        f"{_CONFIG_KEYS.get(m.field, m.field)}: cache has {m.cached!r}, config has {m.requested!r}"
        for m in manifest_mismatches(manifest, requested)
    ]


def _model_config_sha256(path: str) -> str | None:
    """The teacher identity's `model_config_sha256` (the same read and hash as `Teacher`)."""
    try:
        return json_sha256(read_model_config(Path(path)))
    except ConfigError:
        return None  # the teacher reports the bad file when it is built


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted field names whose values differ, as `field: old (cache) vs new (requested)`.

    Nested objects are compared field by field; a field on one side only shows `<absent>`.
    """
    a, b = _flatten(dict(old)), _flatten(dict(new))
    absent = "<absent>"
    return [
        f"{key}: {a.get(key, absent)!r} (cache) vs {b.get(key, absent)!r} (requested)"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, absent) != b.get(key, absent)
    ]


def check_foreign_files(out_dir: Path) -> None:
    """Refuse to start a cache in a folder holding anything but leftovers of a cache.

    Raises:
        CacheError: Naming up to five foreign files.
    """
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if not (SHARD_FILE_RE.fullmatch(p.name) or p.name == LOCK_NAME or p.name.endswith(".tmp"))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise CacheError(
            f"{out_dir} has no {MANIFEST_NAME} but is not empty ({shown}); refusing to write an "
            f"activation cache into it: choose an empty or new folder"
        )


def _check_listed_shards(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Before appending: every listed shard is there, of its size, and of its sha256 (a
    bit flip in a listed shard would otherwise be resumed and marked complete)."""
    shards = manifest["shards"]
    for record in shards:
        path = out_dir / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise CorruptShardError(
                f"{path} is listed in {out_dir / MANIFEST_NAME} with {record['bytes']} bytes "
                f"but is {found}; delete {out_dir} and rerun to rebuild the cache"
            )
    for record in tqdm(shards, desc="verifying written shards", unit="shard", leave=False):
        path = out_dir / record["file"]
        if file_sha256(path) != record["sha256"]:
            raise CorruptShardError(
                f"{path} does not match its sha256 in {out_dir / MANIFEST_NAME} (corrupted "
                f"since it was written); delete {out_dir} and rerun to rebuild the cache"
            )


def start_or_resume(out_dir: Path, settings: dict[str, Any], batch_size: int) -> CacheState | None:
    """Load a matching unfinished cache, start a new one, or return None when complete.

    Args:
        out_dir: The cache folder (existing).
        settings: `cache_settings` of this run.
        batch_size: Images per teacher forward (a change is allowed, with a warning).

    Raises:
        CacheError: The folder holds a cache made with other settings (names the fields),
            or holds unrelated files.
    """
    manifest_path = out_dir / MANIFEST_NAME
    n_layers, d_model = settings["n_layers"], settings["d_model"]
    if not manifest_path.exists():
        check_foreign_files(out_dir)
        manifest = {
            **settings,
            "complete": False,
            "batch_size": batch_size,
            "n_images": 0,
            "n_skipped": 0,
            "shards": [],
            "skipped": [],
        }
        return CacheState(
            manifest, Moments.empty(n_layers, d_model), Moments.empty(n_layers, d_model)
        )
    manifest = read_manifest(manifest_path)
    validate_manifest(manifest_path, manifest)
    mismatches = manifest_mismatches(manifest, settings)
    if mismatches:
        diff = settings_diff(
            {m.field: m.cached for m in mismatches}, {m.field: m.requested for m in mismatches}
        )
        raise CacheError(
            f"the cache in {out_dir} was made with different settings:\n  "
            + "\n  ".join(diff)
            + f"\nIt is never appended to or reused: choose another folder or delete {out_dir}."
        )
    if manifest.get("complete"):
        return None
    _check_listed_shards(out_dir, manifest)
    if manifest.get("batch_size") != batch_size:
        logger.warning(
            "resuming with batch_size=%d (the cache was started with %s): new shards may "
            "differ from an uninterrupted run in the last bits",
            batch_size,
            manifest.get("batch_size"),
        )
    stats = manifest["stats"]
    x = Moments.from_json(stats["n_tokens"], stats["x"], n_layers, d_model)
    y = Moments.from_json(stats["n_tokens"], stats["y"], n_layers, d_model)
    return CacheState(manifest, x, y)


@contextlib.contextmanager
def exclusive_lock(out_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on `out_dir/.lock` so two writers never share a folder.

    Raises:
        CacheError: Another process holds it.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(out_dir / LOCK_NAME, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise CacheError(
                f"another process is writing the cache in {out_dir}; wait for it to finish"
            ) from e
        yield


def check_disk_space(out_dir: Path, n_images: int, settings: Mapping[str, Any]) -> None:
    """Refuse to start when the remaining shards cannot fit on the device.

    Args:
        out_dir: The cache folder.
        n_images: Images still to write.
        settings: The manifest (tokens_per_image, n_layers, d_model, dtype).

    Raises:
        DiskSpaceError: The estimate (2 x T' x L x d x dtype bytes per image) exceeds the
            free space.
    """
    per_image = (
        2
        * settings["tokens_per_image"]
        * settings["n_layers"]
        * settings["d_model"]
        * DTYPES[settings["dtype"]].itemsize
    )
    needed = n_images * per_image
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise DiskSpaceError(
            f"the cache in {out_dir} needs about {human_bytes(needed)} more "
            f"({n_images} images x {human_bytes(per_image)}) but only {human_bytes(free)} is "
            f"free there; free space, choose another folder, or cache fewer tokens "
            f"(tokens='cls+random') or a smaller dtype"
        )
    logger.info("cache needs ~%s, %s free", human_bytes(needed), human_bytes(free))
