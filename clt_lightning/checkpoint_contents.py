"""What a `clt fit` checkpoint (or an export) must hold, checked after the safe load.

A weights-only `torch.load` guarantees that no code ran, not that the file is a checkpoint:
a list, a dict without `state_dict`, a tensor of another shape, NaN weights or an exported
`clt.safetensors` all load (or fail) far from the user's mistake. Every path that reads a
checkpoint (`clt fit/validate/test --ckpt_path`, including `last`, and `clt evaluate /
retrieve / export`) runs these checks, so each of those is one `CLTError` naming the file
and what is wrong or missing:

- `sniff_checkpoint`: before torch sees the file, a safetensors file (an export) is named
  as such; `weights_only=False` is refused (a pickle can run code).
- `check_structure`: the payload is a dict with a `state_dict` of tensors and `clt_shape`.
- `check_state`: after the CLT is built from `clt_shape`, every tensor the model needs is
  there, with its shape, and finite (the message names the tensor).
- `check_training_state`: resuming a fit needs the optimiser and loop states that
  `checkpoint.save_weights_only: true` leaves out.
- `check_progress_counters`: no negative step, epoch or loop counter (an edited file).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clt_lightning.errors import CheckpointMismatchError, ConfigError

WRITTEN_BY = "a checkpoint written by `clt fit` (<run>/checkpoints/*.ckpt)"
TRAINING_KEYS = ("optimizer_states", "loops", "global_step")
UNSAFE_LOADING = (
    "weights_only=False is refused: loading a checkpoint never unpickles arbitrary objects "
    "(a pickle can run code), and checkpoints written by `clt fit` load weights-only; drop "
    "--weights_only false"
)


def non_finite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf."""
    return [
        name
        for name, tensor in tensors.items()
        if isinstance(tensor, Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]


def raise_non_finite(tensors: Mapping[str, Tensor], source: str) -> None:
    """Raise `CheckpointMismatchError` naming the tensors with NaN or Inf in `source`."""
    bad = non_finite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CheckpointMismatchError(
            f"{source}: tensor {shown} holds NaN or Inf values; use a checkpoint from before "
            "the training diverged"
        )


def refuse_unsafe_loading(weights_only: bool | None) -> None:
    """Raise `ConfigError` for `weights_only=False` (None and True load weights-only)."""
    if weights_only is False:
        raise ConfigError(UNSAFE_LOADING)


def is_safetensors(path: str | Path) -> bool:
    """True when the file starts like a safetensors file (8-byte length + JSON header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= 100 * 2**20:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict)


def sniff_checkpoint(path: str | Path) -> None:
    """Name an exported CLT given where a checkpoint is expected (torch would say 'invalid
    load key')."""
    if is_safetensors(path):
        raise CheckpointMismatchError(
            f"{path} is a safetensors file (an exported CLT?), not {WRITTEN_BY}: load an "
            "export with CrossLayerTranscoder.from_pretrained(<its folder>)"
        )


def check_structure(path: str | Path, checkpoint: Any) -> dict[str, Any]:
    """The loaded payload is a checkpoint dict: `state_dict` of tensors and `clt_shape`.

    Returns:
        The checkpoint.

    Raises:
        CheckpointMismatchError: Naming the file and what is wrong or missing.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f"{path} holds a {type(checkpoint).__name__}, not {WRITTEN_BY}"
        )
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        found = "no 'state_dict'" if state is None else f"a {type(state).__name__} 'state_dict'"
        raise CheckpointMismatchError(
            f"{path} has {found} (the model weights), so it is not {WRITTEN_BY}"
        )
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointMismatchError(
                f"{path}: state_dict entry {name!r} is a {type(value).__name__}, not a tensor"
            )
    shape = checkpoint.get("clt_shape")
    if not isinstance(shape, dict) or not all(
        isinstance(shape.get(key), int) and shape[key] > 0
        for key in ("n_layers", "d_model", "n_latents")
    ):
        raise CheckpointMismatchError(
            f"{path} has no valid 'clt_shape' (n_layers, d_model, n_latents: positive "
            f"integers; found {shape!r}), so it is not {WRITTEN_BY}"
        )
    return checkpoint


def check_state(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    """Every tensor the model needs is in `state`, with its shape, and finite.

    Args:
        expected: The built model's `state_dict()`.
        state: The checkpoint's `state_dict`.
        source: The checkpoint, for messages.

    Raises:
        CheckpointMismatchError: A missing or unexpected key, a wrong shape, NaN or Inf.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}"
                 if unexpected else ""]  # fmt: skip
        raise CheckpointMismatchError(
            f"{source}: state_dict does not match the CLT it describes: "
            + "; ".join(p for p in parts if p)
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{source}: tensor {name} has shape {list(state[name].shape)}, the CLT of "
                f"its clt_shape needs {list(tensor.shape)}"
            )
    raise_non_finite(state, source)


def check_training_state(checkpoint: Mapping[str, Any], source: str) -> None:
    """Resuming a fit needs the optimiser and loop states.

    Raises:
        CheckpointMismatchError: A weights-only checkpoint, naming what is missing.
    """
    missing = [key for key in TRAINING_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointMismatchError(
            f"{source} has no {', '.join(missing)}: it was saved with weights only "
            "(checkpoint.save_weights_only: true), so `clt fit` cannot resume from it; use it "
            "with clt evaluate / export, or resume from a full checkpoint"
        )


_COUNTER_KEYS = ("ready", "started", "processed", "completed")


def _negative_counters(node: Any, prefix: str) -> list[str]:
    """Dotted names of the loop progress counters below `node` that are negative."""
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        name = f"{prefix}.{key}"
        if key in _COUNTER_KEYS and isinstance(value, int) and value < 0:
            found.append(f"{name}={value}")
        found += _negative_counters(value, name)
    return found


def check_progress_counters(checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose step or epoch counters are negative (an edited or damaged
    file); Lightning would resume from them without a word.

    Raises:
        CheckpointMismatchError: Names the counter and its value.
    """
    bad = [
        f"{key}={checkpoint[key]}"
        for key in ("global_step", "epoch")
        if isinstance(checkpoint.get(key), int) and checkpoint[key] < 0
    ]
    bad += _negative_counters(checkpoint.get("loops"), "loops")
    if bad:
        raise CheckpointMismatchError(
            f"the checkpoint has negative progress counters ({', '.join(bad[:3])}); steps and "
            "epochs count from 0, so the file was edited or is damaged: use another checkpoint"
        )
