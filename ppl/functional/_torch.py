"""The PyTorch backend: blocks of rows, in-place arithmetic, and at most one host sync an update.

Without validation an update reads no value back to the host, so it neither stalls a CUDA stream
nor breaks a `torch.compile` graph. With validation the invalid rows of all blocks are counted on
the device and read back once, at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ppl.functional._state import PerplexityState
from ppl.functional._validation import raise_first_invalid

NAME = "torch"

# Bytes of one full-size temporary of a block in eager mode (two are live at once): cache-sized.
BLOCK_BYTES = 1 << 20
# Under torch.compile the loop over blocks is unrolled into the graph, so blocks are larger there:
# the temporaries of one block stay within the 64 MiB budget.
COMPILED_BLOCK_BYTES = 1 << 24


def init_state(like: Any) -> PerplexityState:
    device = like.device if isinstance(like, torch.Tensor) else None
    return PerplexityState(
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
    )


def as_state(state: PerplexityState) -> PerplexityState:
    return state


def where(condition: Any, a: Any, b: Any) -> torch.Tensor:
    return torch.where(condition, a, b)


def maximum(a: torch.Tensor, b: float) -> torch.Tensor:
    return torch.clamp(a, min=b)


def astype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for floating inputs of at most 32 bits, float64 for float64; else None."""
    if not dtype.is_floating_point:
        return None
    return torch.float64 if dtype == torch.float64 else torch.float32


def shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def is_bool(x: torch.Tensor) -> bool:
    return x.dtype == torch.bool


def check_same_place(state: PerplexityState, values: torch.Tensor, argument: str) -> None:
    if state.perplexities_sum.device != values.device:
        raise ValueError(
            f"`state` lives on {state.perplexities_sum.device} but `{argument}` on "
            f"{values.device}; move one of them (a state follows the device of its first input)."
        )


def accumulate(
    values: torch.Tensor, kind: str, mask: torch.Tensor | None, validate: bool
) -> tuple[Any, Any, Any, Any]:
    """Returns `(perplexities_sum, sum_error, count_low, count_high)` of the rows of `values`."""
    if mask is not None and mask.device != values.device:
        raise ValueError(f"`mask` lives on {mask.device} but `{kind}` on {values.device}.")
    compiling = torch.compiler.is_compiling()
    validate = validate and not compiling
    leading_shape = tuple(values.shape[:-1])
    vocab = values.shape[-1]
    rows = values.detach().reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    dtype = compute_dtype(values.dtype)
    assert dtype is not None
    itemsize = torch.finfo(dtype).bits // 8
    block_bytes = COMPILED_BLOCK_BYTES if compiling else BLOCK_BYTES
    block_rows = max(1, block_bytes // (vocab * itemsize))
    row_perplexities = _logits_rows if kind == "logits" else _probs_rows

    total = torch.zeros((), dtype=torch.float64, device=values.device)
    num_invalid = torch.zeros((), dtype=torch.int64, device=values.device)
    with torch.no_grad():
        for start in range(0, rows.shape[0], block_rows):
            block = rows[start : start + block_rows]
            block_mask = None if flat_mask is None else flat_mask[start : start + block_rows]
            perplexities, valid = row_perplexities(block, dtype, validate)
            if valid is not None:
                invalid = ~valid if block_mask is None else ~valid & block_mask
                num_invalid = num_invalid + invalid.sum()
            if block_mask is not None:
                # `where`, not a product: a masked row's NaN must not reach the sum.
                perplexities = torch.where(block_mask, perplexities, 0.0)
            total = total + perplexities.sum(dtype=torch.float64)

    if validate and bool(num_invalid > 0):
        raise_first_invalid(_numpy_blocks(rows, flat_mask, dtype, block_rows), kind, leading_shape)
    count = rows.shape[0] if flat_mask is None else flat_mask.sum()
    return total, 0.0, count, 0


def _numpy_blocks(
    rows: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype, block_rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    for first in range(0, rows.shape[0], block_rows):
        block = rows[first : first + block_rows].to(dtype).cpu().numpy()
        block_mask = None if mask is None else mask[first : first + block_rows].cpu().numpy()
        yield first, block, block_mask


def _logits_rows(
    block: torch.Tensor, dtype: torch.dtype, validate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    row_max = block.amax(dim=-1, keepdim=True)
    # Entropy from the log-normaliser and the expected shifted logit, s = logits - max:
    # H = log Z - sum(exp(s) * s) / Z with Z = sum(exp(s)); every exp(s) <= 1, so nothing overflows.
    # Subtracting a float32 maximum promotes a half-precision block one block at a time.
    shifted = torch.sub(block, row_max.to(dtype))
    # -inf logits: the most negative finite s gives exp(s) == 0 and exp(s) * s == 0, not NaN.
    shifted.clamp_(min=torch.finfo(dtype).min)
    weights = shifted.exp()
    normaliser = weights.sum(dim=-1)
    weights.mul_(shifted)
    entropy = normaliser.log() - weights.sum(dim=-1) / normaliser
    # A finite row maximum rules out NaN, +inf and rows of only -inf at once.
    valid = torch.isfinite(row_max[:, 0]) if validate else None
    return entropy.exp(), valid


def _probs_rows(
    block: torch.Tensor, dtype: torch.dtype, validate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    row_sum = block.sum(dim=-1, keepdim=True, dtype=dtype)
    normalised = block / row_sum
    # H = -sum(q log q) with q = probs / sum(probs); log 0 = -inf becomes the most negative
    # finite number, so that 0 * log 0 == 0.
    log_normalised = normalised.log()
    log_normalised.clamp_(min=torch.finfo(dtype).min)
    log_normalised.mul_(normalised)
    entropy = -log_normalised.sum(dim=-1)
    # A sum that overflows makes every q zero, and a negative sum (a row of negative entries)
    # makes every q positive: either is NaN, never a plausible value.
    entropy = torch.where(
        torch.isfinite(row_sum[:, 0]) & (row_sum[:, 0] > 0), entropy, float("nan")
    )
    valid = None
    if validate:
        # A finite, positive sum rules out NaN and +-inf (and an overflowing sum); the minimum
        # rules out negative entries.
        total = row_sum[:, 0]
        valid = torch.isfinite(total) & (total > 0) & (block.amin(dim=-1) >= 0)
    return entropy.exp(), valid
