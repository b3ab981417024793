"""Retrieval index folders: manifest and provenance checks, loading and searching.

Part of layer-wise retrieval (`retrieval` runs it end to end). ``manifest.json``
(`MANIFEST_NAME`, written last by `build_index`, so its presence means the folder is
complete) records the teacher identity, the CLT fingerprint, the dataset identity,
aggregation, similarity, index type, image ids, labels, class names and a sha256 per file.
`RetrievalIndex.load` checks the format version, the files and (optionally) their hashes;
`provenance_problems` and `RetrievalIndex.check_query` refuse a query made with another CLT,
teacher or aggregation instead of silently answering with stale neighbours.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
from torch import Tensor

from clt_lightning.errors import (
    CacheError,
    CheckpointMismatchError,
    ConfigError,
    DataNotFoundError,
)
from clt_lightning.evaluation.retrieval_descriptors import (
    DescriptorFiles,
    QueryDescriptors,
    json_normal,
)
from clt_lightning.evaluation.retrieval_index import (
    IndexPlan,
    prepare_vectors,
    set_nprobe,
    to_search_device,
)
from clt_lightning.hashing import file_sha256

log = logging.getLogger(__name__)


FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_WHAT = "a retrieval index"
INDEX_SUFFIXES = (".faiss", ".npy", ".json", ".partial", ".tmp")


def index_folder_owned(entry: Path) -> bool:
    """Entries an index folder may hold (replaced as a whole by a rebuild)."""
    return entry.is_file() and entry.suffix in INDEX_SUFFIXES


def build_manifest(descriptors: DescriptorFiles, plan: IndexPlan, dim: int, **fields: Any) -> dict:
    """The index manifest: `fields` plus the plan and the corpus of the descriptors."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "clt-lightning retrieval index",
        **fields,
        "index_type": plan.factory,
        "nprobe": plan.nprobe,
        "estimated_bytes_per_layer": plan.estimated_bytes,
        "n_images": len(descriptors.image_ids),
        "dim": dim,
        "layers": list(descriptors.layers),
        "image_ids": descriptors.image_ids.tolist(),
        "labels": descriptors.labels.tolist(),
    }


REBUILD_HINT = (
    "rebuild the index with `clt retrieve ... --retrieval.rebuild true` "
    "(Python: build_and_query(..., rebuild=True) or build_index(...))"
)


class LayerNeighbours(NamedTuple):
    """The top-k corpus neighbours of every query at one layer."""

    layer: int
    """Layer i whose codes z_i were compared (0-based)."""
    ids: np.ndarray
    """[Q, k] int64 corpus image ids (index in the corpus split); -1 where none was found."""
    scores: np.ndarray
    """[Q, k] float32 similarity; cosine/ip: larger is closer, l2: squared distance (smaller
    is closer); NaN where ids is -1."""
    labels: np.ndarray
    """[Q, k] int64 class labels of the neighbours; -1 where ids is -1."""


# ----------------------------------------------------------------------------- load, search


def provenance_problems(manifest: dict, **wanted: Any) -> list[str]:
    """Differences between what an index was built from and what a caller wants.

    Args:
        manifest: The index manifest.
        **wanted: Any of ``teacher``, ``clt_fingerprint``, ``aggregation``, ``dataset``,
            ``similarity``, ``index_type``, ``layers`` (values None are not checked; for
            ``layers``, a subset of the indexed layers is fine).

    Returns:
        One readable line per difference (empty when compatible).
    """
    problems = []
    for key, value in wanted.items():
        if value is None:
            continue
        value, built = json_normal(value), manifest.get(key)
        if key == "layers":
            missing = sorted(set(value) - set(built or []))
            if missing:
                problems.append(f"layers {missing} are not indexed (indexed: {built})")
        elif value == built:
            continue
        elif key == "teacher":
            built = built or {}
            keys = sorted(k for k in set(value) | set(built) if value.get(k) != built.get(k))
            diff = "; ".join(f"{k}: index {built.get(k)!r} vs query {value.get(k)!r}" for k in keys)
            problems.append(f"teacher differs ({diff})")
        elif key == "clt_fingerprint":
            problems.append(
                f"the index was built for CLT {built} but the query comes from CLT {value} "
                "(another checkpoint, training step or sparsifier setting)"
            )
        else:
            problems.append(f"{key}: index built with {built!r}, requested {value!r}")
    return problems


def raise_on_mismatch(path: Path, problems: list[str]) -> None:
    """Raise `CheckpointMismatchError` listing `provenance_problems` (none: no-op).

    Args:
        path: The index folder, named in the message.
        problems: From `provenance_problems`.
    """
    if problems:
        raise CheckpointMismatchError(
            f"retrieval index {path} does not match this query: "
            + "; ".join(problems)
            + f". The index is stale for this setup: {REBUILD_HINT}"
        )


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataNotFoundError(
            f"no retrieval index at {path} ({MANIFEST_NAME} missing: never built, or a build "
            "was interrupted); build it with `clt retrieve` or build_index(...)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{manifest_path} is not valid JSON ({err}); {REBUILD_HINT}") from err
    if not isinstance(manifest, dict):
        raise CacheError(f"{manifest_path} is not a JSON object; {REBUILD_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this "
            f"version reads {FORMAT_VERSION}; {REBUILD_HINT}"
        )
    _validate_fields(manifest_path, manifest)
    return manifest


_MANIFEST_TYPES = {"files": dict, "n_images": int, "dim": int, "layers": list, "labels": list,
                   "image_ids": list, "class_names": list, "aggregation": str,
                   "similarity": str, "clt_fingerprint": str}  # fmt: skip


def _validate_fields(manifest_path: Path, manifest: dict) -> None:
    """Every field a load or a search uses, before any is used (CacheError names it)."""

    def fail(field: str, problem: str) -> CacheError:
        return CacheError(
            f"retrieval index manifest {manifest_path}: field {field!r} {problem}; {REBUILD_HINT}"
        )

    for field, kind in _MANIFEST_TYPES.items():
        if field not in manifest:
            raise fail(field, "is missing")
        if not isinstance(manifest[field], kind) or isinstance(manifest[field], bool):
            raise fail(field, f"is {manifest[field]!r}, not a {kind.__name__}")
    for field in ("labels", "image_ids"):
        if len(manifest[field]) != manifest["n_images"]:
            raise fail(
                field, f"has {len(manifest[field])} entries, n_images is {manifest['n_images']}"
            )
    if not all(isinstance(layer, int) for layer in manifest["layers"]):
        raise fail("layers", "is not a list of layer indices")


def _read_layer_index(path: Path, manifest: dict, layer: int, verify: bool) -> faiss.Index:
    name = f"layer_{layer:02d}.faiss"
    file = path / name
    if not file.is_file():
        raise CacheError(f"retrieval index file {file} is missing; {REBUILD_HINT}")
    if verify and file_sha256(file) != manifest["files"].get(name):
        raise CacheError(f"retrieval index file {file} fails its sha256 check; {REBUILD_HINT}")
    index = faiss.read_index(str(file))
    if index.ntotal != manifest["n_images"] or index.d != manifest["dim"]:
        raise CacheError(
            f"{file} holds {index.ntotal} vectors of dim {index.d}, the manifest says "
            f"{manifest['n_images']} of dim {manifest['dim']}; {REBUILD_HINT}"
        )
    set_nprobe(index, manifest.get("nprobe"))
    return index


class RetrievalIndex:
    """Per-layer FAISS indexes over a corpus, with the manifest that says what they are.

    Attributes:
        path: The index folder.
        manifest: Its ``manifest.json`` (see docs/retrieval.md).
        indexes: layer -> FAISS index (on the GPU when one was used for search).
    """

    def __init__(self, path: Path, manifest: dict, indexes: dict[int, faiss.Index]):
        self.path, self.manifest, self.indexes = path, manifest, indexes
        self.labels = np.asarray(manifest["labels"], dtype=np.int64)
        self.image_ids = np.asarray(manifest["image_ids"], dtype=np.int64)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        layers: Sequence[int] | None = None,
        verify: bool = True,
        use_gpu: bool | None = None,
    ) -> RetrievalIndex:
        """Read an index folder written by `build_index`, checking it on the way.

        Args:
            path: The folder.
            layers: Layers to load (default: all that were indexed).
            verify: Check each file's sha256 against the manifest.
            use_gpu: Search on the GPU: True, False, or None for "when available".

        Raises:
            DataNotFoundError: No manifest (never built or interrupted).
            CacheError: Wrong format version, missing or corrupt file (named).
        """
        path = Path(path)
        manifest = _read_manifest(path)
        raise_on_mismatch(path, provenance_problems(manifest, layers=layers))
        wanted = manifest["layers"] if layers is None else list(layers)
        indexes = {}
        for layer in wanted:
            index = _read_layer_index(path, manifest, layer, verify)
            indexes[layer] = to_search_device(index, use_gpu)[0]
        return cls(path, manifest, indexes)

    @property
    def layers(self) -> tuple[int, ...]:
        """The loaded layers, in order."""
        return tuple(self.indexes)

    @property
    def aggregation(self) -> str:
        """Token aggregation the index was built with ("cls", "patches" or "all")."""
        return self.manifest["aggregation"]

    @property
    def similarity(self) -> str:
        """Similarity the index was built with: cosine, ip or l2 (how scores read)."""
        return self.manifest["similarity"]

    @property
    def class_names(self) -> list[str]:
        """The corpus's class names, by label."""
        return self.manifest["class_names"]

    def check_query(
        self, *, teacher: dict | None, clt_fingerprint: str | None, aggregation: str | None
    ) -> None:
        """Raise `CheckpointMismatchError` unless a query comes from the index's setup.

        The message names what differs (both CLT fingerprints in full, the differing teacher
        keys, both aggregations) and says to rebuild.
        """
        problems = provenance_problems(
            self.manifest, teacher=teacher, clt_fingerprint=clt_fingerprint, aggregation=aggregation
        )
        raise_on_mismatch(self.path, problems)

    def _query_matrix(self, query: QueryDescriptors | np.ndarray | Tensor) -> np.ndarray:
        if isinstance(query, QueryDescriptors):
            self.check_query(
                teacher=query.teacher,
                clt_fingerprint=query.clt_fingerprint,
                aggregation=query.aggregation,
            )
            missing = [layer for layer in self.layers if layer not in query.layers]
            if missing:
                raise ConfigError(f"the query has no descriptors for indexed layers {missing}")
            return query.descriptors[[query.layers.index(layer) for layer in self.layers]]
        matrix = query.cpu().numpy() if isinstance(query, Tensor) else np.asarray(query)
        if (
            matrix.ndim != 3
            or matrix.shape[0] != len(self.layers)
            or matrix.shape[2] != self.manifest["dim"]
        ):
            raise ConfigError(
                f"query descriptors must be [L={len(self.layers)}, Q, F={self.manifest['dim']}] "
                f"(layers {list(self.layers)}); got shape {tuple(matrix.shape)}"
            )
        return matrix

    def search(
        self, query: QueryDescriptors | np.ndarray | Tensor, k: int = 3
    ) -> list[LayerNeighbours]:
        """Top-k corpus neighbours of each query, layer by layer.

        Args:
            query: `QueryDescriptors` (checked against the manifest), or a raw [L, Q, F]
                array whose first axis follows `layers` (not checked: the caller vouches).
            k: Neighbours per query and layer (at most the corpus size).

        Returns:
            One `LayerNeighbours` per loaded layer, ids/scores/labels [Q, k].
        """
        if k < 1:
            raise ConfigError(f"k={k} is not valid; ask for at least 1 neighbour")
        matrix = self._query_matrix(query)
        k = min(k, int(self.manifest["n_images"]))
        results = []
        for layer, descriptors in zip(self.layers, matrix, strict=True):
            scores, rows = self.indexes[layer].search(
                prepare_vectors(descriptors, self.similarity), k
            )
            found = rows >= 0
            results.append(
                LayerNeighbours(
                    layer=layer,
                    ids=np.where(found, self.image_ids[rows], -1).astype(np.int64),
                    scores=np.where(found, scores, np.nan).astype(np.float32),
                    labels=np.where(found, self.labels[rows], -1).astype(np.int64),
                )
            )
        return results
