"""The float64 reference that `ppl parity` checks every backend against.

Written from the definition, independently of the kernels in `ppl.functional`: each distribution
is normalised in float64, its entropy is `H = -sum_i p_i log p_i` in nats with `0 log 0 = 0`, its
perplexity `exp(H)`, and the value is the mean over the unmasked distributions, summed with
`math.fsum` so that the order of the rows cannot change the result. It does not validate its
input (the backends do); invalid rows give NaN. Inputs are read in blocks of rows, so a large
input costs a bounded amount of memory.
"""

from __future__ import annotations

import math

import numpy as np

# Rows of float64 temporaries per block: a few MiB whatever the vocabulary.
_BLOCK_BYTES = 1 << 22


class ReferencePerplexity:
    """Accumulates the float64 reference over any number of inputs.

    Example:
        >>> reference = ReferencePerplexity()
        >>> reference.update(np.array([[0.5, 0.5], [1.0, 0.0]]), "probs")
        >>> reference.value()
        1.5
    """

    def __init__(self) -> None:
        self._partial_sums: list[float] = []
        self.num_distributions = 0

    def update(self, values: np.ndarray, kind: str, mask: np.ndarray | None = None) -> None:
        """Adds the distributions along the last axis of `values`.

        Args:
            values: array of shape `[..., vocab]` whose dtype converts to float64 exactly
                (float16, bfloat16 through ml_dtypes, float32, float64).
            kind: `"logits"` or `"probs"`.
            mask: optional boolean array of shape `values.shape[:-1]`; False rows are skipped.
        """
        vocab = values.shape[-1]
        rows = values.reshape(-1, vocab)
        keep = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        block_rows = max(1, _BLOCK_BYTES // (8 * vocab))
        for start in range(0, rows.shape[0], block_rows):
            block = np.asarray(rows[start : start + block_rows], dtype=np.float64)
            if keep is not None:
                block = block[keep[start : start + block_rows]]
            perplexities = row_perplexities(block, kind)
            self._partial_sums.append(math.fsum(perplexities.tolist()))
            self.num_distributions += perplexities.shape[0]

    def value(self) -> float:
        """Returns the mean perplexity so far; NaN when no distribution was added."""
        if self.num_distributions == 0:
            return math.nan
        return math.fsum(self._partial_sums) / self.num_distributions


def row_perplexities(rows: np.ndarray, kind: str) -> np.ndarray:
    """Returns `exp(entropy)` of each row of a float64 array of shape `[rows, vocab]`.

    Args:
        rows: float64 array of shape `[rows, vocab]`.
        kind: `"logits"` (unnormalised log-probabilities, `-inf` allowed) or `"probs"`
            (non-negative weights, normalised here by their sum).

    Returns:
        float64 array of shape `[rows]`.

    Example:
        >>> row_perplexities(np.zeros((1, 4)), "logits")
        array([4.])
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "logits":
            # log p = z - logsumexp(z); the row maximum is taken out first so exp cannot overflow.
            shifted = rows - rows.max(axis=-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            probs = np.exp(log_probs)
        else:
            probs = rows / rows.sum(axis=-1, keepdims=True)
            log_probs = np.log(probs)
        terms = np.where(probs > 0, probs * log_probs, 0.0)
    result: np.ndarray = np.exp(-terms.sum(axis=-1))
    return result
