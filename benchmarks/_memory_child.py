"""One memory measurement in a fresh process: the peak resident size one call adds to its input.

Run by `benchmarks.run` as `python -m benchmarks._memory_child CASE DTYPE ROWS VOCAB`; prints one
JSON object. The input is built and the call made once (compiling it where it compiles) before the
measured calls, and the peak resident size is reset before each of them, so that neither the
input, the imports nor the compilation are counted: only what a call holds beyond them.
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks._common import peak_rss_bytes, reset_peak_rss, rss_bytes

CALLS = 3
XLA_TEMP_BYTES: list[int] = []


def _torch_input(dtype_name: str, rows: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype_name)
    return (torch.randn((rows, vocab), generator=generator) * 3).to(dtype)


def _call(case: str, dtype_name: str, rows: int, vocab: int):
    if case == "numpy":
        import numpy as np

        from ppl.functional import perplexity

        values = np.random.default_rng(0).standard_normal((rows, vocab), dtype=np.float32)
        values = values.astype(dtype_name, copy=False)
        return lambda: perplexity(logits=values, validate_args=False)
    if case in ("torch", "torch_validate", "compile", "reference"):
        import torch

        from ppl.functional import perplexity

        values = _torch_input(dtype_name, rows, vocab)
        if case == "reference":
            return lambda: (
                torch.distributions.Categorical(logits=values, validate_args=False)
                .perplexity()
                .mean()
            )
        if case == "compile":
            compiled = torch.compile(
                lambda x: perplexity(logits=x, validate_args=False), fullgraph=True
            )
            return lambda: compiled(values)
        validate = case == "torch_validate"
        return lambda: perplexity(logits=values, validate_args=validate)
    if case in ("jax", "xla_floor"):
        import jax
        import jax.numpy as jnp

        from ppl.functional import perplexity

        key = jax.random.PRNGKey(0)
        values = jax.random.normal(key, (rows, vocab), dtype=getattr(jnp, dtype_name))
        values.block_until_ready()
        if case == "xla_floor":
            function = jax.jit(lambda x: jnp.exp(x).sum())
        else:
            function = jax.jit(lambda x: perplexity(logits=x))
        # XLA's own count of the temporaries it allocates: exact where resident-size readings can
        # miss a buffer that XLA's allocator reuses from an earlier call.
        XLA_TEMP_BYTES.append(function.lower(values).compile().memory_analysis().temp_size_in_bytes)
        return lambda: function(values).block_until_ready()
    raise SystemExit(f"unknown case {case!r}")


def main() -> None:
    case, dtype_name, rows, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    call = _call(case, dtype_name, rows, vocab)
    call()
    # The largest of several calls: an allocator may hand a call the memory an earlier one freed
    # (already resident, so not counted), which one reading alone would miss.
    readings = []
    for _ in range(CALLS):
        exact = reset_peak_rss()
        before = rss_bytes()
        call()
        readings.append(max(0, peak_rss_bytes() - before))
    print(
        json.dumps(
            {
                "case": case,
                "dtype": dtype_name,
                "shape": [rows, vocab],
                "input_bytes": rows * vocab * (2 if dtype_name in ("float16", "bfloat16") else 4),
                # The larger of the resident-size peak and XLA's temporaries (JAX only).
                "peak_beyond_input_bytes": max([*readings, *XLA_TEMP_BYTES]),
                "xla_temp_bytes": XLA_TEMP_BYTES[0] if XLA_TEMP_BYTES else None,
                "readings_bytes": readings,
                "peak_reset": exact,
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    main()
