"""The functional core against float64 NumPy references and torch.distributions.Categorical.

Every case runs in every mode (NumPy; torch eager and compiled; JAX eager and jitted) and, where it
matters, every input dtype. Half-precision inputs are compared with the reference of the rounded
input, so the tolerance measures the library and not the rounding of the data.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import ppl
from ppl.functional import (
    PerplexityState,
    perplexity,
    perplexity_compute,
    perplexity_state_init,
    perplexity_state_merge,
    perplexity_state_update,
)
from tests.backends import DTYPES, MODES, backend_of, convert, run_perplexity
from tests.reference import reference_perplexity, reference_row_perplexities, to_numpy

RTOL = {"float16": 1e-5, "bfloat16": 1e-5, "float32": 1e-5, "float64": 1e-12}
ATOL = 1e-8


def assert_close(actual, expected, dtype="float32"):
    np.testing.assert_allclose(float(actual), expected, rtol=RTOL[dtype], atol=ATOL)


def state_fields(state: PerplexityState) -> list[float]:
    return [float(field) for field in state]


def jax_counts_are_64_bit() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)


# --- The reference's own cases --------------------------------------------------------------------


def nemo_batches(kind: str, seed: int = 0) -> list[np.ndarray]:
    """NeMo's data: 10 batches of 16 x 5, probs or logits in [0, 1), or logits in [-100, 100)."""
    rng = np.random.default_rng(seed)
    batches = [rng.uniform(0.0, 1.0, size=(16, 5)) for _ in range(10)]
    if kind == "wide-logits":
        batches = [200.0 * b - 100.0 for b in batches]
    return [b.astype(np.float32) for b in batches]


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", ["probs", "logits", "wide-logits"])
def test_nemo_cases_accumulate_like_categorical(mode, case):
    kind = "probs" if case == "probs" else "logits"
    batches = nemo_batches(case)
    state = None
    categorical_sum, count = 0.0, 0
    for batch in batches:
        state = perplexity_state_update(state, **{kind: convert(batch, mode)})
        categorical = torch.distributions.Categorical(**{kind: torch.from_numpy(batch).double()})
        categorical_sum += float(categorical.perplexity().sum())
        count += batch.shape[0]

    expected = reference_perplexity(**{kind: np.concatenate(batches)})
    assert_close(perplexity_compute(state), expected)
    assert_close(perplexity_compute(state), categorical_sum / count)
    assert int(state.num_distributions) == 160


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["probs", "logits", "wide-logits"])
def test_nemo_cases_one_shot_in_every_mode(mode, case):
    kind = "probs" if case == "probs" else "logits"
    values = np.concatenate(nemo_batches(case, seed=1))
    expected = reference_perplexity(**{kind: values})
    assert_close(run_perplexity(mode, kind, convert(values, mode)), expected)


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_both_or_neither_input_is_a_value_error(mode):
    values = convert(np.ones((2, 3), np.float32), mode)
    with pytest.raises(ValueError, match="exactly one of `probs` and `logits`; got both"):
        perplexity(probs=values, logits=values)
    with pytest.raises(ValueError, match="exactly one of `probs` and `logits`; got neither"):
        perplexity()
    with pytest.raises(ValueError, match="got neither"):
        perplexity_state_update(None)


# --- Values with a known answer -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_probs_have_perplexity_one(mode, dtype):
    probs = np.eye(7)[[0, 3, 6, 2]]
    assert_close(run_perplexity(mode, "probs", convert(probs, mode, dtype)), 1.0, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 2, 50, 4096])
def test_uniform_rows_have_perplexity_vocab(mode, dtype, vocab):
    # Equal logits of any magnitude and equal unnormalised probs are both uniform.
    logits = np.full((3, vocab), 2.5)
    probs = np.full((3, vocab), 0.25)
    assert_close(run_perplexity(mode, "logits", convert(logits, mode, dtype)), vocab, dtype)
    assert_close(run_perplexity(mode, "probs", convert(probs, mode, dtype)), vocab, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_inputs_match_reference_and_categorical(mode, dtype):
    rng = np.random.default_rng(2)
    logits = convert(rng.normal(scale=3.0, size=(4, 6, 97)), mode, dtype)
    probs = convert(rng.uniform(size=(5, 33)) ** 3, mode, dtype)
    for kind, values in [("logits", logits), ("probs", probs)]:
        exact = to_numpy(values)
        expected = reference_perplexity(**{kind: exact})
        categorical = torch.distributions.Categorical(**{kind: torch.from_numpy(exact)})
        assert_close(run_perplexity(mode, kind, values), expected, dtype)
        assert_close(
            run_perplexity(mode, kind, values), float(categorical.perplexity().mean()), dtype
        )


@pytest.mark.parametrize("mode", MODES)
def test_minus_inf_logits_equal_zero_probs(mode):
    rng = np.random.default_rng(3)
    probs = rng.uniform(size=(6, 40))
    probs[probs < 0.6] = 0.0
    probs[:, 0] = 0.5  # every row keeps some mass
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    assert np.isneginf(logits).any()
    expected = reference_perplexity(probs=probs)
    assert_close(run_perplexity(mode, "logits", convert(logits, mode, "float32")), expected)
    assert_close(run_perplexity(mode, "probs", convert(probs, mode, "float32")), expected)


@pytest.mark.parametrize("mode", MODES)
def test_logits_of_magnitude_1e4_are_stable(mode):
    rng = np.random.default_rng(4)
    logits = rng.uniform(-1e4, 1e4, size=(8, 64))
    logits[:, :3] = 1e4 - rng.uniform(0.0, 2.0, size=(8, 3))  # a few leaders near the top
    values = convert(logits, mode, "float32")
    expected = reference_perplexity(logits=to_numpy(values))
    assert_close(run_perplexity(mode, "logits", values), expected)


@pytest.mark.parametrize("mode", MODES)
def test_leading_axes_are_all_distributions(mode):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 4, 11))
    expected = reference_perplexity(logits=logits)
    assert_close(run_perplexity(mode, "logits", convert(logits, mode, "float32")), expected)
    one_row = logits[0, 0, 0]
    assert_close(
        run_perplexity(mode, "logits", convert(one_row, mode, "float32")),
        reference_perplexity(logits=one_row[None]),
    )


# --- Masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_masked_rows_count_for_nothing_even_when_nan(mode):
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(3, 5, 9))
    mask = rng.uniform(size=(3, 5)) < 0.6
    logits[~mask] = np.nan  # padding that must never be read into the sum
    logits[~mask & (rng.uniform(size=(3, 5)) < 0.5)] = np.inf
    expected = reference_perplexity(logits=logits[mask])
    values = convert(logits, mode, "float32")
    result = run_perplexity(mode, "logits", values, mask=convert(mask, mode))
    assert_close(result, expected)


@pytest.mark.parametrize("mode", MODES)
def test_all_rows_masked_gives_nan(mode):
    probs = convert(np.full((4, 3), np.nan), mode, "float32")
    mask = convert(np.zeros(4, bool), mode)
    assert np.isnan(run_perplexity(mode, "probs", probs, mask=mask))


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_mask_is_checked(mode):
    values = convert(np.ones((4, 3), np.float32), mode)
    with pytest.raises(ValueError, match=r"`mask` must have shape `logits.shape\[:-1\]` = \(4,\)"):
        perplexity(logits=values, mask=convert(np.ones(3, bool), mode))
    with pytest.raises(TypeError, match="`mask` must be boolean; got dtype"):
        perplexity(logits=values, mask=convert(np.ones(4, np.int32), mode))
    other = "numpy" if mode != "numpy" else "torch"
    with pytest.raises(TypeError, match="`mask` is a .* array but `logits` is a"):
        perplexity(logits=values, mask=convert(np.ones(4, bool), other))


# --- Shapes and dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_empty_leading_axis_is_a_no_op(mode):
    state = perplexity_state_update(None, logits=convert(np.ones((3, 4)), mode, "float32"))
    same = perplexity_state_update(state, logits=convert(np.ones((0, 4)), mode, "float32"))
    assert state_fields(same) == state_fields(state)
    empty = perplexity_state_update(None, probs=convert(np.ones((2, 0, 4)), mode, "float32"))
    assert int(empty.num_distributions) == 0
    assert np.isnan(float(perplexity_compute(empty)))


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_bad_shapes_and_dtypes(mode):
    with pytest.raises(ValueError, match="`logits` must have at least one axis"):
        perplexity(logits=convert(np.float32(1.0), mode))
    with pytest.raises(ValueError, match="`probs` must have a last axis of size at least 1"):
        perplexity(probs=convert(np.ones((3, 0), np.float32), mode))
    with pytest.raises(TypeError, match="`logits` must have a floating dtype.*got .*int32"):
        perplexity(logits=convert(np.ones((3, 2), np.int32), mode))
    with pytest.raises(TypeError, match="`probs` must have a floating dtype.*got .*bool"):
        perplexity(probs=convert(np.ones((3, 2), bool), mode))


def test_non_arrays_are_a_type_error():
    with pytest.raises(
        TypeError, match="`probs` must be a numpy.ndarray, torch.Tensor or jax.Array"
    ):
        perplexity(probs=[[0.5, 0.5]])
    with pytest.raises(TypeError, match="`state` must be a PerplexityState"):
        perplexity_state_update((0.0, 0), probs=np.ones((1, 2)))
    with pytest.raises(ValueError, match="`like` must be one of"):
        perplexity_state_init("tensorflow")


@pytest.mark.parametrize(
    "state_mode, input_mode", [("numpy", "torch"), ("torch", "jax"), ("jax", "numpy")]
)
def test_state_and_input_of_different_backends(state_mode, input_mode):
    state = perplexity_state_init(state_mode)
    values = convert(np.ones((2, 3), np.float32), input_mode)
    with pytest.raises(TypeError, match=f"`state` holds {state_mode} arrays but `logits` is a"):
        perplexity_state_update(state, logits=values)
    with pytest.raises(TypeError, match="needs states of one backend"):
        perplexity_state_merge(state, perplexity_state_init(input_mode))


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_state_dtypes(mode):
    values = convert(np.ones((2, 3)), mode, "float16")
    state = perplexity_state_update(None, logits=values)
    assert isinstance(state, PerplexityState)
    result = perplexity_compute(state)
    if mode == "jax" and not jax_counts_are_64_bit():
        expected_sum, expected_count = "float32", "uint32"
    else:
        expected_sum, expected_count = "float64", "int64"
    assert str(state.perplexities_sum.dtype).endswith(expected_sum)
    assert str(state.num_distributions.dtype).endswith(expected_count)
    assert str(result.dtype).endswith(expected_sum)
    assert tuple(result.shape) == ()
    if mode == "jax":
        import jax

        assert isinstance(result, jax.Array)
    else:
        assert isinstance(result, np.ndarray if mode == "numpy" else torch.Tensor)


def test_torch_state_follows_the_input_device():
    values = torch.ones(2, 3, device="meta")
    state = perplexity_state_init(values)
    assert state.perplexities_sum.device.type == "meta"
    with pytest.raises(ValueError, match="`state` lives on cpu but `logits` on meta"):
        perplexity_state_update(perplexity_state_init("torch"), logits=values)


# --- Validation -----------------------------------------------------------------------------------


INVALID = [
    ("logits", (1, 2), np.nan, r"`logits` must not hold NaN; found NaN at index \(1, 2\)"),
    ("logits", (2, 0), np.inf, r"`logits` must not hold \+inf .* at index \(2, 0\)"),
    ("logits", (3, None), -np.inf, r"`logits` must give some entry a finite value.* \(3,\)"),
    ("probs", (0, 4), -0.25, r"`probs` must be non-negative; found -0.25 at index \(0, 4\)"),
    ("probs", (2, 1), np.nan, r"`probs` must be finite; found nan at index \(2, 1\)"),
    ("probs", (1, 3), np.inf, r"`probs` must be finite; found inf at index \(1, 3\)"),
    ("probs", (3, 3), -np.inf, r"`probs` must be finite; found -inf at index \(3, 3\)"),
    ("probs", (2, None), 0.0, r"`probs` rows must have a positive sum; .* at index \(2,\)"),
]


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("kind, where, bad, message", INVALID)
def test_invalid_values_raise_and_leave_the_state_alone(mode, kind, where, bad, message):
    rng = np.random.default_rng(7)
    values = rng.uniform(0.1, 1.0, size=(4, 6)).astype(np.float32)
    row, column = where
    if column is None:
        values[row] = bad
    else:
        values[row, column] = bad

    state = perplexity_state_update(None, **{kind: convert(np.ones((2, 6), np.float32), mode)})
    before = state_fields(state)
    with pytest.raises(ValueError, match=message):
        perplexity_state_update(state, **{kind: convert(values, mode)})
    assert state_fields(state) == before
    # Without validation the update goes through and the bad row shows as NaN, never dropped.
    if not (kind == "probs" and bad == 0.0):
        unchecked = perplexity_state_update(
            state, **{kind: convert(values, mode)}, validate_args=False
        )
        assert np.isnan(float(perplexity_compute(unchecked)))


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_first_invalid_index_is_reported_across_blocks(mode, monkeypatch):
    # Tiny blocks: the first bad element sits in a later block than other bad rows' neighbours.
    monkeypatch.setattr(f"ppl.functional._{mode}.BLOCK_BYTES", 64)
    values = np.ones((5, 7, 16), np.float32)
    values[3, 2, 9] = np.nan
    values[4, 6, 1] = np.nan
    with pytest.raises(ValueError, match=r"found NaN at index \(3, 2, 9\)"):
        perplexity(logits=convert(values, mode))
    mask = np.ones((5, 7), bool)
    mask[3, 2] = False
    with pytest.raises(ValueError, match=r"found NaN at index \(4, 6, 1\)"):
        perplexity(logits=convert(values, mode), mask=convert(mask, mode))


def test_validation_is_skipped_under_tracing_and_nan_propagates():
    import jax

    values = np.ones((2, 3), np.float32)
    values[0, 0] = np.nan
    traced = jax.jit(lambda v: perplexity(logits=v))(convert(values, "jax"))
    assert np.isnan(float(traced))
    compiled = torch.compile(lambda v: perplexity(logits=v), fullgraph=True)(
        torch.from_numpy(values)
    )
    assert np.isnan(float(compiled))


# --- Blocks, accumulation and merging -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax", "jax-jit"])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_many_small_blocks_with_a_remainder(mode, kind, monkeypatch):
    monkeypatch.setattr(f"ppl.functional._{backend_of(mode)}.BLOCK_BYTES", 3 * 50 * 4)
    rng = np.random.default_rng(8)
    values = rng.uniform(size=(101, 50)).astype(np.float32)  # 33 blocks of 3 rows and one of 2
    mask = rng.uniform(size=101) < 0.7
    expected = reference_perplexity(**{kind: values}, mask=mask)
    result = run_perplexity(mode, kind, convert(values, mode), mask=convert(mask, mode))
    assert_close(result, expected)
    assert_close(
        run_perplexity(mode, kind, convert(values, mode)), reference_perplexity(**{kind: values})
    )


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_merge_equals_one_update_of_everything(mode):
    rng = np.random.default_rng(9)
    parts = [rng.normal(size=(n, 13)).astype(np.float32) for n in (5, 1, 9)]
    states = [perplexity_state_update(None, logits=convert(p, mode)) for p in parts]
    before = [state_fields(s) for s in states]
    merged = perplexity_state_merge(*states)
    assert [state_fields(s) for s in states] == before
    assert int(merged.num_distributions) == 15
    assert_close(perplexity_compute(merged), reference_perplexity(logits=np.concatenate(parts)))
    assert state_fields(perplexity_state_merge(states[0])) == before[0]
    with pytest.raises(ValueError, match="needs at least one state"):
        perplexity_state_merge()


@pytest.mark.parametrize("mode", ["numpy", "torch", "jax"])
def test_backends_agree_with_each_other(mode):
    rng = np.random.default_rng(10)
    logits = rng.normal(scale=4.0, size=(64, 1000)).astype(np.float32)
    numpy_value = float(perplexity(logits=logits))
    np.testing.assert_allclose(
        float(perplexity(logits=convert(logits, mode))), numpy_value, rtol=1e-6
    )


def test_many_small_updates_stay_exact_numpy_and_torch():
    rng = np.random.default_rng(11)
    batches = rng.uniform(0.0, 1.0, size=(100_000, 2, 3))
    expected = reference_perplexity(probs=batches.reshape(-1, 3))
    numpy_state = perplexity_state_init("numpy")
    for batch in batches:
        numpy_state = perplexity_state_update(numpy_state, probs=batch, validate_args=False)
    assert int(numpy_state.num_distributions) == 200_000
    np.testing.assert_allclose(float(perplexity_compute(numpy_state)), expected, rtol=1e-12)

    torch_batches = torch.from_numpy(batches[:20_000].astype(np.float32))
    torch_state = perplexity_state_init("torch")
    for batch in torch_batches:
        torch_state = perplexity_state_update(torch_state, probs=batch, validate_args=False)
    expected_torch = reference_perplexity(probs=to_numpy(torch_batches).reshape(-1, 3))
    np.testing.assert_allclose(float(perplexity_compute(torch_state)), expected_torch, rtol=1e-6)


def test_many_small_updates_stay_exact_jax_without_x64():
    import jax

    rng = np.random.default_rng(12)
    batches = rng.uniform(0.0, 1.0, size=(100_000, 4, 3)).astype(np.float32)

    @jax.jit
    def run(batches):
        def step(state, batch):
            return perplexity_state_update(state, probs=batch, validate_args=False), None

        state, _ = jax.lax.scan(step, perplexity_state_init("jax"), batches)
        return state

    state = run(convert(batches, "jax"))
    assert int(state.num_distributions) + 2**32 * int(state.num_distributions_high) == 400_000
    expected = reference_perplexity(probs=batches.reshape(-1, 3))
    np.testing.assert_allclose(float(perplexity_compute(state)), expected, rtol=1e-6)


def test_jax_count_carries_past_two_to_the_32():
    import jax.numpy as jnp

    if jax_counts_are_64_bit():
        pytest.skip("the two-word count is used without x64 only")
    near = PerplexityState(
        jnp.float32(3.0 * (2**32 - 2)), jnp.uint32(2**32 - 2), jnp.float32(0.0), jnp.uint32(0)
    )
    state = perplexity_state_update(near, probs=jnp.ones((5, 2)))  # perplexity 2 each
    assert int(state.num_distributions_high) == 1
    assert int(state.num_distributions) == 3
    merged = perplexity_state_merge(state, near)
    assert int(merged.num_distributions_high) * 2**32 + int(merged.num_distributions) == (2**33 + 1)


# --- JAX transformations --------------------------------------------------------------------------


def test_vmap_over_a_batch_of_inputs():
    import jax

    rng = np.random.default_rng(13)
    logits = rng.normal(size=(6, 4, 17)).astype(np.float32)
    mask = rng.uniform(size=(6, 4)) < 0.8
    mask[:, 0] = True
    values = jax.vmap(lambda v, m: perplexity(logits=v, mask=m))(
        convert(logits, "jax"), convert(mask, "jax")
    )
    expected = [reference_perplexity(logits=logits[i], mask=mask[i]) for i in range(6)]
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-5)


def test_no_retracing_for_repeated_shapes():
    import chex
    import jax

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(state, logits):
        return perplexity_state_update(state, logits=logits)

    rng = np.random.default_rng(14)
    state = perplexity_state_init("jax")
    batches = [rng.normal(size=(8, 21)).astype(np.float32) for _ in range(5)]
    for batch in batches:
        state = update(state, convert(batch, "jax"))
    expected = reference_perplexity(logits=np.concatenate(batches))
    np.testing.assert_allclose(float(perplexity_compute(state)), expected, rtol=1e-5)


def test_compute_on_an_empty_state_is_nan_under_jit():
    import jax

    assert np.isnan(float(jax.jit(perplexity_compute)(perplexity_state_init("jax"))))
    assert np.isnan(float(perplexity_compute(perplexity_state_init("numpy"))))
    assert np.isnan(float(perplexity_compute(perplexity_state_init("torch"))))


def test_jax_with_x64_uses_float64_and_int64():
    script = (
        "import numpy as np, jax.numpy as jnp, ppl\n"
        "from tests.reference import reference_perplexity\n"
        "x = np.random.default_rng(0).normal(size=(9, 40))\n"
        "s = ppl.perplexity_state_update(None, logits=jnp.asarray(x))\n"
        "assert s.perplexities_sum.dtype == jnp.float64, s.perplexities_sum.dtype\n"
        "assert s.num_distributions.dtype == jnp.int64, s.num_distributions.dtype\n"
        "np.testing.assert_allclose(float(ppl.perplexity_compute(s)),"
        " reference_perplexity(logits=x), rtol=1e-12)\n"
    )
    env = {"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": "."}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --- Memory and imports ---------------------------------------------------------------------------


def test_numpy_temporaries_stay_within_a_block():
    import tracemalloc

    import ppl.functional._numpy as numpy_backend

    logits = np.random.default_rng(15).normal(size=(256, 32_000)).astype(np.float32)  # 32 MiB
    probs = np.abs(logits)
    tracemalloc.start()
    perplexity(logits=logits)
    perplexity(probs=probs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Two full-size temporaries of one block, plus the per-row vectors.
    assert peak < 3 * numpy_backend.BLOCK_BYTES + 32_000 * 8, peak


def test_importing_ppl_imports_no_framework():
    script = (
        "import sys, ppl, ppl.functional\n"
        "import numpy as np\n"
        "ppl.perplexity(logits=np.zeros((2, 3)))\n"
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_public_names():
    for name in ppl.functional.__all__:
        assert getattr(ppl, name) is getattr(ppl.functional, name)


def test_row_reference_is_independent_of_the_library():
    # The reference itself against textbook values, so that agreement with it means something.
    assert np.allclose(reference_row_perplexities(probs=np.array([[0.5, 0.5, 0.0]])), 2.0)
    assert np.allclose(reference_row_perplexities(logits=np.array([[0.0, -np.inf]])), 1.0)


def test_compiled_update_carries_a_state_across_calls():
    update = torch.compile(
        lambda state, logits, mask: perplexity_state_update(state, logits=logits, mask=mask),
        fullgraph=True,
    )
    rng = np.random.default_rng(16)
    batches = rng.normal(size=(4, 6, 30)).astype(np.float32)
    masks = rng.uniform(size=(4, 6)) < 0.7
    state = perplexity_state_init("torch")
    for batch, mask in zip(batches, masks, strict=True):
        state = update(state, torch.from_numpy(batch), torch.from_numpy(mask))
    assert int(state.num_distributions) == int(masks.sum())
    expected = reference_perplexity(logits=batches, mask=masks)
    np.testing.assert_allclose(float(perplexity_compute(state)), expected, rtol=1e-5)
