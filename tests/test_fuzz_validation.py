"""Fuzzing of the input checks: whatever comes in, an update is right or refuses, and loses nothing.

Arrays of every supported dtype on every backend are filled with NaN, infinities, negative values,
zero rows, and huge, tiny and subnormal magnitudes. An oracle written from the documented contract
(not from the kernels) says for each row whether it is valid; then, with `validate_args=True`,
every update must either match the float64 reference (all unmasked rows valid) or raise
`ValueError` / `TypeError` naming the argument (some unmasked row invalid), and after an error the
state passed in must be bit for bit what it was. A NaN must never reach `compute` while validation
is on, and with validation off an invalid row must show as NaN, never as a plausible number.

Two documented edges enter the oracle. A probs row whose exact sum lies within a relative 1e-5 of
the largest finite number of the compute dtype may or may not overflow there, so either outcome is
accepted. XLA on CPU treats subnormal numbers as zero (it flushes them on input), so on JAX the
oracle and the reference see the input with every subnormal of the compute dtype set to zero.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ppl
from tests._reliability import (
    BACKENDS,
    assert_same_snapshot,
    compute_dtype,
    dtypes_of,
    exact_count,
    hypothesis_settings,
    import_backend,
    snapshot,
    to_backend,
)
from tests.reference import reference_row_perplexities, to_numpy

CASES = [
    pytest.param((backend, dtype), id=f"{backend}-{dtype}")
    for backend in BACKENDS
    for dtype in ("float16", "bfloat16", "float32", "float64")
]

LEADING_SHAPES = ((), (0,), (1,), (3,), (2, 2))
VOCABS = (1, 2, 5)
SPECIAL_VALUES = (
    math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 0.5, -1.0, -1e-40, -5e-324,
    5e-324, 1e-310, 1e-300, 1e-45, 1e-40, 3e-39, 1.17e-38, 6e-8, 1e-5,
    65504.0, 65520.0, 1e30, 1e38, 3.4e38, 3.5e38, 1e300, 1.7e308,
)  # fmt: skip
MAGNITUDES = (1.0, 1e-3, 1e3, 1e-40, 1e-30, 1e30, 1e38, 1e-300, 1e300)

# Relative tolerance of an update's value against the reference, by compute dtype: the entropy of
# a row of at most 5 entries to a few ulps, relative to a perplexity of at least 1.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
# A probs row whose exact sum is this close to the largest finite number may round either way.
OVERFLOW_BAND = 1e-5


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    backend, dtype = request.param
    import_backend(backend)
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{backend} has no {dtype} here (JAX without x64)")
    return backend, dtype


def flushes_subnormals(backend: str) -> bool:
    return backend == "jax"


def as_computed(values: np.ndarray, backend: str, dtype: str) -> np.ndarray:
    """The float64 values the kernel works on: subnormals of the compute dtype are 0 on XLA."""
    if not flushes_subnormals(backend):
        return values
    tiny = np.finfo(compute_dtype(dtype)).tiny
    return np.where(np.abs(values) < tiny, 0.0, values)


def row_verdicts(values: np.ndarray, kind: str, dtype: str) -> np.ndarray:
    """For rows `[rows, vocab]` of float64: 1 valid, 0 invalid, -1 either, from the contract."""
    if kind == "logits":
        # No NaN, no +inf, and at least one finite entry.
        valid = ~np.isnan(values).any(-1) & ~np.isposinf(values).any(-1)
        valid &= np.isfinite(values).any(-1)
        return valid.astype(int)
    finite = np.isfinite(values).all(-1)
    non_negative = (np.nan_to_num(values, nan=-1.0) >= 0).all(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.where((finite & non_negative)[:, None], values, 0.0).sum(-1)
    largest = float(np.finfo(compute_dtype(dtype)).max)
    verdict = (finite & non_negative & (total > 0) & (total <= largest)).astype(int)
    near_overflow = finite & non_negative & (np.abs(total / largest - 1) <= OVERFLOW_BAND)
    verdict[near_overflow] = -1
    return verdict


def negligibly_negative(values: np.ndarray, kind: str, dtype: str) -> np.ndarray:
    """Probs rows whose only fault is negative entries too small to survive normalisation.

    Unchecked, such an entry divided by the row's sum rounds to -0 and counts as zero: the one
    invalid input that validation off does not turn into NaN (a documented limit).
    """
    if kind == "logits":
        return np.zeros(len(values), bool)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.where(values > 0, values, 0.0).sum(-1)
        smallest = 2 * np.finfo(compute_dtype(dtype)).tiny
        tiny_negative = (values >= 0) | (np.abs(values) < total[:, None] * smallest)
    return np.isfinite(values).all(-1) & tiny_negative.all(-1) & (values < 0).any(-1)


@st.composite
def fuzzed_rows(draw: st.DrawFn, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A float64 input of shape `leading + [vocab]` and an optional mask of shape `leading`."""
    leading = draw(st.sampled_from(LEADING_SHAPES))
    vocab = draw(st.sampled_from(VOCABS))
    num_rows = math.prod(leading)
    wild = st.one_of(
        st.sampled_from(SPECIAL_VALUES),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(-100.0, 100.0),
    )
    clean = st.floats(0.0, 10.0) if kind == "probs" else st.floats(-50.0, 50.0)
    rows = []
    for _ in range(num_rows):
        mode = draw(st.sampled_from(["clean", "clean", "wild", "zeros", "special"]))
        if mode == "zeros":
            row = np.zeros(vocab)
        elif mode == "special":
            row = np.full(vocab, draw(st.sampled_from(SPECIAL_VALUES)))
        else:
            row = draw(
                hnp.arrays(np.float64, (vocab,), elements=clean if mode == "clean" else wild)
            )
        with np.errstate(over="ignore", invalid="ignore"):
            rows.append(row * draw(st.sampled_from(MAGNITUDES)))
    values = np.array(rows).reshape((*leading, vocab))
    mask = None
    if draw(st.booleans()):
        mask = np.array(
            draw(st.lists(st.booleans(), min_size=num_rows, max_size=num_rows)), dtype=bool
        )
        mask = mask.reshape(leading)
    return values, mask


PRIOR_PROBS = np.array([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])


def prior_state(backend: str, dtype: str = "float32", use_prior: bool = True):
    """None, or a state that already holds two rows (so that 'unchanged' means something)."""
    if not use_prior:
        return None
    return ppl.perplexity_state_update(None, probs=to_backend(PRIOR_PROBS, backend, dtype))


def prior_rows() -> np.ndarray:
    # Every entry of PRIOR_PROBS is exact in every dtype.
    return reference_row_perplexities(probs=PRIOR_PROBS)


def check_one_update(state, backend: str, dtype: str, kind: str, values, mask):
    """Runs one validated update and checks it against the oracle; returns the state after it.

    Returns `(new_state, accepted_row_perplexities)`, with the old state and an empty array when
    the update raised.
    """
    array = to_backend(values, backend, dtype)
    held = as_computed(to_numpy(array), backend, dtype)
    vocab = held.shape[-1]
    flat = held.reshape(-1, vocab)
    flat_mask = np.ones(len(flat), bool) if mask is None else np.asarray(mask).reshape(-1)
    verdicts = row_verdicts(flat, kind, dtype)[flat_mask]
    before = None if state is None else snapshot(state)

    backend_mask = None if mask is None else to_backend(np.asarray(mask), backend)
    try:
        new_state = ppl.perplexity_state_update(state, **{kind: array}, mask=backend_mask)
    except (ValueError, TypeError) as error:
        assert (verdicts != 1).any(), (
            f"a valid input was refused: {error}\n{kind}={flat[flat_mask]!r}"
        )
        assert f"`{kind}`" in str(error), f"the message does not name `{kind}`: {error}"
        if state is not None:
            assert_same_snapshot(before, snapshot(state))
        # Unchecked, the same input must give NaN: an invalid row never becomes a plausible value.
        unchecked = ppl.perplexity_state_update(
            state, **{kind: array}, mask=backend_mask, validate_args=False
        )
        unchecked_value = float(to_numpy(ppl.perplexity_compute(unchecked)))
        negligible = negligibly_negative(flat[flat_mask], kind, dtype)
        assert math.isnan(unchecked_value) or (negligible | (verdicts != 0)).all(), (
            f"with validation off an invalid input gave {unchecked_value}:\n"
            f"{kind}={flat[flat_mask]!r}"
        )
        return state, np.zeros(0)

    assert (verdicts != 0).all(), f"an invalid input was accepted:\n{kind}={flat[flat_mask]!r}"
    if state is not None:
        # The update returns a new state; the one passed in is left as it was.
        assert_same_snapshot(before, snapshot(state))
    with np.errstate(all="ignore"):
        accepted = reference_row_perplexities(**{kind: flat[flat_mask]})
    return new_state, accepted


def assert_state_value(state, rows: np.ndarray, dtype: str) -> None:
    """The state counts `rows` exactly and its value is their reference mean (NaN when none)."""
    assert exact_count(state) == len(rows)
    value = float(to_numpy(ppl.perplexity_compute(state)))
    if len(rows) == 0:
        assert math.isnan(value)
        return
    assert math.isfinite(value), f"a non-finite value {value} reached compute"
    expected = math.fsum(rows) / len(rows)
    assert math.isclose(value, expected, rel_tol=RTOL[compute_dtype(dtype)]), (
        value,
        expected,
        value / expected - 1,
    )


kinds = st.sampled_from(["probs", "logits"])


@hypothesis_settings(max_examples=60)
@given(data=st.data(), kind=kinds, use_prior=st.booleans())
def test_an_update_matches_the_reference_or_raises_naming_the_argument(case, data, kind, use_prior):
    backend, dtype = case
    values, mask = data.draw(fuzzed_rows(kind))
    state = prior_state(backend, dtype, use_prior)
    new_state, accepted = check_one_update(state, backend, dtype, kind, values, mask)
    known = prior_rows() if use_prior else np.zeros(0)
    if new_state is not None:
        assert_state_value(new_state, np.concatenate([known, accepted]), dtype)


@hypothesis_settings(max_examples=25)
@given(data=st.data(), kinds_seq=st.lists(kinds, min_size=2, max_size=5))
def test_a_nan_never_reaches_compute_while_validation_is_on(case, data, kinds_seq):
    backend, dtype = case
    # A stream of updates, some of them refused: the state ends with exactly the accepted rows.
    state = None
    accepted = [np.zeros(0)]
    for kind in kinds_seq:
        values, mask = data.draw(fuzzed_rows(kind))
        state, rows = check_one_update(state, backend, dtype, kind, values, mask)
        accepted.append(rows)
    if state is not None:
        assert np.isfinite(snapshot(state)[0]), "the sum of the state is not finite"
        assert_state_value(state, np.concatenate(accepted), dtype)


INVALID_ROWS = {
    "probs": {
        "NaN": [0.5, math.nan, 0.5],
        "+inf": [0.5, math.inf, 0.5],
        "-inf": [0.5, -math.inf, 0.5],
        "negative": [0.5, -0.25, 0.75],
        "zero row": [0.0, 0.0, 0.0],
    },
    "logits": {
        "NaN": [0.0, math.nan, 1.0],
        "+inf": [0.0, math.inf, 1.0],
        "only -inf": [-math.inf, -math.inf, -math.inf],
    },
}
INVALID_CASES = [
    pytest.param(kind, name, id=f"{kind}-{name}")
    for kind, rows in INVALID_ROWS.items()
    for name in rows
]


@pytest.mark.parametrize(("kind", "name"), INVALID_CASES)
def test_an_invalid_row_is_refused_with_its_index_and_shows_as_nan_without_validation(
    case, kind, name
):
    backend, dtype = case
    values = np.array([[0.25, 0.25, 0.5], INVALID_ROWS[kind][name], [0.5, 0.5, 0.0]])
    if kind == "logits":
        with np.errstate(divide="ignore"):
            values[[0, 2]] = np.log(values[[0, 2]])
    array = to_backend(values, backend, dtype)
    state = prior_state(backend, dtype)
    before = snapshot(state)

    with pytest.raises(ValueError, match=rf"`{kind}`.* at index \(1,"):
        ppl.perplexity_state_update(state, **{kind: array})
    assert_same_snapshot(before, snapshot(state))

    # Turned off, validation lets the row through, and its NaN shows in the value.
    unchecked = ppl.perplexity_state_update(state, **{kind: array}, validate_args=False)
    assert math.isnan(float(to_numpy(ppl.perplexity_compute(unchecked))))
    # Masked out, the row is neither validated nor counted.
    mask = to_backend(np.array([True, False, True]), backend)
    masked = ppl.perplexity_state_update(state, **{kind: array}, mask=mask)
    assert exact_count(masked) == 4
    assert math.isfinite(float(to_numpy(ppl.perplexity_compute(masked))))


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_invalid_values_under_jax_jit_show_as_nan(kind):
    # Value checks cannot run on traced arrays; the NaN must still reach the value, not vanish.
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    values = jnp.asarray([[0.5, 0.5], [math.nan, 0.5]], jnp.float32)

    @jax.jit
    def value(values):
        return ppl.perplexity_compute(ppl.perplexity_state_update(None, **{kind: values}))

    assert math.isnan(float(value(values)))


NON_FLOAT_DTYPES = {
    "numpy": ("bool", "int8", "uint8", "int32", "int64", "complex64", "complex128"),
    "torch": ("bool", "int8", "uint8", "int32", "int64", "complex64"),
    "jax": ("bool", "int8", "uint8", "int32", "complex64"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_non_floating_inputs_raise_type_error(backend, kind):
    framework = import_backend(backend)
    state = prior_state(backend)
    before = snapshot(state)
    for dtype in NON_FLOAT_DTYPES[backend]:
        ones = np.ones((2, 3))
        if backend == "torch":
            array = framework.ones((2, 3), dtype=getattr(framework, dtype))
        else:
            array = framework.asarray(ones.astype(dtype))
        with pytest.raises(TypeError, match=rf"`{kind}` must have a floating dtype"):
            ppl.perplexity_state_update(state, **{kind: array})
        with pytest.raises(TypeError, match=rf"`{kind}`"):
            ppl.perplexity(**{kind: array})
        assert_same_snapshot(before, snapshot(state))


def other_backend_array(backend: str, values: np.ndarray):
    """`values` as an array of a backend other than `backend` (NumPy unless `backend` is)."""
    return to_backend(values, "torch" if backend == "numpy" else "numpy")


def integer_array(backend: str, shape: tuple[int, ...]):
    if backend == "torch":
        torch = import_backend("torch")
        return torch.ones(shape, dtype=torch.int64)
    return import_backend(backend).ones(shape, dtype=np.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_masks_are_refused_naming_the_mask(backend):
    import_backend(backend)
    import_backend("torch")
    probs = to_backend(np.full((2, 3), 1 / 3), backend, "float32")
    state = prior_state(backend)
    before = snapshot(state)
    bad_masks = [
        (TypeError, to_backend(np.ones(2), backend, "float32")),
        (TypeError, integer_array(backend, (2,))),
        (TypeError, other_backend_array(backend, np.ones(2, bool))),
        (ValueError, to_backend(np.ones(3, bool), backend)),
        (ValueError, to_backend(np.ones((2, 3), bool), backend)),
        (ValueError, to_backend(np.ones((), bool), backend)),
    ]
    for error, mask in bad_masks:
        with pytest.raises(error, match=r"`mask`"):
            ppl.perplexity_state_update(state, probs=probs, mask=mask)
        assert_same_snapshot(before, snapshot(state))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", BACKENDS)
def test_states_and_inputs_of_different_backends_are_refused(backend, other):
    if backend == other:
        pytest.skip("same backend")
    import_backend(backend)
    import_backend(other)
    probs = np.full((2, 3), 1 / 3)
    state = prior_state(backend)
    other_state = prior_state(other)
    before = snapshot(state)

    with pytest.raises(TypeError, match=r"`state` holds .* `probs` is"):
        ppl.perplexity_state_update(state, probs=to_backend(probs, other, "float32"))
    with pytest.raises(TypeError, match=r"states\[1\]"):
        ppl.perplexity_state_merge(state, other_state)
    assert_same_snapshot(before, snapshot(state))


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_calls_are_refused_naming_the_argument(backend):
    import_backend(backend)
    probs = to_backend(np.full((2, 3), 1 / 3), backend, "float32")
    state = prior_state(backend)
    before = snapshot(state)
    calls = [
        (ValueError, "probs.*logits", dict(probs=probs, logits=probs)),
        (ValueError, "probs.*logits", dict()),
        (TypeError, "`probs`", dict(probs=[[0.5, 0.5]])),
        (ValueError, "`logits`", dict(logits=to_backend(np.zeros(()), backend, "float32"))),
        (ValueError, "`probs`", dict(probs=to_backend(np.zeros((2, 0)), backend, "float32"))),
    ]
    for error, pattern, kwargs in calls:
        with pytest.raises(error, match=pattern):
            ppl.perplexity_state_update(state, **kwargs)
        assert_same_snapshot(before, snapshot(state))
    for not_a_state in (tuple(state), list(state), snapshot(state)[0]):
        with pytest.raises(TypeError, match="`state`"):
            ppl.perplexity_state_update(not_a_state, probs=probs)
        with pytest.raises(TypeError, match="`state`"):
            ppl.perplexity_compute(not_a_state)
    with pytest.raises(ValueError, match="at least one state"):
        ppl.perplexity_state_merge()
