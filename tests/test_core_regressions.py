"""Regression tests for bugs of the functional core that the reliability tests found.

Each test is the smallest input that showed the bug, on every backend where it applies; the
property and fuzz tests that found them keep covering the general case.
"""

from __future__ import annotations

import numpy as np
import pytest

import ppl
from tests._reliability import BACKENDS, dtypes_of, exact_count, import_backend, to_backend
from tests.reference import reference_perplexity, to_numpy


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_merged_state_can_be_merged_and_updated_again(backend):
    # NumPy's merge returned NumPy scalars instead of 0-d arrays, which no later call accepted.
    import_backend(backend)
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    one = ppl.perplexity_state_update(None, probs=to_backend(probs, backend, "float32"))
    merged = ppl.perplexity_state_merge(one, one)
    merged_again = ppl.perplexity_state_merge(merged, one)
    updated = ppl.perplexity_state_update(merged, probs=to_backend(probs, backend, "float32"))

    assert exact_count(merged_again) == 6
    assert exact_count(updated) == 6
    expected = reference_perplexity(probs=probs.astype(np.float32))
    for state in (merged, merged_again, updated):
        assert float(to_numpy(ppl.perplexity_compute(state))) == pytest.approx(expected, rel=1e-6)


SUBNORMAL_ROWS = {
    "all subnormal": [[1e-40, 1e-40]],
    "one entry": [[1e-40]],
    "subnormal and zero": [[3e-39, 0.0]],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", SUBNORMAL_ROWS)
def test_probs_rows_of_only_subnormal_values(backend, dtype, name):
    # XLA treats subnormal numbers as zero. JAX raised AssertionError for such a row ("detected
    # but could not be located"), and for a row of one entry returned NaN with validation on.
    # NumPy and torch compute them exactly; JAX must refuse them with a clear ValueError.
    import_backend(backend)
    probs = np.array(SUBNORMAL_ROWS[name])
    array = to_backend(probs, backend, dtype)
    if backend != "jax":
        expected = reference_perplexity(probs=to_numpy(array))
        assert float(to_numpy(ppl.perplexity(probs=array))) == pytest.approx(expected, rel=1e-6)
        return
    with pytest.raises(ValueError, match=r"`probs` .*subnormal.* at index \(0,\)"):
        ppl.perplexity(probs=array)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("probs", [[[1e38, 1e38]], [[1e38, 2e38, 1.0]], [[3e38, 1e37]]])
def test_probs_rows_whose_sum_is_near_the_largest_float32(backend, probs):
    # XLA divides by a row's sum as a multiplication by its reciprocal, which for a sum above
    # 2**126 is subnormal and so zero on XLA: JAX returned 1.0 for every such row, silently.
    import_backend(backend)
    array = to_backend(np.array(probs), backend, "float32")
    expected = reference_perplexity(probs=to_numpy(array))
    assert float(to_numpy(ppl.perplexity(probs=array))) == pytest.approx(expected, rel=1e-6)
    if backend == "jax":
        import jax

        jitted = jax.jit(lambda p: ppl.perplexity(probs=p))
        assert float(jitted(array)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_a_probs_row_whose_sum_overflows_is_nan_without_validation(backend, dtype):
    # Refused with validation; without it (or under jit/compile, where values are not checked)
    # the overflowing sum made every q zero and the row's perplexity 1: a plausible, wrong value.
    import_backend(backend)
    largest = float(np.finfo(np.float64 if dtype == "float64" else np.float32).max)
    probs = np.array([[0.25, 0.75, 0.0], [0.6 * largest, 0.6 * largest, 0.0]])
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{backend} has no {dtype} here (JAX without x64)")
    array = to_backend(probs, backend, dtype)
    with pytest.raises(ValueError, match=r"`probs` .*overflows at index \(1,\)"):
        ppl.perplexity(probs=array)
    unchecked = ppl.perplexity(probs=array, validate_args=False)
    assert np.isnan(float(to_numpy(unchecked)))
    if backend == "jax":
        import jax

        assert np.isnan(float(jax.jit(lambda p: ppl.perplexity(probs=p))(array)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("probs", [[[-1.0]], [[-1.0, -3.0]]])
def test_a_probs_row_of_negative_entries_is_nan_without_validation(backend, probs):
    # Normalised by its negative sum, such a row became a valid-looking distribution: [-1] gave
    # perplexity 1 and [-1, -3] that of [0.25, 0.75] with validation off.
    import_backend(backend)
    array = to_backend(np.array(probs), backend, "float32")
    with pytest.raises(ValueError, match=r"`probs` must be non-negative"):
        ppl.perplexity(probs=array)
    assert np.isnan(float(to_numpy(ppl.perplexity(probs=array, validate_args=False))))
