"""`perplexity_state_psum` under `jax.pmap` and `jax.shard_map` on 4 forced CPU devices.

Each device's part of the data is rebuilt here, and the summed state is checked against the
float64 NumPy reference over all parts together; the count must be exact, carries included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from reference import reference_perplexity

from ppl.functional import (
    PerplexityState,
    perplexity_compute,
    perplexity_state_psum,
    perplexity_state_update,
)

NUM_DEVICES = jax.local_device_count()

pytestmark = pytest.mark.skipif(NUM_DEVICES < 2, reason="needs several (forced) CPU devices")


def device_data(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((NUM_DEVICES, 6, 9, 5))).astype(dtype)
    mask = rng.random((NUM_DEVICES, 6, 9)) < 0.7
    mask[-1] = False  # one device with no distribution at all
    return logits, mask


def summed(logits, mask):
    state = perplexity_state_update(None, logits=logits, mask=mask)
    total = perplexity_state_psum(state, "devices")
    return perplexity_compute(total), total


def check(values, states, logits, mask, rel):
    expected = reference_perplexity(logits=logits.reshape(-1, 5), mask=mask.reshape(-1))
    values = np.asarray(values).reshape(-1)
    assert np.all(values == values[0]), "devices disagree"
    assert float(values[0]) == pytest.approx(expected, rel=rel)
    count = np.asarray(states.num_distributions).reshape(-1)
    high = np.asarray(states.num_distributions_high).reshape(-1)
    assert int(high[0]) * 2**32 + int(count[0]) == int(mask.sum())


def test_pmap():
    logits, mask = device_data()
    values, states = jax.pmap(summed, axis_name="devices")(logits, mask)
    check(values, states, logits, mask, rel=2e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_shard_map(jit):
    logits, mask = device_data(seed=1)
    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("devices",))

    def per_device(logits, mask):
        return summed(logits[0], mask[0])

    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("devices"), P("devices")), out_specs=P()
    )
    if jit:
        mapped = jax.jit(mapped)
    value, state = mapped(logits, mask)
    check(value, state, logits, mask, rel=2e-6)


def test_x64_state():
    with jax.enable_x64(True):
        logits, mask = device_data(seed=2, dtype=np.float64)
        values, states = jax.pmap(summed, axis_name="devices")(logits, mask)
        assert states.perplexities_sum.dtype == jnp.float64
        assert states.num_distributions.dtype == jnp.int64
        check(values, states, logits, mask, rel=1e-12)


def test_count_words_carry_exactly():
    # Low words near 2**32 on every device: their sum wraps several times.
    lows = np.array([2**32 - 1 - d for d in range(NUM_DEVICES)], dtype=np.uint32)
    highs = np.arange(NUM_DEVICES, dtype=np.uint32)

    def total(low, high):
        zero = jnp.zeros((), jnp.float32)
        return perplexity_state_psum(PerplexityState(zero, low, zero, high), "devices")

    state = jax.pmap(total, axis_name="devices")(lows, highs)
    expected = sum(int(h) * 2**32 + int(lo) for lo, h in zip(lows, highs, strict=True))
    got = int(state.num_distributions_high[0]) * 2**32 + int(state.num_distributions[0])
    assert got == expected


def test_sum_is_compensated_across_devices():
    # 2**24 + 1 + 1 + 1 has no float32 form; any plain float32 sum of these parts loses a unit.
    parts = np.array([2.0**24] + [1.0] * (NUM_DEVICES - 1), dtype=np.float32)

    def total(part):
        zero_count = jnp.zeros((), jnp.uint32)
        zero = jnp.zeros((), jnp.float32)
        return perplexity_state_psum(PerplexityState(part, zero_count, zero, zero_count), "d")

    state = jax.pmap(total, axis_name="d")(parts)
    exact = 2.0**24 + (NUM_DEVICES - 1)
    assert float(state.perplexities_sum[0]) + float(state.perplexities_sum_error[0]) == exact


def test_errors():
    import torch

    with pytest.raises(TypeError, match="JAX"):
        perplexity_state_psum(perplexity_state_update(None, logits=torch.zeros(2, 2)), "d")
    with pytest.raises(NameError):
        perplexity_state_psum(perplexity_state_update(None, logits=jnp.zeros((2, 2))), "d")
