"""Regression tests for bugs of the functional core that the reliability tests found.

Each test is the smallest input that showed the bug, on every backend where it applies; the
property and fuzz tests that found them keep covering the general case.
"""

from __future__ import annotations

import numpy as np
import pytest

import ppl
from tests._reliability import BACKENDS, exact_count, import_backend, to_backend
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
