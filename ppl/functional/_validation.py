"""Finding and describing the first invalid distribution, on the error path only.

The backends detect invalid rows cheaply inside their fused pass (a row's maximum tells whether its
logits hold NaN, +inf or only -inf; its sum and minimum do the same for probs). Only when a row is
bad do they call `raise_first_invalid`, which walks the input block by block in NumPy to name the
first bad element, so that the error path, too, stays within the memory budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NoReturn

import numpy as np


def raise_first_invalid(
    blocks: Iterator[tuple[int, np.ndarray, np.ndarray | None]],
    kind: str,
    leading_shape: tuple[int, ...],
) -> NoReturn:
    """Raises `ValueError` for the first invalid unmasked row among `blocks`.

    Args:
        blocks: `(first_row, values, mask)` for consecutive row blocks of the flattened input, with
            `values` a float32 or float64 array of shape `[rows, vocab]` and `mask` a boolean array
            of shape `[rows]` or None.
        kind: `"logits"` or `"probs"`, the argument's name.
        leading_shape: the input's shape without its last axis, to report positions in.
    """
    find_problem = _logits_problem if kind == "logits" else _probs_problem
    for first_row, values, mask in blocks:
        for row_in_block, row in enumerate(values):
            if mask is not None and not mask[row_in_block]:
                continue
            problem = find_problem(row)
            if problem is None:
                continue
            message, column = problem
            index = (
                np.unravel_index(first_row + row_in_block, leading_shape) if leading_shape else ()
            )
            position = tuple(int(i) for i in index)
            if column is not None:
                position += (column,)
            raise ValueError(f"`{kind}` {message} at index {position}.")
    # A backend saw an invalid row that NumPy cannot find again: a bug, not bad input.
    raise AssertionError(f"an invalid row of `{kind}` was detected but could not be located")


def _first(row: np.ndarray, test: Callable[[np.ndarray], np.ndarray]) -> int | None:
    hits = np.flatnonzero(test(row))
    return int(hits[0]) if hits.size else None


def _logits_problem(row: np.ndarray) -> tuple[str, int | None] | None:
    column = _first(row, np.isnan)
    if column is not None:
        return "must not hold NaN; found NaN", column
    column = _first(row, np.isposinf)
    if column is not None:
        return "must not hold +inf (-inf is legal: zero probability); found +inf", column
    if np.all(np.isneginf(row)):
        return "must give some entry a finite value; found a row of only -inf", None
    return None


def _probs_problem(row: np.ndarray) -> tuple[str, int | None] | None:
    column = _first(row, lambda r: ~np.isfinite(r))
    if column is not None:
        return f"must be finite; found {row[column]}", column
    column = _first(row, lambda r: r < 0)
    if column is not None:
        return f"must be non-negative; found {row[column]}", column
    with np.errstate(over="ignore"):
        row_sum = row.sum()
    if row_sum == 0:
        return "rows must have a positive sum; found a row that sums to 0", None
    if not np.isfinite(row_sum):
        return f"rows must have a finite sum in {row.dtype}; found a row whose sum overflows", None
    return None
