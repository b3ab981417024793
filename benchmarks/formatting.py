"""How a benchmark's numbers print in the report's table cells.

Every cell of docs/benchmarks.md goes through one of these, so that the same quantity reads
the same way in every table and in the targets' "measured" column: ratios as ``1.23x``,
memory in MB or GB, counts and seconds to three significant digits, and ``-`` for a value a
row does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fmt_ratio(value: Any) -> str:
    """A ratio as ``"1.23x"``; ``"-"`` when missing."""
    return "-" if value is None else f"{value:.2f}x"


def fmt_bytes(value: Any) -> str:
    """A byte count in GB (from 0.1 GB on) or MB, decimal units; ``"-"`` when missing."""
    if value is None:
        return "-"
    return f"{value / 1e9:.2f} GB" if abs(value) >= 1e8 else f"{value / 1e6:.1f} MB"


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant digits (with thousands separators from 10,000
    on), a bool as yes / **no**, anything else as ``str``; ``"-"`` when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def fmt_yes_no(value: Any) -> str:
    """A flag as yes / no (neither in bold); ``"-"`` when missing."""
    return "-" if value is None else ("yes" if value else "no")


def column(key: str, fmt: Callable[[Any], str] = fmt_num) -> Callable[[dict], str]:
    """A table column's cell function: ``fmt`` of the row's ``key`` (None when absent)."""
    return lambda row: fmt(row.get(key))
