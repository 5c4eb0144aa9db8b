"""Faults across processes: a rank that dies, raises or never joins never hangs the others.

Each scenario spawns a fresh gloo group on 127.0.0.1 (a failed collective leaves a group
unusable), with every sync waiting `SYNC_TIMEOUT_S` at most. The surviving ranks must raise
`ppl.stateful.SyncError` (`SyncTimeoutError` when the others simply never come) within a bounded
time, name their rank, keep their local state exactly as it was (checked against the float64
reference of the data each rank saw), stay unsynced, and go on counting. The ranks that fail on
purpose must have ended as planned, and every child is reaped by the harness.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fault_cases import (
    DEATH_EXIT_CODE,
    SYNC_TIMEOUT_S,
    absent_rank_case,
    dead_rank_case,
    local_batches,
    raising_rank_case,
    run_with_faults,
)
from reference import reference_row_perplexities

pytest.importorskip("torch.distributed")

# A sync that fails because a peer is gone must end within the sync timeout and this much more
# (the time to see the connection close and to raise); one whose peers never come, no earlier
# than the timeout.
SLACK_S = 3.0
HARNESS_TIMEOUT_S = 60.0


def expected_local(rank: int) -> tuple[float, int]:
    rows = np.concatenate([reference_row_perplexities(logits=b) for b in local_batches(rank)])
    return math.fsum(rows) / len(rows), len(rows)


def check_survivor(rank: int, outcome: dict, world_size: int, timed_out: bool) -> None:
    assert isinstance(outcome, dict) and "raised" in outcome, f"rank {rank}: {outcome}"
    assert outcome["raised"] is not None, f"rank {rank}: the sync returned instead of failing"
    assert "SyncError" in outcome["mro"], f"rank {rank} raised {outcome['raised']}: {outcome}"
    if timed_out:
        assert outcome["raised"] == "SyncTimeoutError"
        assert "TimeoutError" in outcome["mro"]
        assert outcome["elapsed"] >= 0.9 * SYNC_TIMEOUT_S
        assert outcome["attributes"]["timeout"] == SYNC_TIMEOUT_S
        assert f"waited {SYNC_TIMEOUT_S:g} s" in outcome["message"]
    assert outcome["elapsed"] <= SYNC_TIMEOUT_S + SLACK_S, f"rank {rank} hung: {outcome}"
    assert f"rank {rank}" in outcome["message"]
    assert outcome["attributes"]["rank"] == rank
    assert outcome["attributes"]["world_size"] == world_size
    assert "unchanged" in outcome["message"]

    # Nothing lost: the local state is exactly what it was, and what the rank saw.
    assert outcome["after"] == outcome["before"]
    value, count = expected_local(rank)
    assert outcome["before"]["count"] == count
    assert outcome["before"]["value"] == pytest.approx(value, rel=2e-6)
    assert outcome["is_synced"] is False
    assert outcome["count_after_update"] == count + 2


def run(world_size: int, worker, *args):
    return run_with_faults(world_size, worker, *args, timeout=HARNESS_TIMEOUT_S)


SLOW = pytest.mark.slow

DEAD_CASES = [
    pytest.param(3, "plain", "compute", "before", id="w3-plain-compute-dies-before", marks=SLOW),
    pytest.param(3, "plain", "compute", "during", id="w3-plain-compute-dies-during"),
    pytest.param(2, "dropin", "compute", "before", id="w2-dropin-compute-dies-before"),
    pytest.param(3, "dropin", "compute", "during", id="w3-dropin-compute-dies-during", marks=SLOW),
    pytest.param(3, "plain", "sync", "during", id="w3-plain-sync-dies-during", marks=SLOW),
    pytest.param(2, "plain", "sync_state", "before", id="w2-sync_state-dies-before", marks=SLOW),
]


@pytest.mark.parametrize(("world_size", "cls_name", "how", "when"), DEAD_CASES)
def test_a_rank_that_dies_makes_the_others_fail_promptly_with_their_state_intact(
    world_size, cls_name, how, when
):
    results, exit_codes = run(world_size, dead_rank_case, cls_name, how, when)
    assert exit_codes[1] == DEATH_EXIT_CODE and results[1] is None, (exit_codes, results[1])
    for rank in range(world_size):
        if rank != 1:
            assert exit_codes[rank] == 0, (rank, exit_codes, results[rank])
            check_survivor(rank, results[rank], world_size, timed_out=False)


RAISE_CASES = [
    pytest.param(2, "dropin", "compute", id="w2-dropin-compute"),
    pytest.param(3, "plain", "sync_state", id="w3-sync_state", marks=SLOW),
]


@pytest.mark.parametrize(("world_size", "cls_name", "how"), RAISE_CASES)
def test_a_rank_that_raises_before_the_sync_makes_the_others_fail_promptly(
    world_size, cls_name, how
):
    results, exit_codes = run(world_size, raising_rank_case, cls_name, how)
    # The raising rank's exception ended its worker (the harness records it and exits).
    assert exit_codes[1] == 0
    assert "error" in results[1] and "ValueError" in results[1]["error"], results[1]
    assert "`logits` must not hold NaN" in results[1]["error"]
    for rank in range(world_size):
        if rank != 1:
            check_survivor(rank, results[rank], world_size, timed_out=False)


ABSENT_CASES = [
    pytest.param(3, "plain", "compute", id="w3-plain-compute"),
    pytest.param(2, "dropin", "compute", id="w2-dropin-compute"),
    pytest.param(2, "plain", "sync_state", id="w2-sync_state", marks=SLOW),
]


@pytest.mark.parametrize(("world_size", "cls_name", "how"), ABSENT_CASES)
def test_a_rank_alone_in_compute_is_told_after_the_timeout_it_set(world_size, cls_name, how):
    results, exit_codes = run(world_size, absent_rank_case, cls_name, how)
    check_survivor(0, results[0], world_size, timed_out=True)
    for rank in range(1, world_size):
        # The ranks that never synced kept their own state, exactly.
        value, count = expected_local(rank)
        assert results[rank]["count"] == count
        assert results[rank]["value"] == pytest.approx(value, rel=2e-6)
        assert exit_codes[rank] == 0
