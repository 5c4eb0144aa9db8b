"""Property tests of the functional core on every backend, against the float64 NumPy reference.

Each property is one a correct perplexity metric must have whatever the data: any split into
batches, in any order, merged in any tree, gives the value of all rows at once; a masked row counts
for nothing, whatever it holds; a row's value does not depend on the rows beside it, nor on where
the kernel's blocks fall; every value lies in `[1, V]`; probs and the logits `log(probs)` agree.
Kernel block sizes are shrunk in some examples so that rows land on block boundaries.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ppl
from tests._reliability import (
    BACKENDS,
    block_bytes,
    compute_dtype,
    exact_count,
    hypothesis_settings,
    import_backend,
    jax_x64,
    to_backend,
)
from tests.reference import reference_perplexity, reference_row_perplexities, to_numpy

VOCABS = (1, 3, 8)
MAX_ROWS = 8
# Block sizes in bytes to run the kernels with: the default, one row a block, a few rows a block.
BLOCK_CHOICES = (None, 1, 48)


def property_dtypes(backend: str) -> tuple[str, ...]:
    if backend == "jax":
        import_backend("jax")
        return ("float32", "float64") if jax_x64() else ("float32",)
    return ("float32", "float64")


CASES = [
    pytest.param((backend, dtype), id=f"{backend}-{dtype}")
    for backend in BACKENDS
    for dtype in ("float32", "float64")
]


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    backend, dtype = request.param
    import_backend(backend)
    if dtype not in property_dtypes(backend):
        pytest.skip(f"{backend} has no {dtype} here (JAX without x64)")
    return backend, dtype


def rtol_for(dtype: str) -> float:
    # float32 kernels: a few ulps of the entropy of a row of at most 8 entries, relative to a
    # value of at least 1. float64 kernels: the same in float64.
    return 2e-6 if compute_dtype(dtype) == np.float32 else 1e-12


def assert_close(value: object, expected: float, dtype: str, what: str) -> None:
    got = float(to_numpy(value))
    assert math.isclose(got, expected, rel_tol=rtol_for(dtype), abs_tol=0.0), (
        f"{what}: got {got!r}, reference {expected!r}, relative error {got / expected - 1:.3g}"
    )


@st.composite
def distributions(draw: st.DrawFn, kind: str, num_rows: int | None = None) -> np.ndarray:
    """Float64 rows of valid `probs` or `logits` of shape `[num_rows, V]`, with zeros / -inf."""
    vocab = draw(st.sampled_from(VOCABS))
    if num_rows is None:
        num_rows = draw(st.integers(1, MAX_ROWS))
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))
    if kind == "logits":
        finite = st.floats(-30.0, 30.0, allow_subnormal=False)
        elements = st.one_of(finite, finite, finite, st.just(-math.inf))
        rows = draw(hnp.arrays(np.float64, (num_rows, vocab), elements=elements))
        rows = rows * scale
        # A row needs a finite entry: its first one, where the draw gave only -inf.
        all_neg_inf = np.all(np.isneginf(rows), axis=-1)
        rows[all_neg_inf, 0] = 0.0
    else:
        positive = st.floats(1e-3, 10.0)
        elements = st.one_of(positive, positive, st.just(0.0))
        rows = draw(hnp.arrays(np.float64, (num_rows, vocab), elements=elements))
        rows = rows * scale
        all_zero = rows.sum(axis=-1) == 0
        rows[all_zero, 0] = 1.0
    return rows


def update(state, backend: str, dtype: str, kind: str, rows: np.ndarray, mask=None):
    values = to_backend(rows, backend, dtype)
    backend_mask = None if mask is None else to_backend(mask, backend)
    return ppl.perplexity_state_update(state, **{kind: values}, mask=backend_mask)


def backend_rows(rows: np.ndarray, backend: str, dtype: str) -> np.ndarray:
    """The float64 values the backend actually holds for `rows` after the cast to `dtype`."""
    return to_numpy(to_backend(rows, backend, dtype))


kinds = st.sampled_from(["probs", "logits"])


@hypothesis_settings(max_examples=25)
@given(data=st.data(), kind=kinds, block=st.sampled_from(BLOCK_CHOICES))
def test_any_batches_in_any_order_with_any_merges_give_the_reference(case, data, kind, block):
    backend, dtype = case
    rows = data.draw(distributions(kind, num_rows=data.draw(st.integers(1, 2 * MAX_ROWS))))
    num_rows = rows.shape[0]
    order = np.array(data.draw(st.permutations(range(num_rows))))
    cuts = (
        sorted(data.draw(st.sets(st.integers(1, num_rows - 1), max_size=5))) if num_rows > 1 else []
    )
    bounds = [0, *cuts, num_rows]
    batches = [rows[order[a:b]] for a, b in itertools.pairwise(bounds)]

    with block_bytes(backend, block):
        # Each batch either extends the latest state or starts a state of its own; empty states
        # are mixed in; then the states are merged, a random group at a time, in random order.
        states = []
        for batch in batches:
            if len(batch) % 2 == 0 and data.draw(st.booleans()):
                batch = batch.reshape(2, len(batch) // 2, -1)
            if states and data.draw(st.booleans()):
                states[-1] = update(states[-1], backend, dtype, kind, batch)
            else:
                states.append(update(None, backend, dtype, kind, batch))
            if data.draw(st.booleans()):
                states.append(ppl.perplexity_state_init(backend))
        while len(states) > 1:
            group = data.draw(st.integers(2, len(states)))
            picked = data.draw(st.permutations(range(len(states))))[:group]
            merged = ppl.perplexity_state_merge(*(states[i] for i in picked))
            states = [s for i, s in enumerate(states) if i not in picked] + [merged]

    final = states[0]
    assert exact_count(final) == num_rows
    expected = reference_perplexity(**{kind: backend_rows(rows, backend, dtype)})
    assert_close(ppl.perplexity_compute(final), expected, dtype, "batched and merged")


@hypothesis_settings(max_examples=25)
@given(data=st.data(), kind=kinds, block=st.sampled_from(BLOCK_CHOICES))
def test_a_masked_row_counts_as_if_dropped_whatever_it_holds(case, data, kind, block):
    backend, dtype = case
    rows = data.draw(distributions(kind))
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))))
    # What a masked row holds must not matter: not even values that are invalid.
    garbage = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0]))
    filled = rows.copy()
    filled[~mask] = garbage

    with block_bytes(backend, block):
        masked = update(None, backend, dtype, kind, filled, mask=mask)
        dropped = update(None, backend, dtype, kind, rows[mask]) if mask.any() else None

    assert exact_count(masked) == int(mask.sum())
    value = ppl.perplexity_compute(masked)
    if not mask.any():
        assert math.isnan(float(to_numpy(value)))
        return
    kept = backend_rows(rows, backend, dtype)
    expected = reference_perplexity(**{kind: kept}, mask=mask)
    assert_close(value, expected, dtype, "masked")
    assert_close(
        ppl.perplexity_compute(dropped), float(to_numpy(value)), dtype, "dropped vs masked"
    )


@hypothesis_settings(max_examples=20)
@given(data=st.data(), kind=kinds, block=st.sampled_from(BLOCK_CHOICES))
def test_a_rows_value_does_not_depend_on_the_other_rows(case, data, kind, block):
    backend, dtype = case
    rows = data.draw(distributions(kind))
    held = backend_rows(rows, backend, dtype)
    reference_rows = reference_row_perplexities(**{kind: held})

    with block_bytes(backend, block):
        whole = update(None, backend, dtype, kind, rows)
        for index in range(len(rows)):
            alone = update(None, backend, dtype, kind, rows[index : index + 1])
            one_hot = np.arange(len(rows)) == index
            among_others = update(None, backend, dtype, kind, rows, mask=one_hot)
            expected = float(reference_rows[index])
            assert_close(ppl.perplexity_compute(alone), expected, dtype, f"row {index} alone")
            assert_close(
                ppl.perplexity_compute(among_others), expected, dtype, f"row {index} among others"
            )
    # Adding the other rows adds exactly their values: the batch's sum is the sum of the rows'.
    total = float(to_numpy(whole.perplexities_sum)) + float(to_numpy(whole.perplexities_sum_error))
    assert math.isclose(total, math.fsum(reference_rows), rel_tol=rtol_for(dtype))


@st.composite
def extreme_distributions(draw: st.DrawFn, kind: str) -> np.ndarray:
    """Valid rows at the edges: one-hot, uniform, huge spreads of logits, tiny probabilities."""
    shape_of_row = draw(st.sampled_from(["one_hot", "uniform", "spread", "random"]))
    if shape_of_row == "random":
        return draw(distributions(kind, num_rows=1))
    vocab = draw(st.sampled_from(VOCABS))
    if kind == "logits":
        if shape_of_row == "one_hot":
            row = np.full(vocab, -math.inf)
        elif shape_of_row == "uniform":
            row = np.full(vocab, draw(st.floats(-1e4, 1e4)))
        else:
            row = np.array(draw(st.lists(st.floats(-1e30, 1e30), min_size=vocab, max_size=vocab)))
        row[0] = max(row[0], -1e30) if np.isfinite(row[0]) else 0.0
    else:
        if shape_of_row == "one_hot":
            row = np.zeros(vocab)
        elif shape_of_row == "uniform":
            row = np.full(vocab, draw(st.floats(1e-30, 1e30)))
        else:
            row = np.array(draw(st.lists(st.floats(0.0, 1e30), min_size=vocab, max_size=vocab)))
        row[0] = max(row[0], 1e-30)
    return row[None, :]


@hypothesis_settings(max_examples=40)
@given(data=st.data(), kind=kinds)
def test_every_value_lies_between_one_and_the_vocabulary_size(case, data, kind):
    backend, dtype = case
    row = data.draw(extreme_distributions(kind))
    vocab = row.shape[-1]
    value = float(to_numpy(ppl.perplexity(**{kind: to_backend(row, backend, dtype)})))
    slack = rtol_for(dtype) * vocab
    assert 1.0 - slack <= value <= vocab * (1.0 + slack), f"perplexity {value} of V={vocab} row"
    expected = reference_perplexity(**{kind: backend_rows(row, backend, dtype)})
    assert_close(value, expected, dtype, "extreme row")


@pytest.mark.parametrize("vocab", VOCABS)
def test_uniform_rows_give_the_vocabulary_size_and_one_hot_rows_give_one(case, vocab):
    backend, dtype = case
    uniform = np.zeros((3, vocab))
    one_hot = np.full((3, vocab), -math.inf)
    one_hot[:, 0] = 0.0
    assert_close(
        ppl.perplexity(logits=to_backend(uniform, backend, dtype)), vocab, dtype, "uniform"
    )
    assert_close(ppl.perplexity(logits=to_backend(one_hot, backend, dtype)), 1.0, dtype, "one-hot")
    assert_close(ppl.perplexity(probs=to_backend(np.exp(one_hot), backend, dtype)), 1.0, dtype, "p")


@hypothesis_settings(max_examples=25)
@given(data=st.data(), block=st.sampled_from(BLOCK_CHOICES))
def test_probs_and_their_logarithm_as_logits_agree(case, data, block):
    backend, dtype = case
    probs = data.draw(distributions("probs"))
    # The cast is applied first, so that both inputs describe the same distributions exactly.
    probs = backend_rows(probs, backend, dtype)
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    scale = 2.0 ** data.draw(st.integers(-20, 20))
    shift = data.draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))

    with block_bytes(backend, block):
        from_probs = ppl.perplexity(probs=to_backend(probs, backend, dtype))
        from_logits = ppl.perplexity(logits=to_backend(logits, backend, dtype))
        # Scaling probs by a power of two is exact; normalisation must undo it.
        scaled = ppl.perplexity(probs=to_backend(probs * scale, backend, dtype))
        # Shifting logits is not exact in floating point, so it agrees only within tolerance.
        shifted = ppl.perplexity(logits=to_backend(logits + shift, backend, dtype))

    expected = reference_perplexity(probs=probs)
    assert_close(from_probs, expected, dtype, "probs")
    # log() of a value rounded to float32 is itself rounded: the logits carry one more rounding.
    assert_close(from_logits, expected, dtype, "logits = log(probs)")
    assert_close(scaled, expected, dtype, f"probs * {scale}")
    shifted_expected = reference_perplexity(logits=backend_rows(logits + shift, backend, dtype))
    assert_close(shifted, shifted_expected, dtype, f"logits + {shift}")
