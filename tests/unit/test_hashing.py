"""`hashing`: the project's three fingerprints against hashlib on hand-built bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from clt_lightning.hashing import file_sha256, json_sha256, tensors_sha256


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


def test_json_sha256_ignores_key_order_and_matches_canonical_text():
    a = {"b": [1, 2.5], "a": {"y": None, "x": "s"}}
    b = {"a": {"x": "s", "y": None}, "b": [1, 2.5]}
    canonical = b'{"a": {"x": "s", "y": null}, "b": [1, 2.5]}'
    assert json_sha256(a) == json_sha256(b) == hashlib.sha256(canonical).hexdigest()
    assert json_sha256({"a": 1}) != json_sha256({"a": 2})


def test_tensors_sha256_hashes_sorted_names_and_float32_bytes():
    w = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    steps = torch.tensor([3, 4], dtype=torch.int64)
    expected = hashlib.sha256()
    for name, values in (("steps", steps.numpy()), ("w", np.arange(6, dtype=np.float32))):
        expected.update(name.encode())
        expected.update(values.tobytes())
    assert tensors_sha256({"w": w, "steps": steps}) == expected.hexdigest()
    assert tensors_sha256({"w": w.float(), "steps": steps}) == expected.hexdigest()
    assert tensors_sha256({"w": w + 1, "steps": steps}) != expected.hexdigest()
