"""The project's fingerprints: one sha256 helper per kind of thing hashed.

Files, JSON payloads (teacher identities, model-config files, cache keys) and state dicts
are hashed here and nowhere else, so two modules never disagree on how one of them is
hashed. Two fingerprints keep a format of their own because files already on disk record
them: a cache's `stats_sha256` (compact JSON without NaN, `data/cache_manifest.py`) and the
retrieval index's CLT fingerprint (dtype- and shape-exact bytes,
`evaluation/retrieval_descriptors.py`). A buffer already in memory (an export's weights) is
hashed with `hashlib.sha256` directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor


def file_sha256(path: str | Path, chunk_bytes: int = 2**24) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory).

    Raises:
        OSError: The file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(payload: Any) -> str:
    """Hex sha256 of a JSON-able payload serialised with sorted keys.

    Values JSON cannot hold are written with `str` (paths, dtypes); a model-config JSON
    hashes the same whatever the key order of its file.
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """Hex sha256 of named tensors (a state dict): names sorted, values as CPU bytes.

    Floating-point tensors are hashed as float32, so a bf16 and an fp32 copy of the same
    float32 weights agree; integer tensors as their own bytes.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        values = tensor.detach().cpu()
        values = values.float() if values.is_floating_point() else values
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()
