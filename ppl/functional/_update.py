"""Adding distributions to a state: argument checks, then the backend's fused pass over blocks."""

from __future__ import annotations

from typing import Any

from ppl.functional import _backends
from ppl.functional._state import PerplexityState, add_to_state, check_state, perplexity_compute


def perplexity_state_update(
    state: PerplexityState | None,
    probs: Any = None,
    logits: Any = None,
    *,
    mask: Any = None,
    validate_args: bool = True,
) -> PerplexityState:
    """Returns `state` with every distribution along the last axis of the input added.

    Every position of the leading axes is one distribution over the last axis. `probs` rows are
    normalised by their sum (zeros are legal, with `0 log 0 = 0`); `logits` may hold `-inf`, zero
    probability. Inputs of float16 and bfloat16 are computed in float32, float32 in float32 and
    float64 in float64, in blocks of rows, so the temporaries stay within a fixed budget whatever
    the input's size. The arguments are never mutated.

    Value checks (`validate_args=True`) run on concrete arrays only. Inside `jax.jit`, `jax.vmap`
    or `torch.compile` only the static checks (shapes, dtypes, argument choice) can raise; invalid
    values there propagate as NaN. With `validate_args=False` a torch update makes no host sync.

    Args:
        state: the state to add to, or None to start from an empty state of the input's backend.
        probs: non-negative weights with shape `[..., vocab]`, each row with a positive finite sum.
        logits: unnormalised log-probabilities with shape `[..., vocab]`; no NaN, no `+inf`, and
            at least one finite entry per row.
        mask: optional boolean array of shape `input.shape[:-1]`; distributions where it is False
            count for nothing, whatever they hold, and are not validated.
        validate_args: whether to check the input's values (see above).

    Returns:
        A new `PerplexityState` of the input's backend.

    Raises:
        ValueError: both or neither of `probs` and `logits`; an input with no axis or an empty last
            axis; a mask of the wrong shape; a torch state on another device than the input; with
            `validate_args`, invalid values (the message names the argument and the first bad
            index).
        TypeError: an input that is not floating point, a mask that is not boolean, arrays of
            different backends, or a `state` that is no `PerplexityState`.

    Example:
        >>> import numpy as np
        >>> state = perplexity_state_update(None, probs=np.array([[0.5, 0.5], [1.0, 0.0]]))
        >>> float(perplexity_compute(state))
        1.5
    """
    kind, values = _select_input(probs, logits)
    backend = _backends.backend_for(values, kind)
    _check_values(values, kind, backend)
    mask = _check_mask(mask, values, kind, backend)
    if state is None:
        state = backend.init_state(values)
    else:
        state_backend = check_state(state, "state")
        if state_backend is not backend:
            raise TypeError(
                f"`state` holds {state_backend.NAME} arrays but `{kind}` is a {backend.NAME} "
                f"array; a state takes inputs of its own backend only."
            )
        backend.check_same_place(state, values, kind)

    if 0 in backend.shape(values)[:-1]:
        return state
    perplexities_sum, sum_error, count_low, count_high = backend.accumulate(
        values, kind, mask, validate_args
    )
    updated = add_to_state(state, backend, perplexities_sum, count_low, count_high, sum_error)
    return backend.as_state(updated)


def perplexity(
    probs: Any = None, logits: Any = None, *, mask: Any = None, validate_args: bool = True
) -> Any:
    """Returns the mean perplexity of the distributions along the last axis of the input.

    The one-shot form of `perplexity_state_update` followed by `perplexity_compute`; it takes the
    same arguments and raises the same errors.

    Args:
        probs: non-negative weights with shape `[..., vocab]`.
        logits: unnormalised log-probabilities with shape `[..., vocab]`.
        mask: optional boolean array of shape `input.shape[:-1]`.
        validate_args: whether to check the input's values.

    Returns:
        A 0-d array of the input's backend: float64 (float32 on JAX without x64); NaN when every
        distribution is masked out or there is none.

    Example:
        >>> import numpy as np
        >>> float(perplexity(logits=np.zeros((2, 8), np.float32)))
        8.0
    """
    state = perplexity_state_update(
        None, probs=probs, logits=logits, mask=mask, validate_args=validate_args
    )
    return perplexity_compute(state)


def _select_input(probs: Any, logits: Any) -> tuple[str, Any]:
    if (probs is None) == (logits is None):
        got = "both" if probs is not None else "neither"
        raise ValueError(f"Pass exactly one of `probs` and `logits`; got {got}.")
    return ("probs", probs) if probs is not None else ("logits", logits)


def _check_values(values: Any, kind: str, backend: Any) -> None:
    shape = backend.shape(values)
    if len(shape) == 0:
        raise ValueError(
            f"`{kind}` must have at least one axis (the distribution's); got a 0-d array."
        )
    if shape[-1] == 0:
        raise ValueError(f"`{kind}` must have a last axis of size at least 1; got shape {shape}.")
    if backend.compute_dtype(values.dtype) is None:
        raise TypeError(
            f"`{kind}` must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {values.dtype}."
        )


def _check_mask(mask: Any, values: Any, kind: str, backend: Any) -> Any:
    if mask is None:
        return None
    mask_backend = _backends.backend_for(mask, "mask")
    if mask_backend is not backend:
        raise TypeError(
            f"`mask` is a {mask_backend.NAME} array but `{kind}` is a {backend.NAME} array; "
            f"pass both from one backend."
        )
    if not backend.is_bool(mask):
        raise TypeError(f"`mask` must be boolean; got dtype {mask.dtype}.")
    expected = backend.shape(values)[:-1]
    if backend.shape(mask) != expected:
        raise ValueError(
            f"`mask` must have shape `{kind}.shape[:-1]` = {expected}; got {backend.shape(mask)}."
        )
    return mask
