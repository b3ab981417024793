"""A comparison table: our numbers beside the paper's, written as Markdown and as CSV.

Every table of the paper comparison (`experiments.paper_tables`) is a `Table`: columns, rows
of cells (None is a blank: no run, or no published number) and how to print them. A column
whose name ends in "Δ" holds ours - paper, signed, in bold above a threshold; the CSV keeps
the raw numbers.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

Cell = float | int | str | None
"""One table cell; None prints as a blank."""
DELTA = "Δ"
"""The suffix of a difference column (ours - paper)."""
BOLD_ABOVE_POINTS = 1.0
"""|Δ| above which a difference is bold, by default: 1 point of top-1 accuracy (%)."""


@dataclass
class Table:
    """A table to write as Markdown and CSV.

    Attributes:
        title: Heading in the Markdown report.
        slug: CSV file name (without `.csv`).
        columns: Column names; a name ending in "Δ" is a signed difference (ours - paper).
        rows: Cells; None is blank.
        digits: Decimals for float cells in Markdown (CSV keeps the raw numbers).
        column_digits: Per-column exceptions to `digits`.
        bold_above: |Δ| above which a Δ cell is bold (None: never).
        note: A line under the table.
    """

    title: str
    slug: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    digits: int = 2
    column_digits: dict[str, int] = field(default_factory=dict)
    bold_above: float | None = BOLD_ABOVE_POINTS
    note: str = ""

    def to_markdown(self) -> str:
        """The table as a Markdown section (heading, table, note)."""
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(_escape(c) for c in self.columns) + " |")
        lines.append("|" + "|".join(["---"] + ["--:"] * (len(self.columns) - 1)) + "|")
        for row in self.rows:
            cells = [self._format(col, value) for col, value in zip(self.columns, row, strict=True)]
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def _format(self, column: str, value: Cell) -> str:
        if value is None:
            return ""
        if not isinstance(value, float):
            return str(value)
        digits = self.column_digits.get(column, self.digits)
        if not column.endswith(DELTA):
            return f"{value:.{digits}f}"
        text = f"{value:+.{digits}f}"
        bold = self.bold_above is not None and abs(value) > self.bold_above
        return f"**{text}**" if bold else text

    def to_csv(self) -> str:
        """The table as CSV text, raw numbers (floats rounded to 6 decimals), blanks for None."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(
                ["" if v is None else round(v, 6) if isinstance(v, float) else v for v in row]
            )
        return buffer.getvalue()


def _escape(text: str) -> str:
    """A Markdown table cell: a literal "|" would end the cell."""
    return text.replace("|", "\\|")
