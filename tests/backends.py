"""Running the functional API on each backend and in each execution mode, for the tests.

A *mode* is a backend with a way of calling: NumPy eager; torch eager and under
`torch.compile(fullgraph=True)`; JAX eager and under `jax.jit`. Inputs are made in NumPy and
converted, so every mode sees the same numbers.
"""

from __future__ import annotations

import functools

import numpy as np

import ppl

MODES = ["numpy", "torch", "torch-compile", "jax", "jax-jit"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


def backend_of(mode: str) -> str:
    return mode.split("-")[0]


def convert(array, mode: str, dtype: str | None = None):
    """`array` (NumPy) as an array of `mode`'s backend, cast to `dtype` when given."""
    array = np.asarray(array)
    backend = backend_of(mode)
    if backend == "numpy":
        if dtype == "bfloat16":
            import ml_dtypes

            return array.astype(ml_dtypes.bfloat16)
        return array.astype(dtype) if dtype else array
    if backend == "torch":
        import torch

        tensor = torch.from_numpy(array.copy())
        return tensor.to(getattr(torch, dtype)) if dtype else tensor
    import jax
    import jax.numpy as jnp

    if dtype == "float64" and not jax.config.jax_enable_x64:
        import pytest

        pytest.skip("JAX without x64 has no float64")
    result = jnp.asarray(array)
    return result.astype(getattr(jnp, dtype)) if dtype else result


@functools.cache
def _compiled(kind: str, with_mask: bool):
    import torch
    import torch._dynamo.config

    # A recompilation past the limit would silently fall back to eager; make it an error.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    if with_mask:

        def run(values, mask):
            return ppl.perplexity(**{kind: values}, mask=mask)
    else:

        def run(values):
            return ppl.perplexity(**{kind: values})

    return torch.compile(run, fullgraph=True)


@functools.cache
def _jitted(kind: str, with_mask: bool):
    import jax

    if with_mask:
        return jax.jit(lambda values, mask: ppl.perplexity(**{kind: values}, mask=mask))
    return jax.jit(lambda values: ppl.perplexity(**{kind: values}))


def run_perplexity(mode: str, kind: str, values, mask=None) -> float:
    """The one-shot perplexity of `values` (already of `mode`'s backend) as a Python float."""
    if mode == "torch-compile":
        fn = _compiled(kind, mask is not None)
        result = fn(values, mask) if mask is not None else fn(values)
    elif mode == "jax-jit":
        fn = _jitted(kind, mask is not None)
        result = fn(values, mask) if mask is not None else fn(values)
    else:
        result = ppl.perplexity(**{kind: values}, mask=mask)
    return float(result)
