"""Long runs: a million updates stay within 1e-6 of the float64 reference, and counts stay exact.

The stream is the same on every backend: float32 logits, `UPDATE_ROWS` rows of `VOCAB` a step,
and a random mask, so that each step adds between 0 and `UPDATE_ROWS` distributions. NumPy and
torch are driven by a Python loop (the full million under `-m slow`, a reduced stream by default);
JAX without x64, whose sum is a compensated float32 pair, runs the full million inside
`jax.lax.scan` under `jax.jit` in the default run, and JAX with x64 (process-wide, so in a
subprocess) does the same.

Counts past 2**31 and 2**32 are checked on states built by hand near those boundaries: a real run
would need billions of updates.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ppl
from tests._reliability import exact_count, import_backend, snapshot, to_backend
from tests.reference import reference_row_perplexities, to_numpy

FULL_UPDATES = 1_000_000
UPDATE_ROWS = 2
VOCAB = 5
RTOL = 1e-6
REPO_ROOT = Path(__file__).resolve().parents[1]


def stream(num_updates: int, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits `[updates, UPDATE_ROWS, VOCAB]` and a mask `[updates, UPDATE_ROWS]`."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_updates, UPDATE_ROWS, VOCAB)) * 3).astype(np.float32)
    mask = rng.random((num_updates, UPDATE_ROWS)) < 0.8
    return logits, mask


def reference_of(logits: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """The float64 mean perplexity of the unmasked rows, and their number."""
    kept = []
    for start in range(0, len(logits), 100_000):
        rows = reference_row_perplexities(logits=logits[start : start + 100_000])
        kept.append(rows[mask[start : start + 100_000]])
    kept_rows = np.concatenate(kept)
    return math.fsum(kept_rows) / len(kept_rows), len(kept_rows)


def assert_within_reference(state, logits: np.ndarray, mask: np.ndarray) -> None:
    expected, count = reference_of(logits, mask)
    assert exact_count(state) == count
    value = float(to_numpy(ppl.perplexity_compute(state)))
    assert abs(value / expected - 1) <= RTOL, f"{value!r} vs {expected!r}: {value / expected - 1}"


def run_loop(backend: str, num_updates: int):
    import_backend(backend)
    logits, mask = stream(num_updates)
    backend_logits = to_backend(logits, backend)
    backend_mask = to_backend(mask, backend)
    state = ppl.perplexity_state_init(backend)
    for step in range(num_updates):
        state = ppl.perplexity_state_update(
            state, logits=backend_logits[step], mask=backend_mask[step]
        )
    assert_within_reference(state, logits, mask)


@pytest.mark.parametrize(("backend", "num_updates"), [("numpy", 50_000), ("torch", 10_000)])
def test_a_long_stream_of_updates_stays_within_1e6_of_the_reference(backend, num_updates):
    run_loop(backend, num_updates)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_million_updates_stay_within_1e6_of_the_reference(backend):
    run_loop(backend, FULL_UPDATES)


def scan_updates(logits, mask):
    """A million updates of a JAX state inside one jitted `lax.scan`."""
    import jax

    @jax.jit
    def run(logits, mask):
        def step(state, batch):
            return ppl.perplexity_state_update(state, logits=batch[0], mask=batch[1]), None

        state, _ = jax.lax.scan(step, ppl.perplexity_state_init("jax"), (logits, mask))
        return state

    return run(logits, mask)


def test_a_million_jax_updates_without_x64_stay_within_1e6_of_the_reference():
    import_backend("jax")
    from tests._reliability import jax_x64

    if jax_x64():
        pytest.skip("this process runs JAX with x64; the x64 run is the subprocess test")
    logits, mask = stream(FULL_UPDATES)
    state = scan_updates(to_backend(logits, "jax"), to_backend(mask, "jax"))
    assert state.perplexities_sum.dtype == np.float32
    assert_within_reference(state, logits, mask)

    # The bound is sharp enough to catch an uncompensated float32 sum of the same step sums: a
    # plain running float32 total of these million terms is off by far more than 1e-6.
    step_sums = np.where(mask, reference_row_perplexities(logits=logits), 0.0).sum(axis=1)
    naive_total = np.cumsum(step_sums.astype(np.float32), dtype=np.float32)[-1]
    expected, count = reference_of(logits, mask)
    assert abs(float(naive_total) / count / expected - 1) > 10 * RTOL


X64_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    assert jax.config.jax_enable_x64
    from tests.test_long_runs import FULL_UPDATES, assert_within_reference, scan_updates, stream
    from tests._reliability import to_backend
    logits, mask = stream(FULL_UPDATES)
    state = scan_updates(to_backend(logits, "jax"), to_backend(mask, "jax"))
    assert state.perplexities_sum.dtype == np.float64, state.perplexities_sum.dtype
    assert state.num_distributions.dtype == np.int64, state.num_distributions.dtype
    assert_within_reference(state, logits, mask)
    from tests.test_long_runs import check_counts_past_the_boundaries
    check_counts_past_the_boundaries("jax")
    print("x64 ok")
    """
)


def test_a_million_jax_updates_with_x64_stay_within_1e6_of_the_reference():
    # x64 is a process-wide switch, so the x64 run gets a process of its own.
    pytest.importorskip("jax")
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", X64_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "x64 ok" in result.stdout


def hand_made_state(backend: str, count: int, mean: float = 3.0):
    """A state of `count` distributions of perplexity `mean`, with the backend's count words."""
    empty = ppl.perplexity_state_init(backend)
    fields = snapshot(empty)
    sum_dtype, count_dtype = fields[0].dtype, fields[1].dtype
    words = 2**32 if count_dtype == np.uint32 else 2**63
    values = [
        np.asarray(count * mean, sum_dtype),
        np.asarray(count % words, count_dtype),
        np.asarray(0.0, sum_dtype),
        np.asarray(count // words, count_dtype),
    ]
    if backend == "numpy":
        return ppl.PerplexityState(*values)
    return ppl.PerplexityState(*(to_backend(v, backend) for v in values))


BOUNDARIES = (2**31, 2**32, 2**33 + 2**32)


def check_counts_past_the_boundaries(backend: str) -> None:
    """Updates and merges across 2**31 and 2**32 keep the count exact and the mean right."""
    uniform = to_backend(np.zeros((5, 4)), backend, "float32")  # 5 rows of perplexity 4
    mask = to_backend(np.array([True, False, True, True, False]), backend)
    for boundary in BOUNDARIES:
        for below in (1, 2, 4):
            start = boundary - below
            state = hand_made_state(backend, start)
            assert exact_count(state) == start

            updated = ppl.perplexity_state_update(state, logits=uniform)
            assert exact_count(updated) == start + 5
            masked = ppl.perplexity_state_update(state, logits=uniform, mask=mask)
            assert exact_count(masked) == start + 3
            merged = ppl.perplexity_state_merge(state, hand_made_state(backend, below + 7))
            assert exact_count(merged) == boundary + 7
            halves = ppl.perplexity_state_merge(
                hand_made_state(backend, start // 2), hand_made_state(backend, start - start // 2)
            )
            assert exact_count(halves) == start

            expected = (start * 3.0 + 5 * 4.0) / (start + 5)
            value = float(to_numpy(ppl.perplexity_compute(updated)))
            assert math.isclose(value, expected, rel_tol=RTOL), (boundary, below, value)
            assert math.isclose(
                float(to_numpy(ppl.perplexity_compute(merged))), 3.0, rel_tol=RTOL
            ), (boundary, below)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_counts_past_2_to_the_31_and_32_stay_exact(backend):
    import_backend(backend)
    check_counts_past_the_boundaries(backend)


def test_jax_counts_past_the_low_word_stay_exact_under_jit():
    jax = pytest.importorskip("jax")
    state = hand_made_state("jax", 2**32 - 2)
    uniform = to_backend(np.zeros((5, 4)), "jax", "float32")
    mask = to_backend(np.array([True, False, True, True, False]), "jax")

    @jax.jit
    def step(state, logits, mask):
        state = ppl.perplexity_state_update(state, logits=logits)
        state = ppl.perplexity_state_update(state, logits=logits, mask=mask)
        return ppl.perplexity_state_merge(state, state)

    assert exact_count(step(state, uniform, mask)) == 2 * (2**32 - 2 + 8)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_one_update_of_more_than_2_to_the_31_rows_counts_them_exactly(backend):
    # A broadcast view: 2**31 + 3 rows that take no memory, each a uniform distribution over 2.
    framework = import_backend(backend)
    num_rows = 2**31 + 3
    if backend == "numpy":
        logits = np.broadcast_to(np.zeros((1, 2), np.float32), (num_rows, 2))
    else:
        logits = framework.zeros((1, 2), dtype=framework.float32).expand(num_rows, 2)
    state = ppl.perplexity_state_update(None, logits=logits, validate_args=False)
    assert exact_count(state) == num_rows
    assert float(to_numpy(ppl.perplexity_compute(state))) == pytest.approx(2.0, rel=RTOL)
