"""Shared pieces of the reliability tests: backends, dtypes, array conversion, hypothesis settings.

Arrays are always drawn in float64 NumPy, cast to the dtype under test and moved to the backend;
the reference is then computed from the backend array's own values (`tests.reference.to_numpy`), so
that rounding in the cast never shows as an error of `ppl`.

Hypothesis runs derandomized and without its example database when `CI` is set (a fixed,
reproducible sequence of examples), and with its defaults otherwise. `PPL_HYPOTHESIS_SCALE`
multiplies every test's number of examples, for a longer hunt: `PPL_HYPOTHESIS_SCALE=20 pytest`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

BACKENDS = ("numpy", "torch", "jax")

_IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
_SCALE = float(os.environ.get("PPL_HYPOTHESIS_SCALE", "1"))


def hypothesis_settings(max_examples: int) -> settings:
    """Settings for one property test: no deadline (JAX compiles on first use), fixed in CI."""
    kwargs: dict[str, Any] = {
        "max_examples": max(1, int(max_examples * _SCALE)),
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    if _IN_CI:
        kwargs.update(derandomize=True, database=None, print_blob=True)
    return settings(**kwargs)


def import_backend(backend: str) -> Any:
    """Imports the framework of `backend` (skipping the test when it is not installed)."""
    if backend == "torch":
        return pytest.importorskip("torch")
    if backend == "jax":
        pytest.importorskip("jax")
        import jax.numpy as jnp

        return jnp
    return np


def jax_x64() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)


def dtypes_of(backend: str) -> tuple[str, ...]:
    """The floating dtypes a backend supports, by name (float64 on JAX only with x64)."""
    if backend == "jax":
        import_backend("jax")
        if not jax_x64():
            return ("float16", "bfloat16", "float32")
    return ("float16", "bfloat16", "float32", "float64")


def compute_dtype(dtype_name: str) -> Any:
    """The dtype `ppl` computes an input of `dtype_name` in: float64 for float64, else float32."""
    return np.float64 if dtype_name == "float64" else np.float32


def numpy_cast(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """`values` rounded to `dtype_name` as a NumPy array (bfloat16 through ml_dtypes)."""
    if dtype_name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype: Any = ml_dtypes.bfloat16
    else:
        dtype = np.dtype(dtype_name)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values).astype(dtype)


def to_backend(values: np.ndarray, backend: str, dtype_name: str | None = None) -> Any:
    """`values` (float64 or bool NumPy) as an array of `backend`, cast to `dtype_name` if given."""
    cast = values if dtype_name is None else numpy_cast(values, dtype_name)
    if backend == "numpy":
        return cast
    if backend == "torch":
        torch = import_backend("torch")
        if dtype_name == "bfloat16":
            # NumPy's bfloat16 is not a torch dtype; float32 holds every bfloat16 value exactly.
            return torch.from_numpy(cast.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(cast))
    jnp = import_backend("jax")
    return jnp.asarray(cast)


def snapshot(state: Any) -> list[np.ndarray]:
    """Copies of a state's fields as NumPy arrays, to compare a state before and after a call."""
    out = []
    for field in state:
        if type(field).__module__.startswith("torch"):
            out.append(field.detach().cpu().clone().numpy())
        else:
            out.append(np.array(field))
    return out


def assert_same_snapshot(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    """The two snapshots hold the same dtypes and bit-identical values (NaN equal to NaN)."""
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert old.dtype == new.dtype
        np.testing.assert_array_equal(old, new)


def exact_count(state: Any) -> int:
    """The state's count as a Python int, from its low and high words."""
    fields = snapshot(state)
    low, high = int(fields[1]), int(fields[3])
    # The low word is uint32 on JAX without x64 (the high word counts its wraps); int64 elsewhere.
    words = 2**32 if fields[1].dtype == np.uint32 else 2**63
    return high * words + low


@contextlib.contextmanager
def block_bytes(backend: str, value: int | None) -> Iterator[None]:
    """Sets the backend kernel's block size in bytes for the duration (None: leave it)."""
    if value is None:
        yield
        return
    from ppl.functional import _backends

    module = _backends.load(backend)
    old = module.BLOCK_BYTES
    module.BLOCK_BYTES = value
    try:
        yield
    finally:
        module.BLOCK_BYTES = old
