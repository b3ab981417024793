"""Read an offline W&B run back from its files, for tests.

An offline run folder (`wandb/offline-run-*/`) holds `files/media/...` (images, tables as
JSON) and `run-<id>.wandb`, the run's record log: a 7-byte header (`:W&B`, magic 0xBEE1,
version 0), then LevelDB-log records (4-byte CRC, 2-byte little-endian length, 1-byte type:
1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each payload a `wandb_internal_pb2.
Record` protobuf. This is the format `wandb sync` uploads; wandb 0.31 ships no Python
reader for it, so the tests use this one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    """The record payloads of a `.wandb` file's bytes."""
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run log (no :W&B header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # zero padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            break  # zero-filled tail


def _put(row: dict[str, Any], item: Any) -> None:
    """Store one history/summary item; media are nested: ("eval/figure/x", "_type")."""
    path = [item.key] if item.key else list(item.nested_key)
    node = row
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = json.loads(item.value_json)


def read_run(run_dir: Path) -> dict[str, Any]:
    """History rows and final summary of an offline run.

    Args:
        run_dir: An `offline-run-*` folder.

    Returns:
        {"history": [{key: value}], "summary": {key: value}} (values JSON-decoded).
    """
    (log_file,) = run_dir.glob("run-*.wandb")
    history, summary = [], {}
    for payload in _payloads(log_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(summary, item)
    return {"history": history, "summary": summary}
