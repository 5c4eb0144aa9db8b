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

# Bytes of one full-size buffer of a block in eager mode (two are live at once): cache-sized.
BLOCK_BYTES = 1 << 20
# The same on an accelerator, where each op is a kernel launch and there is no cache to fit: blocks
# large enough that launches do not dominate, two buffers still within the 64 MiB budget. Not yet
# measured on a GPU.
DEVICE_BLOCK_BYTES = 1 << 24
# Inputs up to this many bytes (as float32) take one short functional pass instead of the blocks.
SMALL_BYTES = 1 << 16
# Rows whose per-row statistics are kept at once; float32 and a few of them, a few MiB at most.
CHUNK_ROWS = 1 << 16


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
    # Known shortfall: leading axes that cannot be flattened as a view (a transposed batch, say)
    # are copied here once, whole; the block budget then holds beyond that copy only.
    rows = values.detach().reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    dtype = compute_dtype(values.dtype)
    assert dtype is not None

    itemsize = torch.finfo(dtype).bits // 8
    with torch.no_grad():
        if compiling:
            total = _compiled_total(rows, flat_mask, kind, dtype)
            num_invalid = None
            block_rows = rows.shape[0]
        elif rows.numel() * itemsize <= SMALL_BYTES:
            total, num_invalid = _small_total(rows, flat_mask, kind, dtype, validate)
            block_rows = rows.shape[0]
        else:
            total, num_invalid, block_rows = _eager_total(rows, flat_mask, kind, dtype, validate)

    # The one host sync of a validating update; without validation nothing is read back.
    if num_invalid is not None and bool(num_invalid > 0):
        raise_first_invalid(_numpy_blocks(rows, flat_mask, dtype, block_rows), kind, leading_shape)
    count = rows.shape[0] if flat_mask is None else flat_mask.sum()
    return total, 0.0, count, 0


def _compiled_total(
    rows: torch.Tensor, mask: torch.Tensor | None, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    # Inductor fuses each chunk's whole pass into one kernel that keeps no full-size temporary,
    # only per-row values; chunks bound those (the loop is unrolled into the graph).
    row_perplexities = _logits_row_perplexities if kind == "logits" else _probs_row_perplexities
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        perplexities = row_perplexities(chunk, dtype)
        if mask is not None:
            # `where`, not a product: a masked row's NaN must not reach the sum.
            perplexities = torch.where(mask[start : start + CHUNK_ROWS], perplexities, 0.0)
        total = total + perplexities.sum(dtype=torch.float64)
    return total


def _small_total(
    rows: torch.Tensor, mask: torch.Tensor | None, kind: str, dtype: torch.dtype, validate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # An input of a few KiB: the fewest ops (each costs microseconds of dispatch); temporaries of
    # this size come from the allocator's free lists, without page faults.
    if kind == "logits":
        perplexities, row_max = _logits_row_perplexities(rows, dtype, with_max=True)
        # A finite row maximum rules out NaN, +inf and rows of only -inf at once.
        valid = torch.isfinite(row_max) if validate else None
    else:
        perplexities = _probs_row_perplexities(rows, dtype)
        valid = None
        if validate:
            row_sum = rows.sum(dim=-1, dtype=dtype)
            valid = torch.isfinite(row_sum) & (row_sum > 0) & (rows.amin(dim=-1) >= 0)
    num_invalid = None
    if valid is not None:
        num_invalid = (~valid if mask is None else ~valid & mask).sum()
    if mask is not None:
        # `where`, not a product: a masked row's NaN must not reach the sum.
        perplexities = torch.where(mask, perplexities, 0.0)
    return perplexities.sum(dtype=torch.float64), num_invalid


def _logits_row_perplexities(
    chunk: torch.Tensor, dtype: torch.dtype, with_max: bool = False
) -> Any:
    row_max = chunk.amax(dim=-1, keepdim=True).to(dtype)
    # Entropy from the log-normaliser and the expected shifted logit, s = logits - max:
    # H = log Z - sum(exp(s) * s) / Z with Z = sum(exp(s)); every exp(s) <= 1, so nothing overflows.
    # -inf logits: the most negative finite s gives exp(s) == 0 and exp(s) * s == 0, not NaN.
    shifted = (chunk.to(dtype) - row_max).clamp(min=torch.finfo(dtype).min)
    weights = shifted.exp()
    normaliser = weights.sum(dim=-1)
    perplexities = (normaliser.log() - (weights * shifted).sum(dim=-1) / normaliser).exp()
    return (perplexities, row_max[:, 0]) if with_max else perplexities


def _probs_row_perplexities(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    values = chunk.to(dtype)
    row_sum = values.sum(dim=-1, keepdim=True)
    normalised = values / row_sum
    # H = -sum(q log q) with q = probs / sum(probs); log 0 = -inf becomes the most negative
    # finite number, so that 0 * log 0 == 0.
    log_normalised = normalised.log().clamp(min=torch.finfo(dtype).min)
    perplexities = (-(normalised * log_normalised).sum(dim=-1)).exp()
    return _nan_unless_positive_finite(perplexities, row_sum[:, 0])


def _nan_unless_positive_finite(perplexities: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    # A sum that overflows makes every q zero, and a negative sum (a row of negative entries)
    # makes every q positive: either is NaN, never a plausible value.
    return torch.where(torch.isfinite(row_sum) & (row_sum > 0), perplexities, float("nan"))


def _eager_total(
    rows: torch.Tensor, mask: torch.Tensor | None, kind: str, dtype: torch.dtype, validate: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The masked sum of the rows' perplexities, the number of invalid unmasked rows, block rows.

    Each op runs over a cache-sized block and writes into buffers allocated once per call, so no
    block pays for fresh (page-faulting) memory. Per-row statistics are gathered for a chunk of
    rows and turned into perplexities there, so the small per-row ops run once a chunk, not once a
    block.
    """
    num_rows, vocab = rows.shape
    itemsize = torch.finfo(dtype).bits // 8
    block_bytes = BLOCK_BYTES if rows.device.type == "cpu" else DEVICE_BLOCK_BYTES
    block_rows = min(num_rows, max(1, block_bytes // (vocab * itemsize)))
    chunk_rows = min(num_rows, block_rows * max(1, CHUNK_ROWS // block_rows))
    device = rows.device
    first = torch.empty((block_rows, vocab), dtype=dtype, device=device)
    second = torch.empty((block_rows, vocab), dtype=dtype, device=device)
    # Per-row statistics of a chunk: [0] the normaliser (or row sum), [1] the weighted sum (or
    # the negated entropy), [2] the row maximum (or minimum) for validation.
    stats = torch.empty((3, chunk_rows), dtype=dtype, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    num_invalid = torch.zeros((), dtype=torch.int64, device=device) if validate else None

    for chunk_start in range(0, num_rows, chunk_rows):
        chunk_end = min(num_rows, chunk_start + chunk_rows)
        for start in range(chunk_start, chunk_end, block_rows):
            end = min(chunk_end, start + block_rows)
            block = rows[start:end]
            row_stats = stats[:, start - chunk_start : end - chunk_start]
            if kind == "logits":
                _logits_block(block, first[: end - start], second[: end - start], row_stats)
            else:
                _probs_block(
                    block, first[: end - start], second[: end - start], row_stats, validate
                )
        size = chunk_end - chunk_start
        normaliser, weighted, extreme = stats[0, :size], stats[1, :size], stats[2, :size]
        if kind == "probs":
            # The block wrote -H into `weighted`: perplexity = exp(-(-H)).
            perplexities = _nan_unless_positive_finite(weighted.neg().exp_(), normaliser)
            valid = None
            if validate:
                valid = torch.isfinite(normaliser) & (normaliser > 0) & (extreme >= 0)
        else:
            # exp(H) with H = log Z - S / Z.
            perplexities = normaliser.log().sub_(weighted / normaliser).exp_()
            # A finite row maximum rules out NaN, +inf and rows of only -inf at once.
            valid = torch.isfinite(extreme) if validate else None
        chunk_mask = None if mask is None else mask[chunk_start:chunk_end]
        if valid is not None and num_invalid is not None:
            invalid = ~valid if chunk_mask is None else ~valid & chunk_mask
            num_invalid += invalid.sum()
        if chunk_mask is not None:
            # `where`, not a product: a masked row's NaN must not reach the sum.
            perplexities = torch.where(chunk_mask, perplexities, 0.0)
        total += perplexities.sum(dtype=torch.float64)
    return total, num_invalid, block_rows


def _logits_block(
    block: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor, row_stats: torch.Tensor
) -> None:
    if block.dtype == shifted.dtype:
        row_max = torch.amax(block, dim=-1, keepdim=True)
        torch.sub(block, row_max, out=shifted)
    else:
        # A half-precision block is promoted into the buffer first: one conversion pass, after
        # which every op runs on float32 (mixed-dtype ops take a slower path, about twice as long).
        shifted.copy_(block)
        row_max = torch.amax(shifted, dim=-1, keepdim=True)
        shifted.sub_(row_max)
    row_stats[2] = row_max[:, 0]
    # Entropy from the log-normaliser and the expected shifted logit, s = logits - max:
    # H = log Z - sum(exp(s) * s) / Z with Z = sum(exp(s)); every exp(s) <= 1, so nothing overflows.
    torch.exp(shifted, out=weights)
    torch.sum(weights, dim=-1, out=row_stats[0])
    weights.mul_(shifted)
    # A -inf logit gives exp(s) * s = 0 * -inf = NaN, its true limit being 0: nansum drops it. No
    # other NaN is lost: NaN or +inf in a row makes its maximum, hence s and Z, NaN already.
    torch.nansum(weights, dim=-1, out=row_stats[1])


def _probs_block(
    block: torch.Tensor,
    normalised: torch.Tensor,
    log_normalised: torch.Tensor,
    row_stats: torch.Tensor,
    validate: bool,
) -> None:
    values = block
    if block.dtype != normalised.dtype:
        # Half precision is promoted into the buffer first, as for logits.
        values = normalised.copy_(block)
    row_sum = row_stats[0]
    torch.sum(values, dim=-1, out=row_sum)
    if validate:
        # A finite, positive sum rules out NaN and +-inf (and an overflowing sum); the minimum
        # rules out negative entries.
        row_stats[2] = torch.amin(values, dim=-1)
    torch.div(values, row_sum[:, None], out=normalised)
    # H = -sum(q log q) with q = probs / sum(probs); log 0 = -inf becomes the most negative
    # finite number, so that 0 * log 0 == 0. (xlogy would do it in one op, but is not vectorised
    # on CPU: six times slower than these three.)
    torch.log(normalised, out=log_normalised)
    log_normalised.clamp_(min=torch.finfo(log_normalised.dtype).min)
    log_normalised.mul_(normalised)
    torch.sum(log_normalised, dim=-1, out=row_stats[1])


def _numpy_blocks(
    rows: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype, block_rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    for first in range(0, rows.shape[0], block_rows):
        block = rows[first : first + block_rows].to(dtype).cpu().numpy()
        block_mask = None if mask is None else mask[first : first + block_rows].cpu().numpy()
        yield first, block, block_mask
