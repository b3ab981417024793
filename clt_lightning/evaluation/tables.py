"""Result tables of the evaluations: Markdown and CSV from a list of dict rows, written
atomically (undefined cells: "–" in Markdown, empty in CSV)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clt_lightning.evaluation.undefined import DASH, is_defined
from clt_lightning.files import atomic_write_bytes


def _fmt(value: Any, digits: int) -> str:
    if not is_defined(value):
        return DASH
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _csv_cell(value: Any) -> Any:
    return "" if not is_defined(value) else value


def rows_to_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
    """A Markdown pipe table from a list of dict rows (columns from the first row).

    Args:
        rows: Rows with the same keys.
        digits: Decimals for float cells; undefined cells (`Undefined`, None) read "–".

    Returns:
        The table, ending with a newline ("" for no rows).
    """
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text (header from the first row's keys, full float precision; an undefined
    cell is empty)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _csv_cell(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def write_markdown(rows: Sequence[Mapping[str, Any]], path: str | Path, digits: int = 2) -> Path:
    """Write `rows_to_markdown(rows)` atomically (UTF-8) and return the path."""
    return atomic_write_bytes(path, rows_to_markdown(rows, digits).encode("utf-8"))


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write `rows_to_csv(rows)` atomically (UTF-8) and return the path."""
    return atomic_write_bytes(path, rows_to_csv(rows).encode("utf-8"))
