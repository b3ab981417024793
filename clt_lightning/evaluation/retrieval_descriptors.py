"""Retrieval descriptors: CLT sparse codes aggregated over tokens, one vector per image and layer.

Part of layer-wise retrieval (`retrieval` runs it end to end; `retrieval_index` builds
the FAISS indexes, `retrieval_search` loads and searches them). For every corpus image j
and layer i the CLT's sparse code z_i (one [F] vector per token) is aggregated over tokens
(a token group: ``cls``, ``registers``, ``patches`` or ``all``, see `AGGREGATIONS`) into
one descriptor.

- Bounded memory, streaming: descriptors are computed one teacher batch at a time (the CLT
  encodes a bounded block of token rows at a time, `ENCODE_BLOCK_BYTES`, and the token mean
  is accumulated) and written into one on-disk ``.npy`` memmap per layer
  (``descriptors_layer_XX.npy``: raw, unnormalised, readable with numpy alone), renamed into
  place when complete.
- Provenance: `clt_fingerprint` (sha256 of the CLT's weights and structure) and
  `dataset_identity` identify what the descriptors were computed from; `QueryDescriptors`
  carry them so an index can refuse a query made with another CLT, teacher or aggregation.
- The retrieval settings' valid choices (`AGGREGATIONS`, `SIMILARITIES`,
  `DESCRIPTOR_DTYPES`) and their check (`check_choice`), shared by the other retrieval
  modules and the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm import tqdm

from clt_lightning.errors import CLTError, ConfigError
from clt_lightning.evaluation.token_modes import GROUP_ORDER
from clt_lightning.files import allocate, atomic_write_via_path
from clt_lightning.tokens import TokenLayout, layout_of

log = logging.getLogger(__name__)


AGGREGATIONS: tuple[str, ...] = GROUP_ORDER
"""Token aggregations of a descriptor: the token groups of `clt_lightning.tokens`."""
SIMILARITIES = ("cosine", "ip", "l2")
"""Similarity of a retrieval index (`retrieval_index.new_index`); here so the CLI can
check the setting without importing FAISS."""
DESCRIPTOR_DTYPES = ("float32", "float16")
ENCODE_BLOCK_BYTES = 256 * 2**20
"""Bound on the CLT activations (pre and z) held at once while encoding token rows."""


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


# ----------------------------------------------------------------------------- validation


def check_choice(key: str, value: str, valid: Sequence[str]) -> None:
    """Raise a one-line `ConfigError` unless ``value`` is one of ``valid``.

    Args:
        key: The setting's name, for the message (e.g. "aggregation").
        value: Its value.
        valid: The valid values (e.g. `AGGREGATIONS`).
    """
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


def json_normal(value: Any) -> Any:
    """``value`` round-tripped through JSON, so tuples/lists and key order compare equal to
    what a manifest holds (values JSON cannot hold become their `str`)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def dataset_identity(dataset: Any) -> dict:
    """JSON-able identity of a corpus: ``dataset.identity()`` or its type and size."""
    if hasattr(dataset, "identity"):
        return json_normal(dataset.identity())
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


def _encode_block_rows(n_layers: int, n_latents: int) -> int:
    # pre and z in float32 plus the float32 copy added into the sums: ~3 [rows, L, F] tensors
    return max(1, ENCODE_BLOCK_BYTES // (3 * 4 * n_layers * max(n_latents, 1)))


def n_latents_of(clt: nn.Module) -> int | None:
    """F, the CLT's latents per layer (``n_latents``, else ``W_enc``'s last axis); None
    when neither says."""
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
    layout: TokenLayout | None = None,
) -> Tensor:
    """Aggregate a CLT's sparse codes over the tokens of each image.

    "cls" keeps the [CLS] token; "registers", "patches" and "all" average the tokens of
    that group (`clt_lightning.tokens`). Token rows are encoded ``block_rows`` at a time
    and summed per image, so memory stays bounded whatever the number of tokens.

    Args:
        clt: Has ``encode(x [B, L, d]) -> Encoding`` with ``.z`` [B, L, F].
        x: [N, T, L, d] teacher activations (``Capture.x``); token 0 is [CLS].
        aggregation: One of `AGGREGATIONS`.
        layers: Layers to keep (default: all L).
        block_rows: Token rows per ``clt.encode`` call (default: from `ENCODE_BLOCK_BYTES`).
        layout: The teacher's token layout (default: [CLS] + patches).

    Returns:
        [N, L_sel, F] float32 descriptors on the CPU.

    Raises:
        ConfigError: An unknown aggregation, or a token group the model lacks.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    n_images, _, n_layers = x.shape[:3]
    keep = torch.tensor(_resolve_layers(layers, n_layers))
    where = layout_of(x.shape[1] if layout is None else layout)
    tokens = x[:, where.positions(where.check(aggregation, "retrieval.aggregation"))]
    n_tokens = tokens.shape[1]
    if n_tokens == 0:
        raise ConfigError(
            f"aggregation={aggregation!r} needs patch tokens; x has shape {tuple(x.shape)}"
        )
    rows = tokens.reshape(n_images * n_tokens, *x.shape[2:])
    image_of_row = torch.arange(n_images).repeat_interleave(n_tokens)
    block = block_rows or _encode_block_rows(n_layers, n_latents_of(clt) or 4096)
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
            for layer, temp in zip(self.layers, self.temps, strict=True):
                array = np.lib.format.open_memmap(temp, mode="w+", dtype=self.dtype, shape=shape)
                self.arrays.append(array)
                # blocks reserved now: a full disk is an error here, not a SIGBUS mid-write
                allocate(temp, array.offset + array.nbytes, what=f"the layer-{layer} descriptors")
        for position, array in enumerate(self.arrays):
            array[start : start + block.shape[0]] = block[:, position]

    def finalise(self) -> tuple[Path, ...]:
        for array in self.arrays:
            array.flush()
        self.arrays.clear()
        for temp, final in zip(self.temps, self.finals, strict=True):
            # the memmap already filled the temp file: fsync it and rename it into place
            atomic_write_via_path(final, lambda _: None, disk_full=str(temp), temp=temp)
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
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("dtype", dtype, DESCRIPTOR_DTYPES)
    loader = _as_loader(data, batch_size, num_workers)
    n_images = len(loader.dataset)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.full(n_images, -1, dtype=np.int64)
    writer: _MemmapWriter | None = None
    start = 0
    try:
        for chosen, codes, batch_labels in _corpus_codes(
            teacher, clt, loader, aggregation, layers, progress
        ):
            if writer is None:
                writer = _MemmapWriter(out_dir, chosen, n_images, dtype)
            writer.write(start, codes)
            labels[start : start + len(codes)] = batch_labels
            start += len(codes)
        if writer is None or start != n_images:
            raise CLTError(f"the corpus yielded {start} images, expected {n_images}")
        paths = writer.finalise()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return DescriptorFiles(paths, writer.layers, labels, np.arange(n_images, dtype=np.int64))


def _corpus_codes(
    teacher: nn.Module,
    clt: nn.Module,
    loader: DataLoader,
    aggregation: str,
    layers: Sequence[int] | None,
    progress: bool,
) -> Iterator[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """Per corpus batch, in order: (layers, descriptors [B, L_sel, F], labels [B])."""
    layout = getattr(teacher, "token_layout", None)
    device, _ = _module_device_dtype(teacher)
    n_images = len(loader.dataset)  # type: ignore[arg-type]
    with tqdm(
        total=n_images, unit="img", desc="retrieval descriptors", disable=not progress
    ) as bar:
        for images, batch_labels in _batches(loader):
            with torch.inference_mode():
                x = teacher.capture(images.to(device)).x
            chosen = _resolve_layers(layers, x.shape[2])
            codes = encode_descriptors(clt, x, aggregation, chosen, layout=layout)
            yield chosen, codes.numpy(), batch_labels.numpy()
            bar.update(len(images))


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
    layout = getattr(teacher, "token_layout", None)
    descriptors = encode_descriptors(clt, x, aggregation, layers, layout=layout).numpy()
    return QueryDescriptors(
        descriptors=np.ascontiguousarray(descriptors.transpose(1, 0, 2)),
        layers=layers,
        aggregation=aggregation,
        clt_fingerprint=fingerprint or clt_fingerprint(clt),
        teacher=json_normal(teacher.identity()),
    )
