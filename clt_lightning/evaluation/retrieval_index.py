"""Retrieval indexes: choosing, sizing and building one FAISS index per layer.

Part of layer-wise retrieval (`retrieval` runs it end to end, from the descriptors of
`retrieval_descriptors`; `retrieval_search` loads and searches what is written here).

- Similarity: ``cosine`` (default) L2-normalises descriptors and searches by inner product;
  ``ip`` is the raw inner product; ``l2`` is the squared Euclidean distance (smaller is
  closer). An all-zero descriptor (no latent fired) stays zero and scores 0 under cosine.
- Index type: exact ``Flat`` while it fits the memory budget, then ``SQfp16`` (half the
  bytes), then ``IVF{nlist},PQ{m}`` (see `choose_index_type`). Any FAISS factory string can
  be forced (`plan_index`). The estimate is logged and stored in the manifest.
- Bounded memory: a trained index type (IVF, PQ) is trained on a seeded random sample of
  bounded size (`TRAIN_SAMPLE_BYTES`) and every index is filled chunk by chunk
  (`ADD_CHUNK_BYTES`) from the descriptor memmap (`build_layer_index`).
- GPU: when FAISS is a GPU build and sees a GPU, indexes are built and searched there
  (``index_cpu_to_all_gpus``) and copied back to the CPU to be written; results are the
  same as on the CPU. An index type the GPU does not support stays on the CPU (a warning).
- Files: ``layer_XX.faiss`` is written atomically (`write_layer_index`); no pickle.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from clt_lightning.errors import ConfigError
from clt_lightning.evaluation.retrieval_descriptors import (
    SIMILARITIES,
    DescriptorFiles,
    check_choice,
)
from clt_lightning.files import atomic_write_via_path
from clt_lightning.hashing import file_sha256

log = logging.getLogger(__name__)


DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2**30
"""Default budget for all layers' indexes together (each layer gets an equal share)."""
MAX_PQ_SUBQUANTIZERS = 256
ADD_CHUNK_BYTES = 256 * 2**20
"""Bound on the float32 descriptors handed to ``index.add`` at once."""
TRAIN_SAMPLE_BYTES = 2**30
"""Bound on the float32 training sample of a trained index type (IVF, PQ)."""


class IndexPlan(NamedTuple):
    """What `plan_index` decided for one layer's index."""

    factory: str
    """FAISS factory string, e.g. "Flat", "SQfp16", "IVF894,PQ256"."""
    estimated_bytes: int | None
    """Estimated memory of the filled index; None for a factory string it cannot estimate."""
    nprobe: int | None
    """Inverted lists visited per query for IVF types; None otherwise."""


# ----------------------------------------------------------------------------- index types


def _divisors(n: int) -> list[int]:
    small = [i for i in range(1, int(math.isqrt(n)) + 1) if n % i == 0]
    return sorted(set(small + [n // i for i in small]))


def _ivf_pq_shape(n: int, dim: int) -> tuple[int, int]:
    """nlist ~ 4 sqrt(n), at most n_train / 39 (FAISS wants 39 training points per list;
    n_train is the bounded training sample), and PQ bits: 8, fewer when n_train is under
    the 39 * 256 points that 8-bit codebooks want."""
    n_train = min(n, max(1, TRAIN_SAMPLE_BYTES // (4 * dim)))
    nlist = max(1, min(round(4 * math.sqrt(n)), n_train // 39))
    nbits = 8 if n_train >= 39 * 256 else max(1, min(8, int(math.log2(max(n_train // 39, 2)))))
    return nlist, nbits


def choose_index_type(n: int, dim: int, memory_budget_bytes: int) -> str:
    """The most exact FAISS index type whose memory fits the budget.

    "Flat" (exact, 4 bytes a value) when ``n * dim * 4 <= budget``; else "SQfp16"
    (2 bytes a value, near exact) when ``n * dim * 2 <= budget``; else
    ``IVF{nlist},PQ{m}`` with nlist ~ 4 sqrt(n) (at most a 39th of the training sample,
    see `TRAIN_SAMPLE_BYTES`) and the largest m that divides ``dim`` (at most
    `MAX_PQ_SUBQUANTIZERS` and dim / 4) and fits; ``PQ{m}x{bits}`` under 9,984 training rows.

    Args:
        n: Number of descriptors.
        dim: Descriptor length F.
        memory_budget_bytes: Memory allowed for this one index.

    Raises:
        ConfigError: A bad size, or a budget too small for even ``PQ1``.
    """
    if n < 1 or dim < 1:
        raise ConfigError(f"need n, dim >= 1; got {n}, {dim}")
    if memory_budget_bytes < 1:
        raise ConfigError(
            f"the memory budget of one layer's index is too small ({memory_budget_bytes} B); raise the "
            "memory budget (retrieval.memory_budget_gb, shared by all layers' indexes)"
        )
    if n * dim * 4 <= memory_budget_bytes:
        return "Flat"
    if n * dim * 2 <= memory_budget_bytes:
        return "SQfp16"
    nlist, nbits = _ivf_pq_shape(n, dim)
    suffix = "" if nbits == 8 else f"x{nbits}"
    m_max = min(MAX_PQ_SUBQUANTIZERS, max(1, dim // 4))
    for m in reversed([m for m in _divisors(dim) if m <= m_max]):
        factory = f"IVF{nlist},PQ{m}{suffix}"
        if (estimate_index_bytes(factory, n, dim) or 0) <= memory_budget_bytes:
            return factory
    need = estimate_index_bytes(f"IVF{nlist},PQ1{suffix}", n, dim)
    raise ConfigError(
        f"memory budget {memory_budget_bytes:,} B is too small for {n:,} descriptors of dim "
        f"{dim:,}: even IVF{nlist},PQ1 needs ~{need:,} B; raise the memory budget "
        "(retrieval.memory_budget_gb, shared by all layers' indexes)"
    )


_SQ_BYTES = {"SQfp16": 2.0, "SQbf16": 2.0, "SQ8": 1.0, "SQ6": 0.75, "SQ4": 0.5}


def estimate_index_bytes(factory: str, n: int, dim: int) -> int | None:
    """Approximate memory of a filled index of a common FAISS type.

    Understands "Flat", "SQfp16"/"SQbf16"/"SQ8"/"SQ6"/"SQ4", "PQ{m}[x{bits}]" and these
    behind "IVF{nlist},"; returns None for anything else (HNSW, OPQ, ...).

    Args:
        factory: FAISS factory string.
        n: Number of vectors.
        dim: Vector length.
    """
    parts = [part.strip() for part in factory.split(",")]
    fixed, per_vector = 0, 0.0
    ivf = re.fullmatch(r"IVF(\d+)", parts[0])
    if ivf:
        fixed += int(ivf.group(1)) * dim * 4  # coarse centroids
        per_vector += 8  # stored id
        parts = parts[1:]
    if len(parts) != 1:
        return None
    pq = re.fullmatch(r"PQ(\d+)(?:x(\d+))?", parts[0])
    if parts[0] == "Flat":
        per_vector += 4 * dim
    elif parts[0] in _SQ_BYTES:
        per_vector += _SQ_BYTES[parts[0]] * dim
    elif pq:
        m, nbits = int(pq.group(1)), int(pq.group(2) or 8)
        per_vector += math.ceil(m * nbits / 8)
        fixed += 2**nbits * dim * 4  # codebooks: m x 2^bits x dim/m floats
    else:
        return None
    return int(fixed + per_vector * n)


def default_nprobe(factory: str) -> int | None:
    """Inverted lists an IVF index visits per query: an eighth of nlist (at least 1); None
    for a factory string without IVF."""
    ivf = re.match(r"IVF(\d+)", factory)
    if not ivf:
        return None
    nlist = int(ivf.group(1))
    return max(1, min(nlist, round(nlist / 8)))


def plan_index(
    n: int, dim: int, memory_budget_bytes: int, index_type: str | None = None
) -> IndexPlan:
    """Choose (or take the forced) index type and log its memory estimate before building.

    Args:
        n: Number of descriptors.
        dim: Descriptor length F.
        memory_budget_bytes: Memory allowed for this one index.
        index_type: A FAISS factory string to use instead of `choose_index_type`.

    Returns:
        The plan, whose estimate is also logged at INFO.
    """
    factory = index_type or choose_index_type(n, dim, memory_budget_bytes)
    estimate = estimate_index_bytes(factory, n, dim)
    shown = "unknown" if estimate is None else f"{estimate / 2**20:,.1f} MiB"
    log.info(
        "retrieval index %s for %d descriptors of dim %d: ~%s (budget %.1f MiB%s)",
        factory,
        n,
        dim,
        shown,
        memory_budget_bytes / 2**20,
        ", forced" if index_type else "",
    )
    if index_type and estimate is not None and estimate > memory_budget_bytes:
        log.warning("forced index type %s exceeds the memory budget", factory)
    return IndexPlan(factory, estimate, default_nprobe(factory))


def new_index(factory: str, dim: int, similarity: str = "cosine") -> faiss.Index:
    """An empty CPU index from a FAISS factory string, with the metric of ``similarity``.

    PQ indexes get ``do_polysemous_training = False``: the factory turns it on, it only
    serves Hamming-filtered search (not used here) and costs ~30 s of simulated annealing
    per index whatever the data size.

    Raises:
        ConfigError: FAISS rejects the factory string for this dim (the message says why).
    """
    check_choice("similarity", similarity, SIMILARITIES)
    metric = faiss.METRIC_L2 if similarity == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(dim, factory, metric)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ConfigError(
            f"index_type={factory!r} is not a FAISS factory string usable with dim {dim} "
            f"({reason}); examples: Flat, SQfp16, IVF1024,PQ64"
        ) from err
    inner = faiss.downcast_index(faiss.try_extract_index_ivf(index) or index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    return index


# ----------------------------------------------------------------------------- index build


def prepare_vectors(block: np.ndarray, similarity: str, inplace: bool = False) -> np.ndarray:
    """Descriptors as FAISS wants them: C-contiguous float32, rows L2-normalised for cosine.

    Args:
        block: [n, F] raw descriptors (any float dtype, a memmap slice is fine).
        similarity: One of `SIMILARITIES`.
        inplace: Normalise ``block`` itself when it already is C-contiguous float32 (saves
            a copy of a large training sample); otherwise ``block`` is never modified.

    Returns:
        [n, F] float32; all-zero rows stay zero.
    """
    if inplace:
        vectors = np.ascontiguousarray(block, dtype=np.float32)
    else:
        vectors = np.array(block, dtype=np.float32, order="C", copy=True)
    if similarity == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, np.float32(1e-12))
    return vectors


def gpu_available() -> bool:
    """True when FAISS is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_search_device(index: faiss.Index, use_gpu: bool | None = None) -> tuple[faiss.Index, bool]:
    """Move a CPU index onto all GPUs when asked (True) or when available (None).

    Returns:
        (index, on_gpu); the CPU index itself when it stays on the CPU.
    """
    if use_gpu is False or not gpu_available():
        if use_gpu:
            log.warning("use_gpu=True but FAISS sees no GPU (faiss-cpu build?); using the CPU")
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AssertionError) as err:  # e.g. a PQ layout GPUs do not support
        log.warning("FAISS cannot put %s on the GPU (%s); using the CPU", type(index).__name__, err)
        return index, False


def train_sample(
    descriptors: np.ndarray, max_bytes: int = TRAIN_SAMPLE_BYTES, seed: int = 0
) -> np.ndarray:
    """A seeded random subset of rows, at most ``max_bytes`` as float32, in row order.

    Args:
        descriptors: [N, F] array or memmap (only the chosen rows are read).
        max_bytes: Bound on the sample's float32 size.
        seed: numpy Generator seed.

    Returns:
        [n_train, F] rows of ``descriptors`` (its dtype).
    """
    n_rows, dim = descriptors.shape
    n_train = min(n_rows, max(1, max_bytes // (4 * dim)))
    rows = np.sort(np.random.default_rng(seed).choice(n_rows, size=n_train, replace=False))
    return descriptors[rows]


def add_in_chunks(index: faiss.Index, chunks: Iterable[np.ndarray], similarity: str) -> int:
    """``index.add`` each [n, F] chunk after `prepare_vectors`; returns the rows added."""
    added = 0
    for chunk in chunks:
        index.add(prepare_vectors(chunk, similarity))
        added += len(chunk)
    return added


def _row_chunks(descriptors: np.ndarray, chunk_rows: int) -> Iterator[np.ndarray]:
    for start in range(0, descriptors.shape[0], chunk_rows):
        yield descriptors[start : start + chunk_rows]


def set_nprobe(index: faiss.Index, nprobe: int | None) -> None:
    """Set an IVF index's ``nprobe`` (no-op for None or an index without IVF)."""
    ivf = faiss.try_extract_index_ivf(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = nprobe


def build_layer_index(
    descriptors: np.ndarray,
    plan: IndexPlan,
    similarity: str = "cosine",
    *,
    chunk_rows: int | None = None,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> faiss.Index:
    """Train (if the type needs it) and fill one layer's index, chunk by chunk.

    Args:
        descriptors: [N, F] raw descriptors, typically a read-only memmap.
        plan: From `plan_index`.
        similarity: One of `SIMILARITIES`.
        chunk_rows: Rows per ``index.add`` (default: `ADD_CHUNK_BYTES` of float32).
        use_gpu: Build on the GPU: True, False, or None for "when available".
        seed: Seed of the training sample.

    Returns:
        The filled index, on the CPU (ready for ``faiss.write_index``).
    """
    n_rows, dim = descriptors.shape
    cpu_index = new_index(plan.factory, dim, similarity)
    set_nprobe(cpu_index, plan.nprobe)
    index, on_gpu = to_search_device(cpu_index, use_gpu)
    if not index.is_trained:
        sample = prepare_vectors(train_sample(descriptors, seed=seed), similarity, inplace=True)
        log.info("training %s on %d of %d descriptors", plan.factory, len(sample), n_rows)
        index.train(sample)
        del sample
    rows = chunk_rows or max(1, ADD_CHUNK_BYTES // (4 * dim))
    add_in_chunks(index, _row_chunks(descriptors, rows), similarity)
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


# ----------------------------------------------------------------------------- files


def write_layer_index(index: faiss.Index, path: Path) -> str:
    """Write one layer's index atomically (through ``<name>.partial``); returns its sha256.

    Raises:
        DiskSpaceError: The device filled up (names the temp file; nothing under ``path``
            changed).
    """
    temp = path.with_name(path.name + ".partial")
    atomic_write_via_path(
        path,
        lambda target: faiss.write_index(index, str(target)),
        disk_full=f"the retrieval index {temp}; nothing under its final name was changed: "
        "free some space and rerun (the indexes are rebuilt)",
        temp=temp,
    )
    return file_sha256(path)


def write_layer_indexes(
    files: DescriptorFiles, plan: IndexPlan, similarity: str, out_dir: Path, use_gpu: bool | None
) -> dict[str, str]:
    """Build and write every layer's index (``layer_XX.faiss``), one in memory at a time.

    Args:
        files: The per-layer descriptors.
        plan: From `plan_index` (the same for every layer).
        similarity: One of `SIMILARITIES`.
        out_dir: Folder the index files are written into.
        use_gpu: Build on the GPU: True, False, or None for "when available".

    Returns:
        {file name: sha256} of the written files.
    """
    file_hashes = {}
    for position, layer in enumerate(files.layers):
        index = build_layer_index(files.load(position), plan, similarity, use_gpu=use_gpu)
        name = f"layer_{layer:02d}.faiss"
        file_hashes[name] = write_layer_index(index, out_dir / name)
        del index  # one index in memory at a time
    return file_hashes
