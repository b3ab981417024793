"""Layer-wise retrieval on CLT sparse codes, end to end (paper supplementary, section 7,
Figures 4-5): `build_index`, `query_image` and `build_and_query` (the `clt retrieve`
pipeline).

For every corpus image j and layer i the CLT's sparse code z_i (one [F] vector per token)
is aggregated over tokens into one descriptor, and every layer gets its own FAISS index. A
query image's descriptors then retrieve its top-K neighbours layer by layer, which shows
what the codes of each layer "mean" (colour and layout early, class late).

Each step has its module, imported directly:

- `retrieval_descriptors`: the token-aggregated descriptors, streamed in bounded memory into
  one ``.npy`` memmap per layer; query descriptors (`QueryDescriptors`); `clt_fingerprint`.
- `retrieval_index`: similarity, index type (``Flat``, ``SQfp16``, ``IVF{nlist},PQ{m}``, see
  `choose_index_type`), the plan within a memory budget, training on a bounded sample, adding
  chunk by chunk, GPU placement, and writing each layer's index.
- `retrieval_search`: the manifest (written last, atomically, so its presence means the
  folder is complete), provenance checks that refuse a query made with another CLT, teacher
  or aggregation, and `RetrievalIndex` (load, verify, search).
- `retrieval_plot`: the grid figure.

Peak memory is one batch, one encode block, one add chunk and one index, never the whole
corpus of descriptors. The index folder holds ``layer_XX.faiss``,
``descriptors_layer_XX.npy`` (raw, unnormalised descriptors, readable with numpy alone) and
``manifest.json``; no pickle.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from clt_lightning.data.image_datasets import open_image
from clt_lightning.errors import ConfigError, DataNotFoundError, UnreadableImageError
from clt_lightning.evaluation.retrieval_descriptors import (
    AGGREGATIONS,
    DESCRIPTOR_DTYPES,
    SIMILARITIES,
    DescriptorFiles,
    check_choice,
    clt_fingerprint,
    compute_descriptors,
    compute_query_descriptors,
    dataset_identity,
    json_normal,
    n_latents_of,
)
from clt_lightning.evaluation.retrieval_index import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    IndexPlan,
    new_index,
    plan_index,
    write_layer_indexes,
)
from clt_lightning.evaluation.retrieval_plot import retrieval_grid
from clt_lightning.evaluation.retrieval_search import (
    INDEX_WHAT,
    MANIFEST_NAME,
    LayerNeighbours,
    RetrievalIndex,
    build_manifest,
    index_folder_owned,
    provenance_problems,
    raise_on_mismatch,
)
from clt_lightning.evaluation.undefined import Undefined, write_json
from clt_lightning.files import check_replaceable, commit_folder, recover_folder

log = logging.getLogger(__name__)


_AGGREGATION_WORDS = {
    "cls": "[CLS] token",
    "registers": "mean of register tokens",
    "patches": "mean of patch tokens",
    "all": "mean of all tokens",
}


class RetrievalResult(NamedTuple):
    """What `build_and_query` produced."""

    index_dir: Path
    """Folder with the per-layer indexes and their manifest."""
    grid_path: Path
    """PNG: rows = layers, first column the query, then its top-k neighbours."""
    json_path: Path
    """JSON: the query and, per layer, the neighbours' ids, classes, scores, descriptions."""
    neighbours: list[LayerNeighbours]
    """Per indexed layer, the neighbours of the (single) query."""
    rebuilt: bool
    """True when the index was (re)built by this call, False when an existing one was reused."""


# ----------------------------------------------------------------------------- build


def _validate_build(
    aggregation: str, similarity: str, dtype: str, clt: nn.Module, index_type: str | None
) -> None:
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("similarity", similarity, SIMILARITIES)
    check_choice("descriptor_dtype", dtype, DESCRIPTOR_DTYPES)
    n_latents = n_latents_of(clt)
    if index_type and n_latents:  # fail before the expensive corpus pass
        new_index(index_type, n_latents, similarity)


def build_index(
    teacher: nn.Module,
    clt: nn.Module,
    corpus: Dataset,
    out_dir: str | Path,
    *,
    aggregation: str = "cls",
    similarity: str = "cosine",
    index_type: str | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    descriptor_dtype: str = "float32",
    keep_descriptors: bool = True,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> RetrievalIndex:
    """Build one FAISS index per layer over a corpus and write them with a manifest.

    Args:
        teacher: `Teacher` (``capture``, ``identity()``).
        clt: `CrossLayerTranscoder` (``encode``).
        corpus: The images to search (the train split), yielding ``(image, label)``, with
            ``class_names`` (and ideally ``identity()``).
        out_dir: Index folder; built beside it and swapped in as a whole, so an existing
            index stays usable until the new one is complete (never a mix of the two).
        aggregation: One of `AGGREGATIONS`.
        similarity: One of `SIMILARITIES`.
        index_type: Force a FAISS factory string (default: `choose_index_type`).
        memory_budget_bytes: For all layers' indexes together; each gets an equal share.
        layers: Layers to index (default: all).
        batch_size: Images per teacher forward.
        num_workers: DataLoader workers.
        descriptor_dtype: "float32" or "float16" for the descriptor memmaps.
        keep_descriptors: Keep ``descriptors_layer_XX.npy`` (to rebuild another index type
            without the teacher); False deletes them once the indexes are written.
        use_gpu: Build on the GPU: True, False, or None for "when available".
        progress: Show a progress bar.

    Returns:
        The loaded `RetrievalIndex`.
    """
    _validate_build(aggregation, similarity, descriptor_dtype, clt, index_type)
    out_dir = Path(out_dir)
    check_replaceable(out_dir, index_folder_owned, INDEX_WHAT)  # before the corpus pass
    provenance = {"teacher": json_normal(teacher.identity()),
                  "clt_fingerprint": clt_fingerprint(clt), "dataset": dataset_identity(corpus),
                  "class_names": list(getattr(corpus, "class_names", [])),
                  "aggregation": aggregation, "similarity": similarity,
                  "descriptor_dtype": descriptor_dtype, "descriptors_kept": keep_descriptors}  # fmt: skip
    with commit_folder(out_dir, index_folder_owned, INDEX_WHAT) as staging:
        files = compute_descriptors(teacher, clt, corpus, staging, aggregation=aggregation,
                                    layers=layers, batch_size=batch_size, num_workers=num_workers,
                                    dtype=descriptor_dtype, progress=progress)  # fmt: skip
        n_images, dim = files.load(0).shape
        plan = plan_index(n_images, dim, memory_budget_bytes // len(files.layers), index_type)
        _write_indexes(files, plan, staging, provenance, use_gpu)
    log.info("retrieval index written to %s (%d layers)", out_dir, len(files.layers))
    return RetrievalIndex.load(out_dir, verify=False, use_gpu=use_gpu)


def _write_indexes(
    files: DescriptorFiles,
    plan: IndexPlan,
    staging: Path,
    provenance: dict[str, Any],
    use_gpu: bool | None,
) -> None:
    """Every layer's index, then the descriptors go (unless kept), then the manifest, last."""
    dim = files.load(0).shape[1]
    file_hashes = write_layer_indexes(files, plan, provenance["similarity"], staging, use_gpu)
    if not provenance["descriptors_kept"]:
        for path in files.paths:
            path.unlink()
    manifest = build_manifest(files, plan, dim, **provenance, files=file_hashes)
    write_json(staging / MANIFEST_NAME, manifest)


# ----------------------------------------------------------------------------- query


def query_image(
    index: RetrievalIndex,
    teacher: nn.Module,
    clt: nn.Module,
    images: Tensor | Image.Image | Sequence[Image.Image],
    k: int = 3,
) -> list[LayerNeighbours]:
    """Retrieve the top-k corpus images of one or more query images, layer by layer.

    The index's provenance is checked first (cheap), so a stale index fails before any
    forward pass.

    Args:
        index: A loaded `RetrievalIndex`.
        teacher: The teacher the index was built with (``preprocess`` for PIL images).
        clt: The CLT the index was built with.
        images: PIL image(s) (preprocessed here), or a preprocessed [Q, 3, H, W] / [3, H, W]
            tensor.
        k: Neighbours per layer.

    Returns:
        One `LayerNeighbours` per indexed layer, [Q, k] each.

    Raises:
        CheckpointMismatchError: Another CLT, teacher or aggregation than the index's.
    """
    fingerprint = clt_fingerprint(clt)
    identity = json_normal(teacher.identity())
    index.check_query(teacher=identity, clt_fingerprint=fingerprint, aggregation=index.aggregation)
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, Tensor):
        images = torch.stack([teacher.preprocess(image.convert("RGB")) for image in images])
    query = compute_query_descriptors(
        teacher, clt, images, index.aggregation, index.layers, fingerprint=fingerprint
    )
    return index.search(query, k)


# ----------------------------------------------------------------------------- reports


UNDEFINED_SCORE = Undefined(
    "the similarity is not a number: the query's or the neighbour's descriptor has no "
    "active latent in this layer (a zero vector has no cosine)"
)


def neighbours_to_json(
    neighbours: Sequence[LayerNeighbours],
    corpus: Any,
    *,
    query: dict,
    similarity: str,
    query_row: int = 0,
) -> dict:
    """A JSON-able record of one query's neighbours per layer.

    Args:
        neighbours: From `RetrievalIndex.search` / `query_image`.
        corpus: The indexed dataset (``class_names``, ``describe_image``).
        query: What the query was (source, label, class), copied into the record.
        similarity: The index's similarity (how to read the scores).
        query_row: Which query of the batch to report.
    """
    class_names = list(getattr(corpus, "class_names", []))
    layers = []
    for result in neighbours:
        entries = []
        for rank, (image_id, score, label) in enumerate(
            zip(
                result.ids[query_row],
                result.scores[query_row],
                result.labels[query_row],
                strict=True,
            ),
            1,
        ):
            if image_id < 0:
                continue
            entries.append(
                {
                    "rank": rank,
                    "image_id": int(image_id),
                    "label": int(label),
                    "class": class_names[label] if 0 <= label < len(class_names) else str(label),
                    "score": float(score) if math.isfinite(score) else UNDEFINED_SCORE,
                    "description": corpus.describe_image(int(image_id))
                    if hasattr(corpus, "describe_image")
                    else None,
                }
            )
        layers.append({"layer": result.layer, "neighbours": entries})
    return {"query": query, "similarity": similarity, "layers": layers}


class _Query(NamedTuple):
    tensor: Tensor  # [1, 3, H, W] preprocessed
    raw: Image.Image
    record: dict  # source, label, class, description
    stem: str


def _open_query(
    teacher: nn.Module, query_path: str | Path | None, query_index: int | None, query_dataset: Any
) -> _Query:
    if (query_path is None) == (query_index is None):
        raise ConfigError(
            "give exactly one of query_path (an image file) or query_index (a val image)"
        )
    if query_path is not None:
        path = Path(query_path)
        if not path.is_file():
            raise DataNotFoundError(f"query image not found: {path}")
        try:
            raw = open_image(path)
        except UnreadableImageError as err:
            raise UnreadableImageError(f"retrieval.query_path: {err}") from err
        record = {"source": str(path), "label": None, "class": None, "description": str(path)}
        return _Query(teacher.preprocess(raw).unsqueeze(0), raw, record, path.stem)
    if query_dataset is None:
        raise ConfigError("query_index needs query_dataset (the val split)")
    if not 0 <= query_index < len(query_dataset):
        raise ConfigError(f"query_index={query_index} is out of range 0..{len(query_dataset) - 1}")
    image, label = query_dataset[query_index]
    names = list(getattr(query_dataset, "class_names", []))
    record = {
        "source": f"val[{query_index}]",
        "label": int(label),
        "class": names[int(label)] if names else str(int(label)),
        "description": query_dataset.describe_image(query_index),
    }
    return _Query(
        image.unsqueeze(0), query_dataset.raw_image(query_index), record, f"val{query_index:05d}"
    )


def _check_request(aggregation: str, similarity: str, k: int) -> None:
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("similarity", similarity, SIMILARITIES)
    if k < 1:
        raise ConfigError(f"k={k} is not valid; ask for at least 1 neighbour")


def _open_or_build(
    teacher: nn.Module,
    clt: nn.Module,
    corpus: Dataset,
    index_dir: Path,
    rebuild: bool,
    build: dict[str, Any],
) -> tuple[RetrievalIndex, bool]:
    """The index in ``index_dir`` if it matches (else `CheckpointMismatchError`), or a new
    one (``rebuild``, or none there); and whether it was built."""
    with contextlib.suppress(OSError):  # read-only storage: use what is there
        recover_folder(index_dir)
    if rebuild or not (index_dir / MANIFEST_NAME).is_file():
        log.info("building the retrieval index in %s", index_dir)
        return build_index(teacher, clt, corpus, index_dir, **build), True
    index = RetrievalIndex.load(index_dir, layers=build["layers"], use_gpu=build["use_gpu"])
    problems = provenance_problems(
        index.manifest,
        teacher=json_normal(teacher.identity()),
        clt_fingerprint=clt_fingerprint(clt),
        dataset=dataset_identity(corpus),
        aggregation=build["aggregation"],
        similarity=build["similarity"],
        index_type=build["index_type"],
    )
    raise_on_mismatch(index_dir, problems)
    log.info("reusing the retrieval index in %s", index_dir)
    return index, False


def build_and_query(
    teacher: nn.Module,
    clt: nn.Module,
    corpus: Dataset,
    index_dir: str | Path,
    output_dir: str | Path,
    *,
    query_path: str | Path | None = None,
    query_index: int | None = None,
    query_dataset: Dataset | None = None,
    k: int = 3,
    aggregation: str = "cls",
    similarity: str = "cosine",
    index_type: str | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    rebuild: bool = False,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> RetrievalResult:
    """Build (or reuse) the per-layer indexes, query one image, write a grid PNG and JSON.

    An index folder is reused when its manifest matches the teacher, CLT fingerprint,
    corpus identity, aggregation, similarity and (if forced) index type; when it does not,
    this raises `CheckpointMismatchError` naming the differences (pass ``rebuild=True``).

    Args:
        teacher: The frozen `Teacher`.
        clt: The trained `CrossLayerTranscoder`.
        corpus: The searched images (train split), built with ``teacher.preprocess``.
        index_dir: Folder of the indexes (built here when it has no manifest).
        output_dir: Folder for ``retrieval_<query>_<aggregation>.png`` and ``.json``.
        query_path: An image file to query (opened with PIL, ``teacher.preprocess``).
        query_index: Or an image of ``query_dataset`` (the val split) to query.
        query_dataset: Needed with ``query_index``.
        k: Neighbours per layer shown and recorded.
        aggregation: "cls", "registers", "patches" or "all".
        similarity: "cosine", "ip" or "l2".
        index_type: Force a FAISS factory string (default: chosen by size).
        memory_budget_bytes: For all layers' indexes together.
        layers: Layers to index and show (default: all).
        batch_size: Images per teacher forward while building.
        num_workers: DataLoader workers while building.
        rebuild: Build even when a matching index exists (overwrites it).
        use_gpu: FAISS on the GPU: True, False, or None for "when available".
        progress: Show a progress bar while building.

    Returns:
        `RetrievalResult` with the paths written and the neighbours.
    """
    _check_request(aggregation, similarity, k)
    query = _open_query(teacher, query_path, query_index, query_dataset)  # fail before building
    build = {"aggregation": aggregation, "similarity": similarity, "index_type": index_type,
             "memory_budget_bytes": memory_budget_bytes, "layers": layers,
             "batch_size": batch_size, "num_workers": num_workers, "use_gpu": use_gpu,
             "progress": progress}  # fmt: skip
    index, rebuilt = _open_or_build(teacher, clt, corpus, Path(index_dir), rebuild, build)
    neighbours = query_image(index, teacher, clt, query.tensor, k)
    paths = _write_report(neighbours, corpus, query, index, Path(index_dir), Path(output_dir))
    return RetrievalResult(Path(index_dir), *paths, neighbours, rebuilt)


def _write_report(
    neighbours: list[LayerNeighbours],
    corpus: Dataset,
    query: _Query,
    index: RetrievalIndex,
    index_dir: Path,
    output_dir: Path,
) -> tuple[Path, Path]:
    """``retrieval_<query>_<aggregation>.json`` and ``.png``; returns (grid, json)."""
    aggregation, similarity = index.aggregation, index.similarity
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"retrieval_{query.stem}_{aggregation}"
    record = neighbours_to_json(neighbours, corpus, query=query.record, similarity=similarity)
    record.update(
        aggregation=aggregation,
        index_dir=str(index_dir),
        clt_fingerprint=index.manifest["clt_fingerprint"],
    )
    json_path = output_dir / f"{stem}.json"
    write_json(json_path, record)  # an undefined score: null with its reason
    title = (
        f"Layer-wise retrieval on CLT codes ({_AGGREGATION_WORDS[aggregation]}, {similarity})"
        f"\nquery: {query.record['description']}"
    )
    grid_path = retrieval_grid(
        query.raw,
        neighbours,
        corpus,
        output_dir / f"{stem}.png",
        title,
        query_label=query.record["class"],
        similarity=similarity,
    )
    log.info("retrieval grid %s, neighbours %s", grid_path, json_path)
    return grid_path, json_path
