"""Layer-wise retrieval on CLT sparse codes (paper supplementary, section 7, Figures 4-5).

For every corpus image j and layer i the CLT's sparse code z_i (one [F] vector per token) is
aggregated over tokens into one descriptor, and every layer gets its own FAISS index. A query
image's descriptors then retrieve its top-K neighbours layer by layer, which shows what the
codes of each layer "mean" (colour and layout early, class late).

Design decisions:

- Bounded memory, streaming: descriptors are computed one teacher batch at a time (the CLT
  encodes a bounded block of token rows at a time and the token mean is accumulated) and
  written into one on-disk ``.npy`` memmap per layer, renamed into place when complete.
  Each layer's index is then trained (when its type needs it) on a seeded random sample of
  bounded size and filled chunk by chunk from that memmap. Peak memory is one batch, one
  encode block, one add chunk and one index, never the whole corpus of descriptors.
- Similarity: ``cosine`` (default) L2-normalises descriptors and searches by inner product;
  ``ip`` is the raw inner product; ``l2`` is the squared Euclidean distance (smaller is
  closer). An all-zero descriptor (no latent fired) stays zero and scores 0 under cosine.
- Index type: exact ``Flat`` while it fits the memory budget, then ``SQfp16`` (half the
  bytes), then ``IVF{nlist},PQ{m}`` (see `choose_index_type`). Any FAISS factory string can
  be forced. The estimate is logged and stored in the manifest.
- Provenance: ``manifest.json`` is written last (atomically, so its presence means the
  folder is complete) and records the teacher identity, the CLT fingerprint (sha256 of its
  weights and structure), the dataset identity, aggregation, similarity, index type, image
  ids, labels, class names and a sha256 per file. Queries carry the same provenance: an
  index refuses a query made with another CLT, teacher or aggregation instead of silently
  answering with stale neighbours.
- GPU: when FAISS is a GPU build and sees a GPU, indexes are built and searched there
  (``index_cpu_to_all_gpus``) and copied back to the CPU to be written; results are the
  same as on the CPU. An index type the GPU does not support stays on the CPU (a warning).
- Files: the index folder holds ``layer_XX.faiss``, ``descriptors_layer_XX.npy`` (raw,
  unnormalised descriptors, readable with numpy alone) and ``manifest.json``; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm import tqdm

from clt_lightning.errors import (
    CacheError,
    CheckpointMismatchError,
    CLTError,
    ConfigError,
    DataNotFoundError,
    UnreadableImageError,
)
from clt_lightning.evaluation._io import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
AGGREGATIONS = ("cls", "patches", "all")
SIMILARITIES = ("cosine", "ip", "l2")
DESCRIPTOR_DTYPES = ("float32", "float16")
_AGGREGATION_WORDS = {
    "cls": "[CLS] token",
    "patches": "mean of patch tokens",
    "all": "mean of all tokens",
}
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2**30
"""Default budget for all layers' indexes together (each layer gets an equal share)."""
MAX_PQ_SUBQUANTIZERS = 256
ENCODE_BLOCK_BYTES = 256 * 2**20
"""Bound on the CLT activations (pre and z) held at once while encoding token rows."""
ADD_CHUNK_BYTES = 256 * 2**20
"""Bound on the float32 descriptors handed to ``index.add`` at once."""
TRAIN_SAMPLE_BYTES = 2**30
"""Bound on the float32 training sample of a trained index type (IVF, PQ)."""
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


class IndexPlan(NamedTuple):
    """What `plan_index` decided for one layer's index."""

    factory: str
    """FAISS factory string, e.g. "Flat", "SQfp16", "IVF894,PQ256"."""
    estimated_bytes: int | None
    """Estimated memory of the filled index; None for a factory string it cannot estimate."""
    nprobe: int | None
    """Inverted lists visited per query for IVF types; None otherwise."""


@dataclass(frozen=True)
class QueryDescriptors:
    """Descriptors of query images with the provenance an index checks before answering.

    Attributes:
        descriptors: [L_sel, Q, F] float32, raw (unnormalised) aggregated codes.
        layers: The layers of ``descriptors``' first axis.
        aggregation: One of `AGGREGATIONS`.
        clt_fingerprint: `clt_fingerprint` of the CLT that encoded the queries.
        teacher: ``teacher.identity()`` of the teacher that produced the activations.
    """

    descriptors: np.ndarray
    layers: tuple[int, ...]
    aggregation: str
    clt_fingerprint: str
    teacher: dict


@dataclass(frozen=True)
class DescriptorFiles:
    """Per-layer descriptor memmaps written by `compute_descriptors`.

    Attributes:
        paths: One ``.npy`` file per layer, each [N, F] (``np.load(p, mmap_mode="r")``).
        layers: The layer of each path.
        labels: [N] int64 class labels, in corpus order.
        image_ids: [N] int64 corpus image ids (row j of every file is image ``image_ids[j]``).
    """

    paths: tuple[Path, ...]
    layers: tuple[int, ...]
    labels: np.ndarray
    image_ids: np.ndarray

    def load(self, position: int) -> np.ndarray:
        """Open the descriptors of ``layers[position]`` read-only as a [N, F] memmap."""
        return np.load(self.paths[position], mmap_mode="r")


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


# ----------------------------------------------------------------------------- validation


def _check_choice(key: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def _resolve_layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    resolved = tuple(int(layer) for layer in layers)
    bad = [layer for layer in resolved if not 0 <= layer < n_layers]
    if not resolved or bad or len(set(resolved)) != len(resolved):
        raise ConfigError(
            f"layers={list(layers)} is not valid: give distinct layers in 0..{n_layers - 1}"
        )
    return resolved


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in module.parameters():
        return tensor.device, tensor.dtype
    for tensor in module.buffers():
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (a CLT in training mode updates dead-latent statistics and
    batch_topk picks latents per batch), then the caller's mode again."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _json_normal(value: Any) -> Any:
    """Round-trip through JSON so tuples/lists and key order compare equal to a manifest."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def dataset_identity(dataset: Any) -> dict:
    """JSON-able identity of a corpus: ``dataset.identity()`` or its type and size."""
    if hasattr(dataset, "identity"):
        return _json_normal(dataset.identity())
    return {"type": type(dataset).__qualname__, "n_images": len(dataset)}


def clt_fingerprint(clt: nn.Module) -> str:
    """sha256 over a CLT's structure and weights: equal only for CLTs that encode alike.

    Hashes ``repr(clt)`` (module classes), ``clt.sparsifier_config`` when present (e.g. the
    TopK k, which is not a tensor) and every state-dict entry's name, dtype, shape and
    bytes, in name order (buffers included, so a different training state differs too). Device does not
    matter; dtype does (a bf16 copy is a different CLT). A CLT re-exported with its input
    scaling folded into the weights has a different fingerprint from the checkpoint.

    Args:
        clt: The `CrossLayerTranscoder` (any ``nn.Module``).

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    digest.update(repr(clt).encode())
    # settings that change the codes but live outside the state dict (the TopK k)
    digest.update(repr(getattr(clt, "sparsifier_config", None)).encode())
    for name, tensor in sorted(clt.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"|{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- descriptors


def _token_slice(aggregation: str) -> slice:
    return {"cls": slice(0, 1), "patches": slice(1, None), "all": slice(None)}[aggregation]


def _encode_block_rows(n_layers: int, n_latents: int) -> int:
    # pre and z in float32 plus the float32 copy added into the sums: ~3 [rows, L, F] tensors
    return max(1, ENCODE_BLOCK_BYTES // (3 * 4 * n_layers * max(n_latents, 1)))


def _n_latents(clt: nn.Module) -> int | None:
    n_latents = getattr(clt, "n_latents", None)
    if isinstance(n_latents, int):
        return n_latents
    w_enc = getattr(clt, "W_enc", None)
    return int(w_enc.shape[-1]) if isinstance(w_enc, Tensor) else None


@torch.inference_mode()
def encode_descriptors(
    clt: nn.Module,
    x: Tensor,
    aggregation: str = "cls",
    layers: Sequence[int] | None = None,
    block_rows: int | None = None,
) -> Tensor:
    """Aggregate a CLT's sparse codes over the tokens of each image.

    "cls" keeps token 0, "patches" averages tokens 1..T-1, "all" averages every token. Token
    rows are encoded ``block_rows`` at a time and summed per image, so memory stays bounded
    whatever the number of tokens.

    Args:
        clt: Has ``encode(x [B, L, d]) -> Encoding`` with ``.z`` [B, L, F].
        x: [N, T, L, d] teacher activations (``Capture.x``); token 0 is [CLS].
        aggregation: One of `AGGREGATIONS`.
        layers: Layers to keep (default: all L).
        block_rows: Token rows per ``clt.encode`` call (default: from `ENCODE_BLOCK_BYTES`).

    Returns:
        [N, L_sel, F] float32 descriptors on the CPU.
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    n_images, _, n_layers = x.shape[:3]
    keep = torch.tensor(_resolve_layers(layers, n_layers))
    tokens = x[:, _token_slice(aggregation)]
    n_tokens = tokens.shape[1]
    if n_tokens == 0:
        raise ConfigError(
            f"aggregation={aggregation!r} needs patch tokens; x has shape {tuple(x.shape)}"
        )
    rows = tokens.reshape(n_images * n_tokens, *x.shape[2:])
    image_of_row = torch.arange(n_images).repeat_interleave(n_tokens)
    block = block_rows or _encode_block_rows(n_layers, _n_latents(clt) or 4096)
    with _eval_mode(clt):
        sums = _sum_codes(clt, rows, image_of_row, keep, block, n_images)
    return (sums / n_tokens).cpu()


def _sum_codes(
    clt: nn.Module, rows: Tensor, image_of_row: Tensor, keep: Tensor, block: int, n_images: int
) -> Tensor:
    """Sum of z[:, keep] over the rows of each image: rows [R, L, d] -> [N, L_sel, F]."""
    device, dtype = _module_device_dtype(clt)
    sums: Tensor | None = None
    for start in range(0, rows.shape[0], block):
        z = clt.encode(rows[start : start + block].to(device=device, dtype=dtype)).z
        z = z[:, keep.to(z.device)].float()
        if sums is None:
            sums = torch.zeros(n_images, *z.shape[1:], device=z.device)
        sums.index_add_(0, image_of_row[start : start + block].to(z.device), z)
    assert sums is not None
    return sums


class _MemmapWriter:
    """One [N, F] ``.npy`` memmap per layer, written under a temp name, renamed when complete."""

    def __init__(self, directory: Path, layers: tuple[int, ...], n_rows: int, dtype: str):
        self.directory, self.layers, self.n_rows, self.dtype = directory, layers, n_rows, dtype
        self.finals = tuple(directory / f"descriptors_layer_{layer:02d}.npy" for layer in layers)
        self.temps = tuple(path.with_name(path.name + ".partial") for path in self.finals)
        self.arrays: list[np.memmap] = []

    def write(self, start: int, block: np.ndarray) -> None:
        """Write ``block`` [B, L_sel, F] into rows start..start+B of every layer's file."""
        if not self.arrays:
            shape = (self.n_rows, block.shape[-1])
            self.arrays = [
                np.lib.format.open_memmap(t, mode="w+", dtype=self.dtype, shape=shape)
                for t in self.temps
            ]
        for position, array in enumerate(self.arrays):
            array[start : start + block.shape[0]] = block[:, position]

    def finalise(self) -> tuple[Path, ...]:
        for array in self.arrays:
            array.flush()
        self.arrays.clear()
        for temp, final in zip(self.temps, self.finals, strict=True):
            _fsync_replace(temp, final)
        return self.finals

    def abort(self) -> None:
        self.arrays.clear()
        for temp in self.temps:
            temp.unlink(missing_ok=True)


def _as_loader(data: Dataset | DataLoader, batch_size: int, num_workers: int) -> DataLoader:
    if not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if not isinstance(data.sampler, SequentialSampler) or data.drop_last:
        raise ConfigError(
            "compute_descriptors needs a DataLoader in dataset order (shuffle=False, "
            "drop_last=False): row j of the index must be image j"
        )
    return data


def _batches(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        if isinstance(batch, dict):
            yield batch["image"], torch.as_tensor(batch["label"])
        else:
            yield batch[0], torch.as_tensor(batch[1])


def compute_descriptors(
    teacher: nn.Module,
    clt: nn.Module,
    data: Dataset | DataLoader,
    out_dir: str | Path,
    *,
    aggregation: str = "cls",
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float32",
    progress: bool = True,
) -> DescriptorFiles:
    """Stream a corpus through teacher and CLT into one descriptor memmap per layer.

    Row j of every file is image j of ``data`` (image id j). Memory: one batch of teacher
    activations [B, T, L, d], one bounded encode block and one [B, L_sel, F] descriptor block.

    Args:
        teacher: Has ``capture(images [B, 3, H, W]) -> Capture`` with ``.x`` [B, T, L, d].
        clt: Has ``encode(x [B, L, d]) -> Encoding`` with ``.z`` [B, L, F].
        data: A dataset yielding ``(image, label)`` or a DataLoader over one in order.
        out_dir: Folder for ``descriptors_layer_XX.npy`` (created).
        aggregation: One of `AGGREGATIONS`.
        layers: Layers to describe (default: all).
        batch_size: Images per teacher forward (when ``data`` is a dataset).
        num_workers: DataLoader workers (when ``data`` is a dataset).
        dtype: Storage dtype of the memmaps, "float32" or "float16" (half the disk).
        progress: Show a tqdm progress bar.

    Returns:
        The finished files; a failure leaves no ``.npy`` behind, only removed temp files.
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("dtype", dtype, DESCRIPTOR_DTYPES)
    loader = _as_loader(data, batch_size, num_workers)
    n_images = len(loader.dataset)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.full(n_images, -1, dtype=np.int64)
    device, _ = _module_device_dtype(teacher)
    writer: _MemmapWriter | None = None
    start = 0
    try:
        with tqdm(
            total=n_images, unit="img", desc="retrieval descriptors", disable=not progress
        ) as bar:
            for images, batch_labels in _batches(loader):
                with torch.inference_mode():
                    x = teacher.capture(images.to(device)).x
                if writer is None:
                    layers = _resolve_layers(layers, x.shape[2])
                    writer = _MemmapWriter(out_dir, layers, n_images, dtype)
                writer.write(start, encode_descriptors(clt, x, aggregation, layers).numpy())
                labels[start : start + len(images)] = batch_labels.numpy()
                start += len(images)
                bar.update(len(images))
        if writer is None or start != n_images:
            raise CLTError(f"the corpus yielded {start} images, expected {n_images}")
        paths = writer.finalise()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return DescriptorFiles(paths, writer.layers, labels, np.arange(n_images, dtype=np.int64))


def compute_query_descriptors(
    teacher: nn.Module,
    clt: nn.Module,
    images: Tensor,
    aggregation: str = "cls",
    layers: Sequence[int] | None = None,
    fingerprint: str | None = None,
) -> QueryDescriptors:
    """Descriptors of a few query images, with their provenance.

    Args:
        teacher: As in `compute_descriptors`.
        clt: As in `compute_descriptors`.
        images: [Q, 3, H, W] or [3, H, W], already preprocessed (``teacher.preprocess``).
        aggregation: One of `AGGREGATIONS`.
        layers: Layers to describe (default: all).
        fingerprint: `clt_fingerprint(clt)` when the caller already has it.

    Returns:
        `QueryDescriptors` with descriptors [L_sel, Q, F].
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    device, _ = _module_device_dtype(teacher)
    with torch.inference_mode():
        x = teacher.capture(images.to(device)).x
    layers = _resolve_layers(layers, x.shape[2])
    descriptors = encode_descriptors(clt, x, aggregation, layers).numpy()
    return QueryDescriptors(
        descriptors=np.ascontiguousarray(descriptors.transpose(1, 0, 2)),
        layers=layers,
        aggregation=aggregation,
        clt_fingerprint=fingerprint or clt_fingerprint(clt),
        teacher=_json_normal(teacher.identity()),
    )


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
    if n < 1 or dim < 1 or memory_budget_bytes < 1:
        raise ConfigError(
            f"need n, dim, memory_budget_bytes >= 1; got {n}, {dim}, {memory_budget_bytes}"
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
        f"{dim:,}: even IVF{nlist},PQ1 needs ~{need:,} B; raise memory_budget_bytes"
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


def _default_nprobe(factory: str) -> int | None:
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
    return IndexPlan(factory, estimate, _default_nprobe(factory))


def new_index(factory: str, dim: int, similarity: str = "cosine") -> faiss.Index:
    """An empty CPU index from a FAISS factory string, with the metric of ``similarity``.

    PQ indexes get ``do_polysemous_training = False``: the factory turns it on, it only
    serves Hamming-filtered search (not used here) and costs ~30 s of simulated annealing
    per index whatever the data size.

    Raises:
        ConfigError: FAISS rejects the factory string for this dim (the message says why).
    """
    _check_choice("similarity", similarity, SIMILARITIES)
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


def _set_nprobe(index: faiss.Index, nprobe: int | None) -> None:
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
    _set_nprobe(cpu_index, plan.nprobe)
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


def _fsync_replace(temp: Path, final: Path) -> None:
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)


def _write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode("utf-8"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_index_atomic(index: faiss.Index, path: Path) -> str:
    temp = path.with_name(path.name + ".partial")
    faiss.write_index(index, str(temp))
    _fsync_replace(temp, path)
    return _sha256_file(path)


# ----------------------------------------------------------------------------- build


def _validate_build(
    aggregation: str, similarity: str, dtype: str, clt: nn.Module, index_type: str | None
) -> None:
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("descriptor_dtype", dtype, DESCRIPTOR_DTYPES)
    n_latents = _n_latents(clt)
    if index_type and n_latents:  # fail before the expensive corpus pass
        new_index(index_type, n_latents, similarity)


def _build_manifest(descriptors: DescriptorFiles, plan: IndexPlan, dim: int, **fields: Any) -> dict:
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


def _write_layer_indexes(
    files: DescriptorFiles, plan: IndexPlan, similarity: str, out_dir: Path, use_gpu: bool | None
) -> dict[str, str]:
    """Build and write every layer's index, one at a time; returns {file name: sha256}."""
    file_hashes = {}
    for position, layer in enumerate(files.layers):
        index = build_layer_index(files.load(position), plan, similarity, use_gpu=use_gpu)
        name = f"layer_{layer:02d}.faiss"
        file_hashes[name] = _write_index_atomic(index, out_dir / name)
        del index  # one index in memory at a time
    return file_hashes


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
        out_dir: Index folder; an existing manifest there is removed first.
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
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is invalid until rewritten
    fingerprint = clt_fingerprint(clt)
    files = compute_descriptors(
        teacher,
        clt,
        corpus,
        out_dir,
        aggregation=aggregation,
        layers=layers,
        batch_size=batch_size,
        num_workers=num_workers,
        dtype=descriptor_dtype,
        progress=progress,
    )
    n_images, dim = files.load(0).shape
    plan = plan_index(n_images, dim, memory_budget_bytes // len(files.layers), index_type)
    file_hashes = _write_layer_indexes(files, plan, similarity, out_dir, use_gpu)
    if not keep_descriptors:
        for path in files.paths:
            path.unlink()
    manifest = _build_manifest(
        files,
        plan,
        dim,
        teacher=_json_normal(teacher.identity()),
        clt_fingerprint=fingerprint,
        dataset=dataset_identity(corpus),
        class_names=list(getattr(corpus, "class_names", [])),
        aggregation=aggregation,
        similarity=similarity,
        descriptor_dtype=descriptor_dtype,
        descriptors_kept=keep_descriptors,
        files=file_hashes,
    )
    _write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    log.info("retrieval index written to %s (%d layers)", out_dir, len(files.layers))
    return RetrievalIndex.load(out_dir, verify=False, use_gpu=use_gpu)


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
        value, built = _json_normal(value), manifest.get(key)
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


def _raise_mismatch(path: Path, problems: list[str]) -> None:
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this "
            f"version reads {FORMAT_VERSION}; {REBUILD_HINT}"
        )
    return manifest


def _read_layer_index(path: Path, manifest: dict, layer: int, verify: bool) -> faiss.Index:
    name = f"layer_{layer:02d}.faiss"
    file = path / name
    if not file.is_file():
        raise CacheError(f"retrieval index file {file} is missing; {REBUILD_HINT}")
    if verify and _sha256_file(file) != manifest["files"].get(name):
        raise CacheError(f"retrieval index file {file} fails its sha256 check; {REBUILD_HINT}")
    index = faiss.read_index(str(file))
    if index.ntotal != manifest["n_images"] or index.d != manifest["dim"]:
        raise CacheError(
            f"{file} holds {index.ntotal} vectors of dim {index.d}, the manifest says "
            f"{manifest['n_images']} of dim {manifest['dim']}; {REBUILD_HINT}"
        )
    _set_nprobe(index, manifest.get("nprobe"))
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
        _raise_mismatch(path, provenance_problems(manifest, layers=layers))
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
        _raise_mismatch(self.path, problems)

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
    identity = _json_normal(teacher.identity())
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
                    "score": float(score),
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
            with Image.open(path) as opened:
                raw = opened.convert("RGB")
        except (OSError, ValueError) as err:
            raise UnreadableImageError(f"cannot decode query image {path}: {err}") from err
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


def _open_or_build(
    teacher: nn.Module,
    clt: nn.Module,
    corpus: Dataset,
    index_dir: Path,
    rebuild: bool,
    build_kwargs: dict,
) -> tuple[RetrievalIndex, bool]:
    if rebuild or not (index_dir / MANIFEST_NAME).is_file():
        log.info("building the retrieval index in %s", index_dir)
        return build_index(teacher, clt, corpus, index_dir, **build_kwargs), True
    index = RetrievalIndex.load(
        index_dir, layers=build_kwargs["layers"], use_gpu=build_kwargs["use_gpu"]
    )
    problems = provenance_problems(
        index.manifest,
        teacher=_json_normal(teacher.identity()),
        clt_fingerprint=clt_fingerprint(clt),
        dataset=dataset_identity(corpus),
        aggregation=build_kwargs["aggregation"],
        similarity=build_kwargs["similarity"],
        index_type=build_kwargs["index_type"],
    )
    _raise_mismatch(index_dir, problems)
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
        aggregation: "cls", "patches" or "all".
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
    from clt_lightning.evaluation.retrieval_plot import retrieval_grid

    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("similarity", similarity, SIMILARITIES)
    if k < 1:
        raise ConfigError(f"k={k} is not valid; ask for at least 1 neighbour")
    query = _open_query(teacher, query_path, query_index, query_dataset)  # fail before building
    build_kwargs = dict(
        aggregation=aggregation,
        similarity=similarity,
        index_type=index_type,
        memory_budget_bytes=memory_budget_bytes,
        layers=layers,
        batch_size=batch_size,
        num_workers=num_workers,
        use_gpu=use_gpu,
        progress=progress,
    )
    index, rebuilt = _open_or_build(teacher, clt, corpus, Path(index_dir), rebuild, build_kwargs)
    neighbours = query_image(index, teacher, clt, query.tensor, k)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"retrieval_{query.stem}_{aggregation}"
    record = neighbours_to_json(neighbours, corpus, query=query.record, similarity=similarity)
    record.update(
        aggregation=aggregation,
        index_dir=str(index_dir),
        clt_fingerprint=index.manifest["clt_fingerprint"],
    )
    json_path = output_dir / f"{stem}.json"
    _write_json_atomic(json_path, record)
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
    return RetrievalResult(Path(index_dir), grid_path, json_path, neighbours, rebuilt)
