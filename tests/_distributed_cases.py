"""The cases that `test_distributed.py` runs in every process of a gloo group, and their data.

The data come from seeded NumPy generators, so the parent rebuilds exactly what every rank saw and
checks the results against the float64 reference; the children only record what the code under
test returned (as exact Python numbers), except for the few checks that only a child can make
(an error raised in a collective).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

NUM_BATCHES = 10
BATCH_SHAPE = (16, 5)


def reference_batches(kind: str) -> np.ndarray:
    """The reference's data: 10 float32 batches of 16 distributions over 5 classes."""
    rng = np.random.default_rng(20240611 if kind == "logits" else 20240612)
    if kind == "logits":
        return (2.0 * rng.standard_normal((NUM_BATCHES, *BATCH_SHAPE))).astype(np.float32)
    weights = rng.random((NUM_BATCHES, *BATCH_SHAPE)) ** 3
    weights[rng.random(weights.shape) < 0.2] = 0.0
    weights[..., 0] += 1e-3
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def reference_schedule(world_size: int, rank: int, sync_on_step: bool) -> list[int | None]:
    """Batch i goes to rank i mod world; a rank past the data steps with an empty batch (None)."""
    steps = -(-NUM_BATCHES // world_size)
    schedule: list[int | None] = []
    for step in range(steps):
        index = step * world_size + rank
        if index < NUM_BATCHES:
            schedule.append(index)
        elif sync_on_step:
            # Every rank must join each step's collective; an empty batch adds nothing.
            schedule.append(None)
    return schedule


def uneven_batches(rank: int) -> list[np.ndarray]:
    """Rank r sees r + 1 float64 batches of logits over 7 classes, each of another size."""
    rng = np.random.default_rng(1000 + rank)
    return [3.0 * rng.standard_normal((3 + 4 * rank + 2 * j, 7)) for j in range(rank + 1)]


def sparse_batches(rank: int, world_size: int) -> list[np.ndarray]:
    """Rank 1 sees nothing; the others two float64 batches of probabilities over 4 classes."""
    if rank == 1:
        return []
    rng = np.random.default_rng(2000 + rank)
    return [rng.random((5 + rank, 4)) for _ in range(2)]


def masked_batches(rank: int, world_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Float64 logits of shape [3, 4, 6] with boolean masks; the last rank's are all False."""
    rng = np.random.default_rng(3000 + rank)
    batches = []
    for _ in range(2):
        logits = 2.0 * rng.standard_normal((3, 4, 6))
        mask = rng.random((3, 4)) < 0.6
        if rank == world_size - 1:
            mask[:] = False
        # Masked rows may hold anything, NaN included: they must count for nothing.
        logits[~mask] = np.nan
        batches.append((logits, mask))
    return batches


def ddp_inputs(rank: int, step: int) -> np.ndarray:
    rng = np.random.default_rng(4000 + 10 * rank + step)
    return rng.standard_normal((6 + rank, 4)).astype(np.float32)


def all_cases(rank: int, world_size: int, with_timeout: bool) -> dict[str, Any]:
    """Every case on this rank, in the same order on every rank (they are collectives)."""
    from ppl.stateful import Perplexity, TorchmetricsPerplexity

    classes = {"plain": Perplexity, "dropin": TorchmetricsPerplexity}
    results: dict[str, Any] = {}
    for name, cls in classes.items():
        for kind in ("probs", "logits"):
            for sync_on_step in (False, True):
                results[("reference", name, kind, sync_on_step)] = _reference_case(
                    cls, kind, sync_on_step, rank, world_size
                )
        results[("uneven", name)] = _uneven_case(cls, rank)
        results[("sparse", name)] = _sparse_case(cls, rank, world_size)
        results[("masked", name)] = _masked_case(cls, rank, world_size)
    results["empty"] = _empty_case(rank)
    results["sync_state"] = _sync_state_case(rank, world_size)
    results["sync_unsync"] = _sync_unsync_case(rank)
    results["ddp"] = _ddp_case(rank)
    if with_timeout:
        # Last: a timed-out collective leaves the group unusable.
        results["timeout"] = _timeout_case(rank)
    return results


def _state_numbers(state: Any) -> tuple[float, int, float, int]:
    return (
        float(state.perplexities_sum),
        int(state.num_distributions),
        float(state.perplexities_sum_error),
        int(state.num_distributions_high),
    )


def _reference_case(
    cls: Any, kind: str, sync_on_step: bool, rank: int, world_size: int
) -> dict[str, Any]:
    data = reference_batches(kind)
    metric = cls(dist_sync_on_step=sync_on_step)
    step_values = []
    for index in reference_schedule(world_size, rank, sync_on_step):
        batch = torch.zeros((0, BATCH_SHAPE[1])) if index is None else torch.from_numpy(data[index])
        value = metric(**{kind: batch})
        step_values.append(float(value))
    final = metric.compute()
    return {
        "step_values": step_values,
        "final": float(final),
        "final_dtype": str(final.dtype),
        "final_again": float(metric.compute()),
    }


def _uneven_case(cls: Any, rank: int) -> float:
    metric = cls()
    for batch in uneven_batches(rank):
        metric.update(logits=torch.from_numpy(batch))
    return float(metric.compute())


def _sparse_case(cls: Any, rank: int, world_size: int) -> float:
    metric = cls()
    for batch in sparse_batches(rank, world_size):
        metric.update(probs=torch.from_numpy(batch))
    return float(metric.compute())


def _masked_case(cls: Any, rank: int, world_size: int) -> float:
    metric = cls()
    for logits, mask in masked_batches(rank, world_size):
        metric.update(logits=torch.from_numpy(logits), mask=torch.from_numpy(mask))
    return float(metric.compute())


def _empty_case(rank: int) -> dict[str, Any]:
    import ppl.stateful._metric as metric_module
    from ppl.stateful import Perplexity

    metric_module._warned_empty = False
    metric = Perplexity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = [float(metric.compute()), float(metric.compute())]
    messages = [str(w.message) for w in caught if "empty state" in str(w.message)]
    return {"values": values, "warnings": messages}


def _sync_state_case(rank: int, world_size: int) -> dict[str, Any]:
    from ppl.functional import PerplexityState, perplexity_state_update
    from ppl.stateful import sync_state

    batches = uneven_batches(rank)
    state = None
    for batch in batches:
        state = perplexity_state_update(state, logits=torch.from_numpy(batch))
    assert state is not None
    before = _state_numbers(state)
    synced = sync_state(state, timeout=20.0)
    after = _state_numbers(state)

    # Counts beyond 2**53 (float64's exact integers) and a nonzero high word: exact or not at all.
    huge = PerplexityState(
        torch.tensor(1.5, dtype=torch.float64),
        torch.tensor(2**52 + 2 * rank + 1, dtype=torch.int64),
        torch.tensor(1e-20 * (rank + 1), dtype=torch.float64),
        torch.tensor(rank, dtype=torch.int64),
    )
    huge_synced = sync_state(huge)

    # A group of ranks 0 and 1 only (on a world of 2, a group of rank 0 alone): members sum
    # over it, others are refused.
    members = [0, 1] if world_size > 2 else [0]
    group = dist.new_group(members)
    if rank in members:
        sub = _state_numbers(sync_state(state, group))
        sub_error = None
    else:
        sub = None
        try:
            sync_state(state, group)
            sub_error = "no error"
        except ValueError as error:
            sub_error = str(error)
    return {
        "before": before,
        "after": after,
        "synced": _state_numbers(synced),
        "huge": _state_numbers(huge_synced),
        "members": members,
        "sub": sub,
        "sub_error": sub_error,
    }


def _sync_unsync_case(rank: int) -> dict[str, Any]:
    from ppl.stateful import Perplexity

    metric = Perplexity()
    for batch in uneven_batches(rank):
        metric.update(logits=torch.from_numpy(batch))
    before = _state_numbers(metric.state)
    metric.sync()
    synced = _state_numbers(metric.state)
    compute_synced = float(metric.compute())
    errors = {}
    for label, call in (
        ("sync", metric.sync),
        ("update", lambda: metric.update(logits=torch.zeros(2, 3, dtype=torch.float64))),
    ):
        try:
            call()
            errors[label] = "no error"
        except RuntimeError as error:
            errors[label] = str(error)
    metric.unsync()
    after_unsync = _state_numbers(metric.state)
    with metric.sync_context():
        in_context = _state_numbers(metric.state)
    after_context = _state_numbers(metric.state)
    return {
        "before": before,
        "synced": synced,
        "compute_synced": compute_synced,
        "errors": errors,
        "after_unsync": after_unsync,
        "in_context": in_context,
        "after_context": after_context,
        "compute_after": float(metric.compute()),
    }


def _ddp_case(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    from ppl.stateful import Perplexity

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 5)
            self.metric = Perplexity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.linear(x)
            self.metric.update(logits=logits)
            return logits

    torch.manual_seed(0)
    model = Model()
    wrapped = DistributedDataParallel(model)  # broadcasts buffers before every forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []
    for step in range(3):
        logits = wrapped(torch.from_numpy(ddp_inputs(rank, step)))
        seen.append(logits.detach().double().numpy())
        optimizer.zero_grad()
        logits.square().mean().backward()
        optimizer.step()
    return {"seen": seen, "value": float(model.metric.compute())}


def _timeout_case(rank: int) -> dict[str, Any]:
    from _distributed import mark_group_broken

    from ppl.stateful import Perplexity, SyncTimeoutError

    mark_group_broken()
    if rank != 0:
        # Never joins rank 0's collective, then exits, which is what ends it on rank 0.
        time.sleep(3.0)
        return {}
    metric = Perplexity(sync_timeout=1.0)
    metric.update(logits=torch.zeros(3, 4, dtype=torch.float64))
    before = _state_numbers(metric.state)
    start = time.monotonic()
    try:
        metric.compute()
        outcome: dict[str, Any] = {"raised": None}
    except SyncTimeoutError as error:
        outcome = {
            "raised": type(error).__name__,
            "is_timeout_error": isinstance(error, TimeoutError),
            "message": str(error),
            "rank": error.rank,
            "world_size": error.world_size,
            "timeout": error.timeout,
            "group_ranks": error.group_ranks,
        }
    outcome["elapsed"] = time.monotonic() - start
    outcome["before"] = before
    outcome["after"] = _state_numbers(metric.state)
    # The local state goes on accumulating after the failed sync.
    metric.update(logits=torch.zeros(2, 4, dtype=torch.float64))
    outcome["count_after_update"] = int(metric.num_distributions)
    return outcome
