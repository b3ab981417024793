"""Undefined metric values: explicit, with a reason, decided on exact counts.

A metric without a value for its input (a Pearson r of per-template accuracies that are
all equal, a CKA of a constant representation, a contribution share of a target that no
image reconstructs, R^2 of fewer than two tokens) is an `Undefined(reason)`: never a NaN,
and never a float that happens to come out near zero (r = -5.8e-14 printed as "0.000").
Whether a value is defined is decided on exact quantities (counts, exact equality),
before any floating-point division.

Written out: JSON holds `null` and lists the reason under the file's top-level
`"undefined"` key (JSON path -> reason); Markdown tables print "–"; CSV leaves the cell
empty. `write_json` refuses NaN and infinities (`allow_nan=False`), so none slips
through as the non-standard bare `NaN`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt_lightning.files import atomic_write_bytes

DASH = "–"
"""How an undefined value reads in a table."""


@dataclass(frozen=True)
class Undefined:
    """A metric value that does not exist for this input.

    Attributes:
        reason: Why, in words that name the exact condition (e.g. "per-template
            accuracies all equal for the teacher (355/360 on each of 6 templates)").
    """

    reason: str

    def __format__(self, spec: str) -> str:
        return DASH

    def __str__(self) -> str:
        return DASH


def is_defined(value: Any) -> bool:
    """False for `Undefined` (and None), True for anything else."""
    return not (value is None or isinstance(value, Undefined))


def nan_to_undefined(values: Any, reason: str) -> Any:
    """Nested lists of floats with NaN -> the same lists with `Undefined(reason)`.

    For arrays whose NaNs were set on an exact condition (e.g. contribution scores of a
    target with no defined image): the NaN is only the array's placeholder.
    """
    if isinstance(values, list | tuple):
        return [nan_to_undefined(v, reason) for v in values]
    if isinstance(values, float) and math.isnan(values):
        return Undefined(reason)
    return values


def to_json(payload: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """(JSON-able payload with `Undefined` -> None, {JSON path: reason}).

    Raises:
        ValueError: A float is NaN or infinite (it should have been an `Undefined`),
            naming its JSON path.
    """
    reasons: dict[str, str] = {}
    if isinstance(payload, Undefined):
        reasons[path or "."] = payload.reason
        return None, reasons
    if isinstance(payload, Mapping):
        out = {}
        for key, value in payload.items():
            out[key], inner = to_json(value, f"{path}.{key}" if path else str(key))
            reasons.update(inner)
        return out, reasons
    if isinstance(payload, list | tuple):
        out_list = []
        for i, value in enumerate(payload):
            converted, inner = to_json(value, f"{path}[{i}]")
            out_list.append(converted)
            reasons.update(inner)
        return out_list, reasons
    if isinstance(payload, float) and not math.isfinite(payload):
        raise ValueError(f"{path or 'value'} is {payload}: undefined values must be Undefined")
    return payload, reasons


def write_json(path: str | Path, payload: Any) -> Path:
    """Write a payload atomically as JSON: `Undefined` as null with its reason listed
    under the top-level "undefined" key; NaN or infinity raises `ValueError`."""
    converted, reasons = to_json(payload)
    if reasons:
        if not isinstance(converted, dict):
            converted = {"value": converted}
        converted["undefined"] = reasons
    text = json.dumps(converted, indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))
