"""Faults injected into gloo groups: the scenarios, and a harness that lets ranks die.

`run_with_faults` is `tests/_distributed.run_in_processes` without its fail-fast: a rank that
dies on purpose must not take the others down with it, since what the survivors report is what
the tests check. It still waits under a deadline, kills every child that outlives it, and reaps
them all. Each child runs `_distributed._child`, which sets up the group, writes the worker's
result (or traceback) to a file and leaves with `os._exit`.

Every worker is one scenario: some ranks fail (exit abruptly, raise, or never join), the others
call a sync and record what it raised, how long it took, and their local state afterwards. The
local data are seeded by rank, so the parent recomputes each rank's expected local value from the
float64 reference.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import torch

# How long a scenario's syncs wait for the others; the tests bound each sync's time by it.
SYNC_TIMEOUT_S = 2.0
# Exit status of a rank that dies on purpose (an `os._exit`, as a crash or a kill would leave).
DEATH_EXIT_CODE = 17
BATCHES_PER_RANK = 3


def local_batches(rank: int) -> list[np.ndarray]:
    """The float32 logits a rank adds before the scenario's sync: 3 batches of `[4 + rank, 6]`."""
    rng = np.random.default_rng(600 + rank)
    return [
        (3.0 * rng.standard_normal((4 + rank, 6))).astype(np.float32)
        for _ in range(BATCHES_PER_RANK)
    ]


def run_with_faults(
    world_size: int, worker: Any, *args: Any, timeout: float = 60.0
) -> tuple[list[Any], list[int | None]]:
    """Runs `worker(rank, world_size, *args)` on a gloo group; returns results and exit codes.

    A result is the worker's return value, `{"error": traceback}` for a worker that raised, or
    None for a rank that left no result (it died). Exit codes are None for a child still alive at
    the deadline (it is then killed).
    """
    from _distributed import _read, spawned_group

    with spawned_group(world_size, worker, args) as (processes, outputs):
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        exit_codes = [process.exitcode for process in processes]
        raw = [_read(path) for path in outputs]
    results = [None if r is None else r.get("ok", r) for r in raw]
    return results, exit_codes


def _metric(cls_name: str) -> Any:
    from ppl.stateful import Perplexity, TorchmetricsPerplexity

    if cls_name == "plain":
        return Perplexity(sync_timeout=SYNC_TIMEOUT_S)
    return TorchmetricsPerplexity(sync_timeout=SYNC_TIMEOUT_S)


def _filled_metric(cls_name: str, rank: int) -> Any:
    metric = _metric(cls_name)
    for batch in local_batches(rank):
        metric.update(logits=torch.from_numpy(batch))
    return metric


def _local_numbers(metric: Any) -> dict[str, Any]:
    """The metric's local state, exactly, and its value computed without any collective."""
    from ppl.functional import PerplexityState, perplexity_compute

    state = PerplexityState(*(getattr(metric, name) for name in PerplexityState._fields))
    return {
        "sum": float(state.perplexities_sum),
        "error": float(state.perplexities_sum_error),
        "count": int(state.num_distributions) + (int(state.num_distributions_high) << 32),
        "value": float(perplexity_compute(state)),
    }


def _attempt_sync(metric: Any, how: str) -> dict[str, Any]:
    """Runs one sync of `metric` (`compute`, `sync` or `sync_state`); records what happened."""
    from ppl.functional import PerplexityState
    from ppl.stateful import sync_state

    before = _local_numbers(metric)
    start = time.monotonic()
    outcome: dict[str, Any] = {"raised": None}
    try:
        if how == "compute":
            outcome["returned"] = float(metric.compute())
        elif how == "sync":
            metric.sync()
        else:
            state = PerplexityState(*(getattr(metric, name) for name in PerplexityState._fields))
            sync_state(state, timeout=SYNC_TIMEOUT_S)
    except BaseException as error:  # any failure is recorded for the parent
        outcome.update(
            raised=type(error).__name__,
            mro=[cls.__name__ for cls in type(error).__mro__],
            message=str(error),
            attributes={
                key: getattr(error, key, None)
                for key in ("rank", "global_rank", "world_size", "group_ranks", "timeout")
            },
        )
    outcome["elapsed"] = time.monotonic() - start
    outcome["before"] = before
    outcome["after"] = _local_numbers(metric)
    # `Perplexity.is_synced`, or torchmetrics' private flag on the drop-in.
    synced = getattr(metric, "is_synced", None)
    outcome["is_synced"] = synced if isinstance(synced, bool) else metric._is_synced
    # The metric goes on working locally: one more batch of 2 rows is counted.
    metric.update(logits=torch.zeros(2, 6))
    outcome["count_after_update"] = _local_numbers(metric)["count"]
    return outcome


def _die_in(seconds: float) -> None:
    """Ends this process abruptly after `seconds`, wherever its main thread is (a crash)."""
    timer = threading.Timer(seconds, os._exit, args=(DEATH_EXIT_CODE,))
    timer.daemon = True
    timer.start()


def dead_rank_case(rank: int, world_size: int, cls_name: str, how: str, when: str) -> Any:
    """Rank 1 dies, `before` the sync or `during` it (blocked inside the collective)."""
    from _distributed import mark_group_broken

    mark_group_broken()
    metric = _filled_metric(cls_name, rank)
    if rank == 1:
        if when == "before":
            os._exit(DEATH_EXIT_CODE)
        # Inside the collective, waiting for the last rank, which joins late.
        _die_in(0.5)
        _attempt_sync(metric, how)
        time.sleep(60)  # not reached: the timer ends the process first
    if when == "during" and rank == world_size - 1:
        time.sleep(1.5)  # joins after rank 1 has died inside the collective
    return _attempt_sync(metric, how)


def raising_rank_case(rank: int, world_size: int, cls_name: str, how: str) -> Any:
    """Rank 1 raises on an invalid batch before the sync, and lets the exception end it."""
    from _distributed import mark_group_broken

    mark_group_broken()
    metric = _filled_metric(cls_name, rank)
    if rank == 1:
        bad = torch.from_numpy(local_batches(rank)[0]).clone()
        bad[0, 0] = float("nan")
        metric.update(logits=bad)  # raises ValueError: the worker, and this rank, fail here
    return _attempt_sync(metric, how)


def absent_rank_case(rank: int, world_size: int, cls_name: str, how: str) -> Any:
    """Rank 0 syncs; the others never do (they stay alive past the timeout, then leave)."""
    from _distributed import mark_group_broken

    mark_group_broken()
    metric = _filled_metric(cls_name, rank)
    if rank != 0:
        time.sleep(SYNC_TIMEOUT_S + 1.0)
        return _local_numbers(metric)
    return _attempt_sync(metric, how)
