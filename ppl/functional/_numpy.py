"""The NumPy backend: blocks of rows small enough to stay in cache, and in-place arithmetic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ppl.functional._state import PerplexityState
from ppl.functional._validation import raise_first_invalid

NAME = "numpy"

# Bytes of one full-size buffer of a block. Two such buffers are live at once, so a call costs at
# most twice this beyond its input; small enough to stay in a core's L2 cache.
BLOCK_BYTES = 1 << 19


def init_state(like: Any) -> PerplexityState:
    del like
    return PerplexityState(
        np.zeros((), np.float64),
        np.zeros((), np.int64),
        np.zeros((), np.float64),
        np.zeros((), np.int64),
    )


def as_state(state: PerplexityState) -> PerplexityState:
    # NumPy arithmetic on 0-d arrays returns scalars; the state keeps 0-d arrays.
    return PerplexityState(*(np.asarray(field) for field in state))


def where(condition: Any, a: Any, b: Any) -> np.ndarray:
    return np.asarray(np.where(condition, a, b))


def maximum(a: Any, b: Any) -> Any:
    return np.maximum(a, b)


def astype(x: Any, dtype: Any) -> Any:
    return np.asarray(x).astype(dtype)


def compute_dtype(dtype: Any) -> np.dtype | None:
    """float32 for inputs of at most 32 bits (bfloat16 included), float64 for float64; else None."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16" or (dtype.kind == "f" and dtype.itemsize <= 4):
        return np.dtype(np.float32)
    if dtype.kind == "f":
        return np.dtype(np.float64)
    return None


def shape(x: np.ndarray) -> tuple[int, ...]:
    return tuple(x.shape)


def is_bool(x: np.ndarray) -> bool:
    return x.dtype == np.bool_


def check_same_place(state: PerplexityState, values: np.ndarray, argument: str) -> None:
    del state, values, argument


def accumulate(
    values: np.ndarray, kind: str, mask: np.ndarray | None, validate: bool
) -> tuple[Any, Any, Any, Any]:
    """Returns `(perplexities_sum, sum_error, count_low, count_high)` of the rows of `values`."""
    leading_shape = values.shape[:-1]
    vocab = values.shape[-1]
    # Known shortfall: leading axes that cannot be flattened as a view (a transposed batch, say)
    # are copied here once, whole; the block budget then holds beyond that copy only.
    rows = values.reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    dtype = compute_dtype(values.dtype)
    assert dtype is not None
    block_rows = max(1, BLOCK_BYTES // (vocab * dtype.itemsize))
    row_perplexities = _logits_rows if kind == "logits" else _probs_rows

    # Buffers for a block's temporaries, allocated once per call: fresh memory for every block
    # would be paid for in page faults.
    buffer_rows = min(block_rows, rows.shape[0])
    buffers = (np.empty((buffer_rows, vocab), dtype), np.empty((buffer_rows, vocab), dtype))

    total = 0.0
    with np.errstate(all="ignore"):
        for start in range(0, rows.shape[0], block_rows):
            block = rows[start : start + block_rows]
            block_mask = None if flat_mask is None else flat_mask[start : start + block_rows]
            size = block.shape[0]
            first, second = buffers[0][:size], buffers[1][:size]
            perplexities, valid = row_perplexities(block, first, second, validate)
            if valid is not None and not _all_valid(valid, block_mask):
                raise_first_invalid(
                    _blocks(rows, flat_mask, dtype, block_rows, start), kind, leading_shape
                )
            if block_mask is not None:
                # `where`, not a product: a masked row's NaN must not reach the sum.
                perplexities = np.where(block_mask, perplexities, 0.0)
            total += float(perplexities.sum(dtype=np.float64))

    count = rows.shape[0] if flat_mask is None else int(np.count_nonzero(flat_mask))
    return np.float64(total), 0.0, np.int64(count), np.int64(0)


def _all_valid(valid: np.ndarray, mask: np.ndarray | None) -> bool:
    return bool(valid.all()) if mask is None else bool((valid | ~mask).all())


def _blocks(
    rows: np.ndarray, mask: np.ndarray | None, dtype: np.dtype, block_rows: int, start: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    for first in range(start, rows.shape[0], block_rows):
        block_mask = None if mask is None else mask[first : first + block_rows]
        yield first, rows[first : first + block_rows].astype(dtype), block_mask


def _logits_rows(
    block: np.ndarray, shifted: np.ndarray, weights: np.ndarray, validate: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    if block.dtype == shifted.dtype:
        row_max = block.max(axis=-1, keepdims=True)
        np.subtract(block, row_max, out=shifted)
    else:
        # float16 is promoted into the buffer first: NumPy's float16 reductions are emulated and
        # several times slower than the conversion.
        np.copyto(shifted, block)
        row_max = shifted.max(axis=-1, keepdims=True)
        np.subtract(shifted, row_max, out=shifted)
    # Entropy from the log-normaliser and the expected shifted logit, s = logits - max:
    # H = log Z - sum(exp(s) * s) / Z with Z = sum(exp(s)); every exp(s) <= 1, so nothing overflows.
    # -inf logits: the most negative finite s gives exp(s) == 0 and exp(s) * s == 0, not NaN.
    np.maximum(shifted, np.finfo(shifted.dtype).min, out=shifted)
    np.exp(shifted, out=weights)
    normaliser = weights.sum(axis=-1)
    np.multiply(weights, shifted, out=weights)
    entropy = np.log(normaliser) - weights.sum(axis=-1) / normaliser
    # A finite row maximum rules out NaN, +inf and rows of only -inf at once.
    valid = np.isfinite(row_max[:, 0]) if validate else None
    return np.exp(entropy), valid


def _probs_rows(
    block: np.ndarray, normalised: np.ndarray, log_normalised: np.ndarray, validate: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    values = block
    if block.dtype != normalised.dtype:
        # float16 is promoted into the buffer first, as for logits.
        np.copyto(normalised, block)
        values = normalised
    row_sum = values.sum(axis=-1, keepdims=True)
    valid = None
    if validate:
        # A finite, positive sum rules out NaN and +-inf (and an overflowing sum); the minimum
        # rules out negative entries.
        total = row_sum[:, 0]
        valid = np.isfinite(total) & (total > 0) & (values.min(axis=-1) >= 0)
    np.divide(values, row_sum, out=normalised)
    # H = -sum(q log q) with q = probs / sum(probs); log 0 = -inf becomes the most negative
    # finite number, so that 0 * log 0 == 0.
    np.log(normalised, out=log_normalised)
    np.maximum(log_normalised, np.finfo(normalised.dtype).min, out=log_normalised)
    np.multiply(log_normalised, normalised, out=log_normalised)
    entropy = -log_normalised.sum(axis=-1)
    # A sum that overflows makes every q zero, and a negative sum (a row of negative entries)
    # makes every q positive: either is NaN, never a plausible value.
    entropy = np.where(np.isfinite(row_sum[:, 0]) & (row_sum[:, 0] > 0), entropy, np.nan)
    return np.exp(entropy), valid
