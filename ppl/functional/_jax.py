"""The JAX backend: one jitted `fori_loop` over blocks of rows.

XLA fuses each row reduction with the elementwise work feeding it, so a block keeps only per-row
values beyond its own copy: the loop reads each block with `dynamic_slice` (no padding of the
input), which XLA on CPU copies out, so the block size bounds the memory beyond the input. The last
block is shifted back to end at the last row and the rows it shares with the previous block are
masked out. Without x64 the state is a compensated float32 sum and a two-word uint32 count (see
`_state`); with x64 it is float64 and int64 as on the other backends.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppl.functional._state import PerplexityState, two_sum
from ppl.functional._validation import raise_first_invalid

NAME = "jax"

# Bytes of one block of rows (as float32). XLA on CPU copies each block out of the input (the
# dynamic slice) and, beyond some size, writes a full-size temporary of whatever it is given in one
# piece (measured: none at 3072 x 32000 float32, one full copy at 4096 x 32000), so blocks are
# needed for the memory budget; at 2 to 16 MiB they are also as fast as one pass over the whole.
BLOCK_BYTES = 1 << 23


def _x64() -> bool:
    # float64 survives canonicalisation only when x64 is enabled.
    return bool(jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64)


def _state_dtypes() -> tuple[Any, Any]:
    return (jnp.float64, jnp.int64) if _x64() else (jnp.float32, jnp.uint32)


def init_state(like: Any) -> PerplexityState:
    del like
    sum_dtype, count_dtype = _state_dtypes()
    return PerplexityState(
        jnp.zeros((), sum_dtype),
        jnp.zeros((), count_dtype),
        jnp.zeros((), sum_dtype),
        jnp.zeros((), count_dtype),
    )


def as_state(state: PerplexityState) -> PerplexityState:
    return state


def where(condition: Any, a: Any, b: Any) -> jax.Array:
    return jnp.where(condition, a, b)


def maximum(a: Any, b: Any) -> jax.Array:
    return jnp.maximum(a, b)


def astype(x: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(x).astype(dtype)


def compute_dtype(dtype: Any) -> Any:
    """float32 for floating inputs of at most 32 bits, float64 for float64; else None."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def shape(x: jax.Array) -> tuple[int, ...]:
    return tuple(x.shape)


def is_bool(x: jax.Array) -> bool:
    return bool(x.dtype == jnp.bool_)


def check_same_place(state: PerplexityState, values: jax.Array, argument: str) -> None:
    del state, values, argument


def accumulate(
    values: jax.Array, kind: str, mask: jax.Array | None, validate: bool
) -> tuple[Any, Any, Any, Any]:
    """Returns `(perplexities_sum, sum_error, count_low, count_high)` of the rows of `values`."""
    traced = isinstance(values, jax.core.Tracer) or isinstance(mask, jax.core.Tracer)
    validate = validate and not traced
    leading_shape = tuple(values.shape[:-1])
    vocab = values.shape[-1]
    dtype = compute_dtype(values.dtype)
    rows = values.reshape(-1, vocab)
    num_rows = rows.shape[0]
    block_rows = min(num_rows, max(1, BLOCK_BYTES // (vocab * jnp.dtype(dtype).itemsize)))
    sum_dtype, count_dtype = _state_dtypes()

    flat_mask = None if mask is None else mask.reshape(-1)
    total, error, num_invalid = _accumulate_rows(
        rows, flat_mask, kind=kind, block_rows=block_rows, sum_dtype=sum_dtype
    )
    if validate and int(num_invalid) > 0:
        raise_first_invalid(
            _numpy_blocks(rows, flat_mask, dtype, block_rows),
            kind,
            leading_shape,
            subnormals_are_zero=True,
        )

    if flat_mask is None:
        low_words = 2**32 if count_dtype == jnp.uint32 else 2**63
        count_low = jnp.asarray(num_rows % low_words, count_dtype)
        count_high = jnp.asarray(num_rows // low_words, count_dtype)
    else:
        count_low = flat_mask.sum(dtype=count_dtype)
        count_high = jnp.zeros((), count_dtype)
    return total, error, count_low, count_high


@functools.partial(jax.jit, static_argnames=("kind", "block_rows", "sum_dtype"))
def _accumulate_rows(
    rows: jax.Array, mask: jax.Array | None, *, kind: str, block_rows: int, sum_dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The masked sum of the rows' perplexities as `(sum, rounding error)`, and the invalid rows."""
    num_rows = rows.shape[0]
    dtype = compute_dtype(rows.dtype)
    row_perplexities = _logits_rows if kind == "logits" else _probs_rows

    def block_stats(block: jax.Array, keep: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        perplexities, valid = row_perplexities(block, dtype)
        if keep is not None:
            # `where`, not a product: a masked row's NaN must not reach the sum.
            perplexities = jnp.where(keep, perplexities, 0.0)
            valid = valid | ~keep
        return perplexities.sum(dtype=sum_dtype), jnp.sum(~valid, dtype=jnp.int32)

    if num_rows <= block_rows:
        total, num_invalid = block_stats(rows, mask)
        return total, jnp.zeros((), sum_dtype), num_invalid

    num_blocks = -(-num_rows // block_rows)

    def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        total, error, num_invalid = carry
        # The last block ends at the last row; its rows already counted are masked out.
        start = jnp.minimum(i * block_rows, num_rows - block_rows)
        # Known shortfall: XLA on CPU has no bfloat16 dynamic slice and upcasts a bfloat16 loop
        # operand to float32 as a whole before the loop (twice the input's size beyond it).
        # Bitcasting to uint16 first is no cure: XLA on CPU copies the bitcast out as well.
        # float16 and float32 are sliced as they are; GPUs slice bfloat16 natively.
        block = jax.lax.dynamic_slice_in_dim(rows, start, block_rows, axis=0)
        keep = start + jnp.arange(block_rows) >= i * block_rows
        if mask is not None:
            keep = keep & jax.lax.dynamic_slice_in_dim(mask, start, block_rows)
        block_total, block_invalid = block_stats(block, keep)
        total, new_error = two_sum(total, block_total)
        return total, error + new_error, num_invalid + block_invalid

    zero = jnp.zeros((), sum_dtype)
    return jax.lax.fori_loop(0, num_blocks, body, (zero, zero, jnp.zeros((), jnp.int32)))


def _logits_rows(block: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    row_max = block.max(axis=-1, keepdims=True).astype(dtype)
    # Entropy from the log-normaliser and the expected shifted logit, s = logits - max:
    # H = log Z - sum(exp(s) * s) / Z with Z = sum(exp(s)); every exp(s) <= 1, so nothing overflows.
    normaliser = jnp.exp(block.astype(dtype) - row_max).sum(axis=-1)
    # XLA would share `block - row_max` (and a half-precision block's upcast) between the two sums
    # and so write it out full-size; behind the barrier each sum recomputes it inside its own
    # fused pass, and nothing full-size is kept.
    block, row_max = jax.lax.optimization_barrier((block, row_max))
    # -inf logits: the most negative finite s gives exp(s) == 0 and exp(s) * s == 0, not NaN.
    shifted = jnp.maximum(block.astype(dtype) - row_max, jnp.finfo(dtype).min)
    weighted = (jnp.exp(shifted) * shifted).sum(axis=-1)
    entropy = jnp.log(normaliser) - weighted / normaliser
    # A finite row maximum rules out NaN, +inf and rows of only -inf at once.
    return jnp.exp(entropy), jnp.isfinite(row_max[:, 0])


def _probs_rows(block: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    row_sum = block.sum(axis=-1, keepdims=True, dtype=dtype)
    # A finite, positive sum rules out NaN and +-inf; the minimum rules out negative entries.
    # XLA treats subnormal numbers as zero, though not in every operation (a one-entry row's sum
    # is its entry, unflushed, while the division flushes it): a sum of at least the smallest
    # normal number is what guarantees a row that is not all zero to the arithmetic below.
    total = row_sum[:, 0]
    valid = jnp.isfinite(total) & (total >= jnp.finfo(dtype).tiny) & (block.min(axis=-1) >= 0)
    # As for logits: the barrier keeps a half-precision block's upcast inside each fused pass.
    block, row_sum = jax.lax.optimization_barrier((block, row_sum))
    # XLA divides by the sum as a multiplication by its reciprocal, which is subnormal (so zero on
    # XLA) for a sum above 2**126. Such rows are first scaled by 2**-64, exactly (a power of two):
    # q = (probs * c) / (sum * c) is still probs / sum.
    scale = jnp.where(row_sum > 2.0**64, 2.0**-64, 1.0).astype(dtype)
    normalised = (block.astype(dtype) * scale) / (row_sum * scale)
    # H = -sum(q log q) with q = probs / sum(probs); log 0 = -inf becomes the most negative
    # finite number, so that 0 * log 0 == 0.
    log_normalised = jnp.maximum(jnp.log(normalised), jnp.finfo(dtype).min)
    entropy = -(normalised * log_normalised).sum(axis=-1)
    # A sum that overflows makes every q zero, and a negative sum (a row of negative entries)
    # makes every q positive: either is NaN, never a plausible value.
    entropy = jnp.where(jnp.isfinite(total) & (total > 0), entropy, jnp.nan)
    return jnp.exp(entropy), valid


def _numpy_blocks(
    rows: jax.Array, mask: jax.Array | None, dtype: Any, block_rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    for first in range(0, rows.shape[0], block_rows):
        block = np.asarray(rows[first : first + block_rows].astype(dtype))
        block_mask = None if mask is None else np.asarray(mask[first : first + block_rows])
        yield first, block, block_mask
