"""Which backend an array belongs to, decided without importing a framework the caller has not.

A torch tensor can only exist once torch is imported, and a JAX array once JAX is, so looking the
frameworks up in `sys.modules` is enough: `import ppl` never imports torch or JAX itself. Each
backend module is imported on first use and cached.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

BACKEND_NAMES = ("numpy", "torch", "jax")

_loaded: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """Returns the backend module for `name`, one of `BACKEND_NAMES`."""
    module = _loaded.get(name)
    if module is not None:
        return module
    # Plain import statements, not `importlib.import_module`: TorchDynamo refuses to trace the
    # latter, which broke a first call made under `torch.compile(fullgraph=True)`.
    if name == "numpy":
        from ppl.functional import _numpy as backend
    elif name == "torch":
        from ppl.functional import _torch as backend  # type: ignore[no-redef]
    else:
        from ppl.functional import _jax as backend  # type: ignore[no-redef]
    _loaded[name] = backend
    return backend


def backend_for(x: Any, argument: str) -> ModuleType:
    """Returns the backend module of array `x` (or of a backend name), or raises `TypeError`."""
    if isinstance(x, str):
        if x not in BACKEND_NAMES:
            raise ValueError(f"`{argument}` must be one of {BACKEND_NAMES}; got {x!r}.")
        return load(x)
    if isinstance(x, np.ndarray):
        return load("numpy")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return load("torch")
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return load("jax")
    raise TypeError(
        f"`{argument}` must be a numpy.ndarray, torch.Tensor or jax.Array; got "
        f"{type(x).__module__}.{type(x).__qualname__} (wrap lists with numpy.asarray)."
    )
