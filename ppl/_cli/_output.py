"""Plain-text tables and JSON for the command line's results."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Returns the rows under their headers in aligned columns; columns in `right` align right."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths).rstrip()
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def format_value(value: float) -> str:
    """A perplexity with all the digits a float64 holds (17 significant)."""
    return "nan" if math.isnan(value) else f"{value:.17g}"


def format_diff(value: float) -> str:
    """A difference in two significant digits; exact zeros print as 0."""
    if math.isnan(value):
        return "nan"
    return "0" if value == 0 else f"{value:.1e}"


def format_seconds(seconds: float) -> str:
    """A duration in milliseconds or seconds."""
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; those become null."""
    return value if math.isfinite(value) else None


def dumps(document: dict[str, Any]) -> str:
    """The document as strict JSON (no NaN), indented."""
    return json.dumps(document, indent=2, allow_nan=False)
