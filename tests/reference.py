"""Independent references: perplexity in float64 NumPy, written from the definition.

Nothing here calls `ppl`. For each distribution p along the last axis, perplexity is
exp(H(p)) with H(p) = -sum_i p_i log p_i in nats and 0 log 0 = 0; the metric is the mean over all
(unmasked) distributions.
"""

from __future__ import annotations

import numpy as np


def reference_row_perplexities(probs=None, logits=None):
    """Per-distribution perplexities, float64, shape `input.shape[:-1]`."""
    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)
        finite_max = np.max(z, axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            weights = np.exp(z - finite_max)
        p = weights / weights.sum(axis=-1, keepdims=True)
    else:
        w = np.asarray(probs, dtype=np.float64)
        p = w / w.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.exp(-terms.sum(axis=-1))


def reference_perplexity(probs=None, logits=None, mask=None):
    """Mean perplexity over the distributions where `mask` is True (all when None), float64."""
    rows = reference_row_perplexities(probs=probs, logits=logits)
    if mask is not None:
        rows = rows[np.asarray(mask, dtype=bool)]
    return float(rows.mean()) if rows.size else float("nan")


def to_numpy(x):
    """A float64 NumPy copy of a NumPy, torch or JAX array (bfloat16 included)."""
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)
