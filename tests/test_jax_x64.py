"""The JAX property, fuzz and regression tests again, in a process with x64 on.

x64 is process-wide in JAX, so the main test process (x64 off, the default) cannot cover JAX's
float64 inputs and its float64 / int64 state. Here a subprocess runs the JAX cases of those files
with `JAX_ENABLE_X64=1`: with a fifth of the examples in the default run, all of them with
`-m slow`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]
FILES = [
    "tests/test_properties.py",
    "tests/test_fuzz_validation.py",
    "tests/test_core_regressions.py",
]


def run_jax_cases_with_x64(scale: str) -> None:
    env = {**os.environ, "JAX_ENABLE_X64": "1", "PPL_HYPOTHESIS_SCALE": scale}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-k",
        "jax",
        *FILES,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    # The float64 cases ran, rather than being skipped for want of x64 (-rs lists every skip).
    assert "without x64" not in result.stdout, result.stdout[-8000:]


def test_jax_cases_pass_with_x64_reduced():
    run_jax_cases_with_x64("0.2")


@pytest.mark.slow
def test_jax_cases_pass_with_x64_in_full():
    run_jax_cases_with_x64("1")
