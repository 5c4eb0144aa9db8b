"""Which frameworks are installed, and moving arrays between NumPy, PyTorch and JAX.

The command line reads files into NumPy arrays (memory-mapped where it can) or, for `.pt` files,
torch tensors, and hands each block of rows to the backend asked for. Frameworks are looked up
with `importlib.util.find_spec` and imported only when used. bfloat16 has no NumPy type of its own:
it travels as `ml_dtypes.bfloat16` where ml_dtypes is installed (it comes with JAX), and otherwise
as float32 holding the same values, which the kernels compute in anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import numpy as np

from ppl._cli._errors import CliError

BACKENDS = ("numpy", "torch", "jax")

_INSTALL_HINT = {"torch": "pip install 'ppl[torch]'", "jax": "pip install 'ppl[jax]'"}


def is_installed(name: str) -> bool:
    """Whether module `name` can be found, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_optional(name: str, needed_for: str) -> ModuleType:
    """Imports module `name`, or raises `CliError` saying it is needed for `needed_for`."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        hint = _INSTALL_HINT.get(name.split(".")[0], f"pip install {name.split('.')[0]}")
        raise CliError(
            f"{needed_for} needs {name}, which is not installed or fails to import ({error}); "
            f"{hint}"
        ) from None


def framework_version(name: str) -> str:
    """The version string of an installed framework."""
    return str(getattr(importlib.import_module(name), "__version__", "?"))


def set_jax_x64(enabled: bool) -> None:
    """Switches JAX's 64-bit mode; arrays made in one mode must not be fed in the other."""
    jax = import_optional("jax", "the jax backend")
    jax.config.update("jax_enable_x64", enabled)


def jax_x64() -> bool:
    """Whether JAX's 64-bit mode is on."""
    return bool(import_optional("jax", "the jax backend").config.jax_enable_x64)


def is_torch_tensor(array: Any) -> bool:
    """Whether `array` is a torch tensor (without importing torch)."""
    return type(array).__module__.startswith("torch")


def dtype_name(array: Any) -> str:
    """The dtype's name without the framework's prefix: `float32`, `bfloat16`, `int64`..."""
    return str(array.dtype).removeprefix("torch.")


def ml_dtypes_bfloat16() -> Any:
    """`ml_dtypes.bfloat16`, or None where ml_dtypes is not installed."""
    if not is_installed("ml_dtypes"):
        return None
    return importlib.import_module("ml_dtypes").bfloat16


def bfloat16_from_bits(bits: np.ndarray, backend: str) -> tuple[Any, str | None]:
    """Returns a bfloat16 array of `backend` from raw uint16 bit patterns, and a note or None.

    NumPy gets float32 holding the same values (and a note saying so) where ml_dtypes is missing.
    """
    if backend == "torch":
        torch = import_optional("torch", "the torch backend")
        return torch.from_numpy(np.array(bits, dtype=np.uint16)).view(torch.bfloat16), None
    bfloat16 = ml_dtypes_bfloat16()
    if bfloat16 is None:
        if backend == "jax":
            raise CliError("bfloat16 on the jax backend needs ml_dtypes, which is not installed")
        values = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return values, "bfloat16 input given to NumPy as float32 (same values; no ml_dtypes)"
    host = np.asarray(bits, dtype=np.uint16).view(bfloat16)
    if backend == "jax":
        return _to_jax(host)
    return host, None


def to_numpy(array: Any) -> tuple[np.ndarray, str | None]:
    """Returns `array` (NumPy or torch, on the CPU) as a NumPy array, and a note or None."""
    if not is_torch_tensor(array):
        return np.asarray(array), None
    torch = importlib.import_module("torch")
    if array.dtype == torch.bfloat16:
        bits = array.detach().cpu().contiguous().view(torch.uint16).numpy()
        return bfloat16_from_bits(bits, "numpy")
    return array.detach().cpu().numpy(), None


def to_backend(array: Any, backend: str) -> tuple[Any, str | None]:
    """Returns a copy or view of `array` as an array of `backend`, and a note or None.

    Args:
        array: a NumPy array (memory-mapped ones included; never written to) or a torch tensor.
        backend: one of `BACKENDS`.

    Returns:
        The array of `backend` (torch on the CPU), and a note when its dtype had to change (a
        bfloat16 given to NumPy as float32, a float64 given to JAX as float32 with x64 off).
    """
    if backend == "torch":
        if is_torch_tensor(array):
            return array, None
        torch = import_optional("torch", "the torch backend")
        host = np.asarray(array)
        if host.dtype.name == "bfloat16":
            return bfloat16_from_bits(host.view(np.uint16), "torch")
        # A copy: memory-mapped blocks are read-only, and torch wants to own writable memory.
        return torch.from_numpy(np.array(host)), None
    host, note = to_numpy(array)
    if backend == "numpy":
        return host, note
    jax_array, jax_note = _to_jax(host)
    return jax_array, note or jax_note


def _to_jax(host: np.ndarray) -> tuple[Any, str | None]:
    jnp = import_optional("jax.numpy", "the jax backend")
    if host.dtype == np.float64 and not jax_x64():
        # Without x64 JAX would truncate float64 itself, with a warning; say so once instead.
        return jnp.asarray(host.astype(np.float32)), "float64 input computed as float32 (x64 off)"
    return jnp.asarray(host), None
