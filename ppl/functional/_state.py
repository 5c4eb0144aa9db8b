"""The accumulator of perplexity: its state, and the exact arithmetic on it.

A state is a sum of per-distribution perplexities and a count of distributions. On NumPy, PyTorch
and JAX with x64 the sum is float64 and the count int64, as in NeMo's metric. JAX without x64 has
neither, so there the sum is a compensated float32 pair (Knuth's TwoSum keeps the rounding error of
every addition in a second word) and the count is two uint32 words. The same code serves all
cases: in float64 the error word only makes the sum more exact, and an int64 count never carries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ppl.functional import _backends

_LOW_WORD = 2.0**32


class PerplexityState(NamedTuple):
    """Running sums of a perplexity metric, as 0-d arrays of one backend.

    A `NamedTuple`, so a JAX pytree and a plain tuple of tensors for torch. Build one with
    `perplexity_state_init` or `perplexity_state_update`; treat it as opaque apart from the first
    two fields.

    Attributes:
        perplexities_sum: sum of `exp(entropy)` over the distributions seen; float64 (float32 on
            JAX without x64).
        num_distributions: number of distributions seen; int64 (the low uint32 word of the count on
            JAX without x64).
        perplexities_sum_error: rounding error of `perplexities_sum`, kept by compensated addition;
            same dtype as the sum.
        num_distributions_high: the count's high word, `count // 2**32` on JAX without x64; zero
            where the count is int64.
    """

    perplexities_sum: Any
    num_distributions: Any
    perplexities_sum_error: Any
    num_distributions_high: Any


def perplexity_state_init(like: Any) -> PerplexityState:
    """Returns an empty state.

    Args:
        like: an array whose backend (and, for torch, device) the state takes, or one of the names
            `"numpy"`, `"torch"`, `"jax"`.

    Returns:
        A `PerplexityState` of zeros.

    Raises:
        ValueError: `like` is a string that names no backend.
        TypeError: `like` is neither a backend name nor an array of a supported backend.

    Example:
        >>> perplexity_state_init("numpy").num_distributions
        array(0)
    """
    return _backends.backend_for(like, "like").init_state(like)


def perplexity_state_merge(*states: PerplexityState) -> PerplexityState:
    """Returns the state of all the distributions of `states` together.

    Args:
        *states: one or more states of one backend.

    Returns:
        A new `PerplexityState`; the arguments are left as they were.

    Raises:
        ValueError: no state was given.
        TypeError: an argument is no `PerplexityState`, or the states are of different backends.

    Example:
        >>> import numpy as np
        >>> a = perplexity_state_update(None, probs=np.array([1.0, 0.0]))
        >>> b = perplexity_state_update(None, probs=np.array([1.0, 1.0]))
        >>> float(perplexity_compute(perplexity_state_merge(a, b)))
        1.5
    """
    if not states:
        raise ValueError("perplexity_state_merge needs at least one state; got none.")
    backend = check_state(states[0], "states[0]")
    for index, state in enumerate(states[1:], start=1):
        other = check_state(state, f"states[{index}]")
        if other is not backend:
            raise TypeError(
                f"perplexity_state_merge needs states of one backend; states[0] is {backend.NAME} "
                f"but states[{index}] is {other.NAME}."
            )
    merged = states[0]
    for state in states[1:]:
        merged = add_to_state(
            merged,
            backend,
            state.perplexities_sum,
            state.num_distributions,
            state.num_distributions_high,
            state.perplexities_sum_error,
        )
    return merged


def perplexity_compute(state: PerplexityState) -> Any:
    """Returns the mean perplexity of the distributions in `state`.

    Safe under `jax.jit` and `torch.compile`: an empty state gives NaN rather than an error.

    Args:
        state: a `PerplexityState`.

    Returns:
        A 0-d array of the state's backend and sum dtype (float64, or float32 on JAX without x64):
        the mean over all distributions of `exp(entropy)`, entropy in nats; NaN when the state is
        empty.

    Raises:
        TypeError: `state` is no `PerplexityState` of a supported backend.

    Example:
        >>> import numpy as np
        >>> state = perplexity_state_update(None, logits=np.zeros((3, 4)))
        >>> float(perplexity_compute(state))
        4.0
    """
    backend = check_state(state, "state")
    total = state.perplexities_sum + state.perplexities_sum_error
    count = total_count(state, backend)
    safe_count = backend.maximum(count, 1.0)
    return backend.where(count > 0, total / safe_count, float("nan"))


def total_count(state: PerplexityState, backend: Any) -> Any:
    """The count of `state` as a float of the sum's dtype: `high * 2**32 + low`."""
    dtype = state.perplexities_sum.dtype
    high = backend.astype(state.num_distributions_high, dtype)
    low = backend.astype(state.num_distributions, dtype)
    return high * _LOW_WORD + low


def two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """Knuth's TwoSum: `total = fl(a + b)` and `error` with `total + error == a + b` exactly."""
    total = a + b
    b_virtual = total - a
    error = (a - (total - b_virtual)) + (b - b_virtual)
    return total, error


def add_to_state(
    state: PerplexityState,
    backend: Any,
    perplexities_sum: Any,
    count_low: Any,
    count_high: Any,
    sum_error: Any = 0.0,
) -> PerplexityState:
    """Returns `state` with a sum and a two-word count added; the count words are the state's."""
    new_sum, error = two_sum(state.perplexities_sum, perplexities_sum)
    new_error = state.perplexities_sum_error + sum_error + error
    new_low = state.num_distributions + count_low
    # The low word wraps modulo 2**32 when it is uint32; a wrap shows as a smaller result.
    carry = backend.astype(new_low < state.num_distributions, new_low.dtype)
    new_high = state.num_distributions_high + count_high + carry
    return backend.as_state(PerplexityState(new_sum, new_low, new_error, new_high))


def check_state(state: Any, name: str) -> Any:
    """Returns the backend of `state`, or raises `TypeError` naming `name`."""
    if not isinstance(state, PerplexityState):
        raise TypeError(
            f"`{name}` must be a PerplexityState (from perplexity_state_init or "
            f"perplexity_state_update); got {type(state).__name__}."
        )
    return _backends.backend_for(state.perplexities_sum, name)
