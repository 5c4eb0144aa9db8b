"""The blocked kernels against the float64 reference, with blocks small enough to split the input.

At their default sizes the blocks of every backend hold many rows, so small test inputs never
cross a block or chunk boundary. Here the budgets are shrunk so that the same inputs are cut into
many blocks, ragged last blocks and several chunks included, and each path is compared with
`tests/reference.py`: logits and probs; float16, bfloat16, float32, float64; masks; `-inf`
logits and zero probabilities; a vocabulary of one; eager, `torch.compile` and `jax.jit`.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppl.functional import perplexity, perplexity_compute, perplexity_state_update
from tests.reference import reference_perplexity, to_numpy

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

from ppl.functional import _jax, _numpy, _torch  # noqa: E402

SHAPES = [(37, 11), (3, 5, 7), (64, 1), (9, 300)]


def _logits(shape: tuple[int, ...], seed: int, with_neg_inf: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, shape) + rng.normal(0.0, 20.0, (*shape[:-1], 1))
    if with_neg_inf and shape[-1] > 1:
        # Some -inf entries, never a whole row of them.
        holes = rng.random(shape) < 0.3
        holes[..., 0] = False
        logits[holes] = -np.inf
    return logits


def _probs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probs = rng.random(shape) * 10.0
    if shape[-1] > 1:
        zeros = rng.random(shape) < 0.3
        zeros[..., 0] = False
        probs[zeros] = 0.0
    return probs


def _mask(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).random(shape[:-1]) < 0.6


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_numpy, "BLOCK_BYTES", 256)
    monkeypatch.setattr(_torch, "BLOCK_BYTES", 256)
    monkeypatch.setattr(_torch, "CHUNK_ROWS", 8)
    monkeypatch.setattr(_torch, "SMALL_BYTES", 0)
    monkeypatch.setattr(_jax, "BLOCK_BYTES", 256)


TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
JAX_DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
}
# float16/bfloat16 inputs are rounded before the kernel sees them: the reference gets the rounded
# values, so the tolerance only covers float32 arithmetic (and float64 where the input is).
RTOL = {"float16": 2e-5, "bfloat16": 2e-5, "float32": 2e-5, "float64": 1e-12}


def _convert(array: np.ndarray, backend: str, dtype: str):
    if backend == "numpy":
        return array.astype(dtype)
    if backend == "torch":
        return torch.from_numpy(array).to(TORCH_DTYPES[dtype])
    return jnp.asarray(array, dtype=JAX_DTYPES[dtype])


def _mask_of(mask: np.ndarray | None, backend: str):
    if mask is None or backend == "numpy":
        return mask
    return torch.from_numpy(mask) if backend == "torch" else jnp.asarray(mask)


CASES = [
    (backend, dtype)
    for backend in ("numpy", "torch", "jax")
    for dtype in ("float16", "bfloat16", "float32", "float64")
    if not (backend == "numpy" and dtype == "bfloat16")
]


@pytest.mark.parametrize(
    ("backend", "dtype", "blocks"),
    [(backend, dtype, "small blocks") for backend, dtype in CASES]
    + [("torch", dtype, "one small pass") for dtype in TORCH_DTYPES],
)
@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("masked", [False, True])
def test_eager_matches_reference(
    backend: str, dtype: str, blocks: str, kind: str, masked: bool, request: pytest.FixtureRequest
) -> None:
    # "one small pass": torch's path for inputs of at most SMALL_BYTES, which every shape is.
    if blocks == "small blocks":
        request.getfixturevalue("small_blocks")
    if backend == "jax" and dtype == "float64" and not jax.config.jax_enable_x64:
        pytest.skip("float64 JAX arrays need x64")
    for seed, shape in enumerate(SHAPES):
        raw = _logits(shape, seed, with_neg_inf=True) if kind == "logits" else _probs(shape, seed)
        values = _convert(raw, backend, dtype)
        mask = _mask(shape, seed) if masked else None
        expected = reference_perplexity(**{kind: to_numpy(values)}, mask=mask)
        got = perplexity(**{kind: values}, mask=_mask_of(mask, backend))
        rtol = RTOL[dtype] if backend != "jax" or jax.config.jax_enable_x64 else 1e-5
        np.testing.assert_allclose(float(got), expected, rtol=rtol, err_msg=f"shape {shape}")


@pytest.mark.parametrize("blocks", ["small blocks", "default blocks"])
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_validation_finds_first_bad_row(
    backend: str, kind: str, blocks: str, request: pytest.FixtureRequest
) -> None:
    if blocks == "small blocks":
        request.getfixturevalue("small_blocks")
    shape = (5, 7, 6)
    raw = _logits(shape, 3, with_neg_inf=False) if kind == "logits" else _probs(shape, 3)
    raw[3, 4, 2] = np.nan
    raw[4, 1, 0] = np.nan
    values = _convert(raw, backend, "float32")
    state = perplexity_state_update(None, **{kind: values[:1]})
    with pytest.raises(ValueError, match=r"index \(3, 4, 2\)"):
        perplexity_state_update(state, **{kind: values})
    # The bad rows are masked out: nothing to complain about.
    mask = np.ones(shape[:-1], bool)
    mask[3, 4] = mask[4, 1] = False
    got = perplexity_state_update(state, **{kind: values}, mask=_mask_of(mask, backend))
    expected = reference_perplexity(
        **{kind: np.concatenate([raw[:1].reshape(-1, 6), raw[mask]])},
    )
    np.testing.assert_allclose(float(perplexity_compute(got)), expected, rtol=2e-5)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("kind", "dtype"), [("logits", "bfloat16"), ("probs", "float32")])
def test_blocked_torch_compile_matches_reference(kind: str, dtype: str) -> None:
    # 37 rows in chunks of 8: the unrolled loop has a ragged last chunk.
    assert _torch.CHUNK_ROWS == 8
    shape = (37, 11)
    raw = _logits(shape, 5, with_neg_inf=True) if kind == "logits" else _probs(shape, 5)
    values = _convert(raw, "torch", dtype)
    mask = _mask(shape, 5)

    def metric(values, mask):
        return perplexity(**{kind: values}, mask=mask, validate_args=False)

    compiled = torch.compile(metric, fullgraph=True, dynamic=False)
    got = compiled(values, torch.from_numpy(mask))
    expected = reference_perplexity(**{kind: to_numpy(values)}, mask=mask)
    np.testing.assert_allclose(float(got), expected, rtol=RTOL[dtype])


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("kind", "dtype"), [("logits", "bfloat16"), ("probs", "float32")])
def test_blocked_jax_jit_matches_reference(kind: str, dtype: str) -> None:
    shape = (37, 11)
    raw = _logits(shape, 6, with_neg_inf=True) if kind == "logits" else _probs(shape, 6)
    values = _convert(raw, "jax", dtype)
    mask = _mask(shape, 6)

    @jax.jit
    def metric(values, mask):
        return perplexity(**{kind: values}, mask=mask)

    got = metric(values, jnp.asarray(mask))
    expected = reference_perplexity(**{kind: to_numpy(values)}, mask=mask)
    np.testing.assert_allclose(float(got), expected, rtol=2e-5)
    # vmap over a leading axis: one state per slice, each against its own reference.
    per_slice = jax.vmap(lambda v: perplexity(**{kind: v}))(values.reshape(37, 1, 11))
    expected_rows = [reference_perplexity(**{kind: to_numpy(values[i : i + 1])}) for i in range(37)]
    np.testing.assert_allclose(np.asarray(per_slice), expected_rows, rtol=2e-5)


def test_a_first_call_under_torch_compile_fullgraph_traces() -> None:
    # In a fresh process, so that no earlier eager call has loaded the torch backend: loading it
    # through importlib.import_module made TorchDynamo refuse the graph.
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from ppl.functional import perplexity\n"
        "f = torch.compile(lambda x: perplexity(logits=x, validate_args=False),"
        " fullgraph=True, backend='eager')\n"
        "print(float(f(torch.zeros(2, 4))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == 4.0
