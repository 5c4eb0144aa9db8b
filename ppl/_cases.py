"""The embedded parity cases of `ppl parity`: small, seeded inputs that stress the kernels.

Nothing is stored: every case is generated at run time from a fixed seed with NumPy's
`default_rng`, so the same command gives the same inputs on every machine. A case is a list of
batches, each fed to its own `perplexity_state_update` call, as a training loop would; the value
checked is the perplexity of the state after all of them.

bfloat16 inputs are kept as float32 arrays whose values are exactly representable in bfloat16
(rounded here, to nearest even), together with their raw 16-bit patterns, so that a backend can
build a true bfloat16 array without NumPy knowing the type, and the float64 reference of the
rounded values is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One update's input.

    Attributes:
        values: float32 or float64 array of shape `[..., vocab]`; for a bfloat16 case, float32
            values that bfloat16 represents exactly.
        mask: boolean array of shape `values.shape[:-1]`, or None.
    """

    values: np.ndarray
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Case:
    """A named parity case.

    Attributes:
        name: short name shown in the table.
        kind: `"logits"` or `"probs"`.
        batches: the updates, in order.
        bfloat16: whether the inputs are meant as bfloat16 (see the module docstring).
        description: one line on what the case stresses.
    """

    name: str
    kind: str
    batches: tuple[Batch, ...]
    bfloat16: bool = False
    description: str = ""


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Returns the bfloat16 bit patterns (uint16) of float32 `values`, rounded to nearest even.

    Args:
        values: finite float32 array of any shape.

    Returns:
        uint16 array of the same shape; `bfloat16_bits_to_float32` turns it back into float32.

    Example:
        >>> round_to_bfloat16(np.array([1.0, 1.00390625], np.float32))
        array([16256, 16256], dtype=uint16)
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds half to even.
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = bits + np.uint32(0x7FFF) + lowest_kept
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Returns the float32 values of bfloat16 bit patterns `bits` (uint16); exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def embedded_cases() -> list[Case]:
    """Returns the parity cases, generated from fixed seeds.

    Returns:
        A list of `Case`: peaked, flat and `-inf`-masked logits, bfloat16 logits, a padded batch
        with a row mask (NaN in the padding), float64 probs with zeros, and NeMo's three test
        cases (10 batches of 16 x 5: unnormalised uniform[0, 1) probs, logits uniform in [0, 1),
        logits uniform in [-100, 100)).

    Example:
        >>> [case.name for case in embedded_cases()][:2]
        ['peaked logits', 'flat logits']
    """
    return [
        _peaked(),
        _flat(),
        _masked_vocab(),
        _bfloat16_logits(),
        _padded_batch(),
        _probs_with_zeros(),
        _nemo("nemo probs U[0,1)", "probs", 0.0, 1.0, seed=6),
        _nemo("nemo logits U[0,1)", "logits", 0.0, 1.0, seed=7),
        _nemo("nemo logits U[-100,100)", "logits", -100.0, 100.0, seed=8),
    ]


def _peaked() -> Case:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 32000)).astype(np.float32)
    # One logit far above the rest: entropy near 0, perplexity near 1, where cancellation bites.
    winners = rng.integers(0, 32000, size=32)
    logits[np.arange(32), winners] += rng.uniform(12.0, 40.0, size=32).astype(np.float32)
    return Case(
        "peaked logits",
        "logits",
        (Batch(logits),),
        description="32 x 32000 float32, one logit 12 to 40 above the rest",
    )


def _flat() -> Case:
    rng = np.random.default_rng(1)
    # Constant rows, shifted far from 0: perplexity is exactly the vocabulary size.
    offsets = rng.uniform(-1e4, 1e4, size=(16, 1)).astype(np.float32)
    logits = np.broadcast_to(offsets, (16, 50257)).copy()
    return Case(
        "flat logits",
        "logits",
        (Batch(logits),),
        description="16 x 50257 float32, constant rows offset by up to 1e4",
    )


def _masked_vocab() -> Case:
    rng = np.random.default_rng(2)
    logits = (2.0 * rng.standard_normal((64, 4096))).astype(np.float32)
    logits[rng.random((64, 4096)) < 0.5] = -np.inf
    # Rows with a single finite entry: perplexity exactly 1.
    logits[:8] = -np.inf
    logits[np.arange(8), rng.integers(0, 4096, size=8)] = rng.standard_normal(8)
    return Case(
        "-inf masked vocab",
        "logits",
        (Batch(logits),),
        description="64 x 4096 float32, half the vocabulary -inf, 8 rows with one finite entry",
    )


def _bfloat16_logits() -> Case:
    rng = np.random.default_rng(3)
    logits = (4.0 * rng.standard_normal((128, 8192))).astype(np.float32)
    rounded = bfloat16_bits_to_float32(round_to_bfloat16(logits))
    return Case(
        "bf16 logits",
        "logits",
        (Batch(rounded),),
        bfloat16=True,
        description="128 x 8192 bfloat16, normal with standard deviation 4",
    )


def _padded_batch() -> Case:
    rng = np.random.default_rng(4)
    batches = []
    for _ in range(3):
        logits = (3.0 * rng.standard_normal((8, 96, 512))).astype(np.float32)
        lengths = rng.integers(1, 97, size=8)
        mask = np.arange(96)[None, :] < lengths[:, None]
        # Padding may hold anything; masked rows must count for nothing, NaN included.
        logits[~mask] = np.nan
        batches.append(Batch(logits, mask))
    return Case(
        "padded batch (mask)",
        "logits",
        tuple(batches),
        description="3 batches of 8 x 96 x 512 float32, random lengths, NaN in the padding",
    )


def _probs_with_zeros() -> Case:
    rng = np.random.default_rng(5)
    probs = rng.random((256, 100))
    probs[rng.random((256, 100)) < 0.3] = 0.0
    probs[:4] = 0.0
    probs[:4, 0] = 1.0
    return Case(
        "float64 probs, zeros",
        "probs",
        (Batch(probs),),
        description="256 x 100 float64 unnormalised, 30% zeros (0 log 0 = 0), 4 one-hot rows",
    )


def _nemo(name: str, kind: str, low: float, high: float, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    batches = tuple(
        Batch(rng.uniform(low, high, size=(16, 5)).astype(np.float32)) for _ in range(10)
    )
    return Case(
        name,
        kind,
        batches,
        description=f"10 batches of 16 x 5 float32 {kind} uniform in [{low:g}, {high:g})",
    )
