"""Summing a JAX `PerplexityState` over a named mapped axis, inside `pmap` or `shard_map`.

A plain `psum` of each field would be exact for an int64 count but not for the two-word uint32
count of JAX without x64 (a low word that wraps loses its carry), and it would round the float32
sums once per device. Instead every device writes the bit patterns of its four fields into its own
row of a `[devices, 4]` block of zeros and one `psum` of the block gathers all rows on every device:
an integer sum of one row and zeros changes no bit. Each device then folds the rows in the same
order with the core's compensated, carrying addition, so the result is the same on every device,
its count exact and its sum as exact as a merge of the states.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ppl.functional import _backends
from ppl.functional._state import PerplexityState, add_to_state, check_state


def perplexity_state_psum(state: PerplexityState, axis_name: Hashable) -> PerplexityState:
    """Returns the state of all devices along `axis_name` together, on every device.

    For use inside `jax.pmap`, `jax.shard_map` or any transform that binds a named axis (also over
    several hosts). A collective: every device of the axis must call it. It costs one `psum` of
    `4 * axis_size` words of 32 bits (64 with x64) per device, plus a fold over `axis_size` rows.
    The result is identical on every device (and replicated as far as `shard_map` can tell).

    Args:
        state: a JAX `PerplexityState` (from `perplexity_state_update`), this device's part.
        axis_name: the name of the mapped axis to sum over (a tuple of names sums over all of
            them), as given to `pmap(axis_name=...)` or the mesh of `shard_map`.

    Returns:
        A new `PerplexityState` of the same dtypes: the exact total count (two uint32 words
        without x64, carries included) and the compensated sum of the devices' sums.

    Raises:
        TypeError: `state` is no JAX `PerplexityState`.
        NameError: `axis_name` is not bound (called outside `pmap` / `shard_map`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from ppl.functional import perplexity_compute, perplexity_state_update
        >>> def local_value(logits):
        ...     state = perplexity_state_update(None, logits=logits)
        ...     return perplexity_compute(perplexity_state_psum(state, "devices"))
        >>> n = jax.local_device_count()
        >>> values = jax.pmap(local_value, axis_name="devices")(jnp.zeros((n, 2, 3)))
        >>> float(values[0])
        3.0
    """
    import jax
    import jax.numpy as jnp

    backend = check_state(state, "state")
    if backend.NAME != "jax":
        raise TypeError(
            f"`state` must hold JAX arrays; got {backend.NAME} arrays (use "
            f"ppl.stateful.sync_state for torch.distributed)."
        )
    sum_dtype = jnp.dtype(state.perplexities_sum.dtype)
    count_dtype = jnp.dtype(state.num_distributions.dtype)
    # Bit patterns travel as unsigned words of the sum's width: float32 -> uint32 (no x64),
    # float64 -> uint64 (x64), so every field of a row fits one word of a single block.
    word_dtype = jnp.dtype(f"uint{8 * sum_dtype.itemsize}")

    def to_word(x: Any) -> Any:
        x = jnp.asarray(x)
        if jnp.dtype(x.dtype).itemsize == word_dtype.itemsize:
            return jax.lax.bitcast_convert_type(x, word_dtype)
        return x.astype(word_dtype)

    def from_word(x: Any, dtype: Any) -> Any:
        return jax.lax.bitcast_convert_type(x, dtype)

    num_devices = jax.lax.psum(1, axis_name)
    row = jnp.stack([to_word(field) for field in state])
    index = jax.lax.axis_index(axis_name)
    block = jnp.zeros((num_devices, len(state)), word_dtype).at[index].set(row)
    rows = jax.lax.psum(block, axis_name)

    def add_row(i: Any, total: PerplexityState) -> PerplexityState:
        words = rows[i]
        return add_to_state(
            total,
            backend,
            from_word(words[0], sum_dtype),
            from_word(words[1], count_dtype),
            from_word(words[3], count_dtype),
            from_word(words[2], sum_dtype),
        )

    empty = _backends.load("jax").init_state(None)
    return jax.lax.fori_loop(0, num_devices, add_row, empty)
