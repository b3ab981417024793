"""The clt-lightning export format: `config.json` + `clt.safetensors` (docs/model.md).

`save_export` folds the per-layer scales into the weights, so the exported CLT reads raw
activations, with circuit-tracer's tensor names; `load_exported` reads them back into a
CLT (scales = 1). The folder is committed as a unit (`files.commit_folder`: written beside
it, then swapped in), and config.json records the weights' sha256, so a reader never
pairs one export's config with another's weights. Non-finite weights are refused on export
and on load, naming the tensor. `CrossLayerTranscoder.save_pretrained`/`from_pretrained`
are the entry points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from clt_lightning.checkpoint_contents import raise_non_finite
from clt_lightning.errors import CheckpointMismatchError, DataNotFoundError
from clt_lightning.files import (
    atomic_write_bytes,
    commit_folder,
    previous_folder,
    recover_folder,
)
from clt_lightning.hashing import file_sha256
from clt_lightning.models.sparsifiers import SparsifierConfig

if TYPE_CHECKING:
    from clt_lightning.models.clt import CrossLayerTranscoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "clt.safetensors"


@torch.no_grad()
def export_tensors(clt: CrossLayerTranscoder) -> dict[str, Tensor]:
    """Per-layer tensors with the scales folded in, named as circuit-tracer names them.

    Args:
        clt: The CLT to export.

    Returns:
        W_enc_{i} [F, d], b_enc_{i} [F], W_dec_{i} [F, L - i, d], b_dec_{i} [d] and,
        for threshold-based sparsifiers, threshold_{i} [F]; all contiguous, on the CPU.
    """
    in_s, out_s = clt.input_scale.float(), clt.output_scale.float()
    threshold = clt.sparsifier.export_threshold()
    tensors: dict[str, Tensor] = {}
    for i in range(clt.n_layers):
        dtype = clt.W_enc.dtype
        tensors[f"W_enc_{i}"] = (clt.W_enc[i].float() * in_s[i]).T.to(dtype)
        tensors[f"b_enc_{i}"] = clt.b_enc[i].clone()
        tensors[f"W_dec_{i}"] = (clt.W_dec[i].float() / out_s[i:, None]).to(dtype)
        tensors[f"b_dec_{i}"] = (clt.b_dec[i].float() / out_s[i]).to(dtype)
        if threshold is not None:
            tensors[f"threshold_{i}"] = threshold[i].detach().clone()
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def export_config(clt: CrossLayerTranscoder) -> dict[str, Any]:
    """The JSON-able description of `clt` written to config.json."""
    has_threshold = clt.sparsifier.export_threshold() is not None
    return {
        "format": "clt-lightning",
        "format_version": FORMAT_VERSION,
        "n_layers": clt.n_layers,
        "d_model": clt.d_model,
        "n_latents": clt.n_latents,
        "sparsifier": dataclasses.asdict(clt.sparsifier_config),
        "decode": clt.decode_mode,
        "activation_function": "jump_relu" if has_threshold else clt.sparsifier_config.name,
        "weights_file": WEIGHTS_FILE,
        "tensor_shapes": {
            "W_enc_{i}": "[n_latents, d_model]",
            "b_enc_{i}": "[n_latents]",
            "W_dec_{i}": "[n_latents, n_layers - i, d_model] (index j = target i + j)",
            "b_dec_{i}": "[d_model]",
            "threshold_{i}": "[n_latents] (threshold-based sparsifiers only)",
        },
        "normalisation": {
            "folded": True,
            "input_scale": clt.input_scale.tolist(),
            "output_scale": clt.output_scale.tolist(),
        },
    }


def save_export(clt: CrossLayerTranscoder, path: str | Path) -> Path:
    """`CrossLayerTranscoder.save_pretrained`: the export folder of `clt`, as one unit.

    Args:
        clt: The CLT to export.
        path: Output directory (see `save_pretrained` for what it may hold and the errors).

    Returns:
        The directory.
    """
    path = Path(path)
    tensors = export_tensors(clt)
    raise_non_finite(tensors, "the CLT to export")
    metadata = {"format": "clt-lightning", "format_version": str(FORMAT_VERSION)}
    weights = save(tensors, metadata=metadata)
    config = {**export_config(clt), "weights_sha256": hashlib.sha256(weights).hexdigest()}
    with commit_folder(path, _export_owned, "a CLT export") as staging:
        atomic_write_bytes(staging / WEIGHTS_FILE, weights)
        atomic_write_bytes(staging / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return path


def expected_export_shapes(clt: CrossLayerTranscoder) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an export of `clt` holds (`export_tensors`' names)."""
    F, d, L = clt.n_latents, clt.d_model, clt.n_layers
    has_threshold = clt.sparsifier.export_threshold() is not None
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(L):
        shapes |= {f"W_enc_{i}": (F, d), f"b_enc_{i}": (F,)}
        shapes |= {f"W_dec_{i}": (F, L - i, d), f"b_dec_{i}": (d,)}
        if has_threshold:
            shapes[f"threshold_{i}"] = (F,)
    return shapes


@torch.no_grad()
def load_exported(
    clt: CrossLayerTranscoder, tensors: dict[str, Tensor], source: str = "exported tensors"
) -> None:
    """Load raw-space tensors from `export_tensors`' naming; sets both scales to 1.

    Args:
        clt: The CLT to load into (same n_layers, d_model, n_latents and sparsifier).
        tensors: Name -> tensor, as written by `export_tensors`.
        source: Where they came from (for error messages).

    Raises:
        CheckpointMismatchError: A tensor is missing, has the wrong shape, or holds
            NaN or Inf.
    """
    expected = expected_export_shapes(clt)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointMismatchError(f"{source}: tensor {name} is missing")
        found = tuple(tensors[name].shape)
        if found != shape:
            raise CheckpointMismatchError(
                f"{source}: tensor {name} has shape {list(found)}, expected {list(shape)}"
                f" (n_layers={clt.n_layers}, d_model={clt.d_model},"
                f" n_latents={clt.n_latents})"
            )
    raise_non_finite({name: tensors[name] for name in expected}, source)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        log.warning("%s: ignoring unexpected tensors %s", source, extra)
    for i in range(clt.n_layers):
        clt.W_enc[i].copy_(tensors[f"W_enc_{i}"].T)
        clt.b_enc[i].copy_(tensors[f"b_enc_{i}"])
        clt.W_dec[i].copy_(tensors[f"W_dec_{i}"])
        clt.b_dec[i].copy_(tensors[f"b_dec_{i}"])
    if f"threshold_{0}" in expected:
        clt.sparsifier.load_threshold(
            torch.stack([tensors[f"threshold_{i}"] for i in range(clt.n_layers)])
        )
    clt.input_scale.fill_(1.0)
    clt.output_scale.fill_(1.0)


def read_export(path: str | Path) -> tuple[dict[str, Any], SparsifierConfig]:
    """config.json of an export folder and its sparsifier, finishing an interrupted export.

    Args:
        path: Directory written by `save_export`.

    Returns:
        (the checked config, its SparsifierConfig).

    Raises:
        DataNotFoundError: config.json does not exist.
        CheckpointMismatchError: Unreadable JSON, unsupported version, a missing or bad key.
    """
    path = Path(path)
    with contextlib.suppress(OSError):  # read-only storage: read what is there
        recover_folder(path)
    config = _read_config(path / CONFIG_FILE)
    try:
        sparsifier = SparsifierConfig(**config["sparsifier"])
    except TypeError as err:
        raise CheckpointMismatchError(f"{path / CONFIG_FILE}: bad sparsifier: {err}") from err
    return config, sparsifier


def load_export_weights(clt: CrossLayerTranscoder, path: str | Path, config: dict) -> None:
    """Load clt.safetensors of an export folder into `clt` and check it matches config.json.

    Args:
        clt: A CLT built from `config` (`read_export`).
        path: The export directory.
        config: Its config.json (gives `weights_sha256`).

    Raises:
        DataNotFoundError: The weights file does not exist.
        CheckpointMismatchError: Unreadable file, missing or misshapen tensor, NaN/Inf
            weights, or weights whose sha256 differs from config.json's (another export's).
    """
    path = Path(path)
    weights = path / WEIGHTS_FILE
    load_exported(clt, _read_tensors(weights), source=str(weights))
    _check_weights_hash(weights, config.get("weights_sha256"), path / CONFIG_FILE)


def _export_owned(entry: Path) -> bool:
    """Entries of an export folder (the two files, and temp files of an earlier write)."""
    return entry.name in (CONFIG_FILE, WEIGHTS_FILE) or (
        entry.name.startswith(".") and entry.name.endswith(".tmp")
    )


def _check_weights_hash(weights: Path, expected: str | None, config: Path) -> None:
    """Exports since config.json recorded `weights_sha256`: the pair must belong together."""
    if expected is not None and file_sha256(weights) != expected:
        raise CheckpointMismatchError(
            f"{weights} is not the weights file {config} was written with (sha256 differs): "
            "the folder mixes two exports, or the weights were edited; export the checkpoint "
            "again (or delete weights_sha256 from config.json to accept edited weights)"
        )


def _read_config(path: Path) -> dict[str, Any]:
    """Read and check config.json of an exported CLT."""
    if not path.is_file():
        if previous_folder(path.parent).is_dir():
            raise DataNotFoundError(
                f"{path} does not exist: an interrupted export left the previous one in "
                f"{previous_folder(path.parent)}; rerun the export (or rename that folder back)"
            )
        raise DataNotFoundError(
            f"{path} does not exist; expected a directory written by "
            "CrossLayerTranscoder.save_pretrained (config.json + clt.safetensors)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: not valid JSON: {err}") from err
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path}: format_version={version!r} is not supported (this package reads <= "
            f"{FORMAT_VERSION})"
        )
    for key in ("n_layers", "d_model", "n_latents", "sparsifier"):
        if key not in config:
            raise CheckpointMismatchError(f"{path}: key {key!r} is missing")
    for key in ("n_layers", "d_model", "n_latents"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointMismatchError(f"{path}: {key} is {value!r}, not a positive integer")
    if not isinstance(config["sparsifier"], dict):
        raise CheckpointMismatchError(f"{path}: sparsifier is not an object")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, naming it in any error."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist (written by save_pretrained)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{path}: cannot be read as safetensors: {err}") from err
