"""`Perplexity`, `TorchmetricsPerplexity` and `sync_state` on gloo groups of 2 and 3 processes.

One spawned group per world size runs every case (`_distributed_cases.all_cases`); each test here
checks one case's results against the float64 reference over the data of all ranks together and
against `torch.distributions.Categorical`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _distributed import run_in_processes
from _distributed_cases import (
    NUM_BATCHES,
    all_cases,
    ddp_inputs,
    masked_batches,
    reference_batches,
    reference_schedule,
    sparse_batches,
    uneven_batches,
)
from reference import reference_perplexity

WORLD_SIZES = (2, 3)
CLASSES = ("plain", "dropin")


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group(request):
    world_size = request.param
    results = run_in_processes(world_size, all_cases, world_size == 2, timeout=150.0)
    return world_size, results


def categorical_mean(kind: str, batches: np.ndarray) -> float:
    values = torch.from_numpy(batches.astype(np.float64))
    return float(torch.distributions.Categorical(**{kind: values}).perplexity().mean())


@pytest.mark.parametrize("sync_on_step", [False, True], ids=["local_step", "sync_on_step"])
@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("name", CLASSES)
def test_reference_case(group, name, kind, sync_on_step):
    world_size, results = group
    data = reference_batches(kind)
    everything = data.reshape(-1, data.shape[-1])
    expected = reference_perplexity(**{kind: everything})
    assert expected == pytest.approx(categorical_mean(kind, everything), rel=1e-12)

    for rank, result in enumerate(results):
        case = result[("reference", name, kind, sync_on_step)]
        schedule = reference_schedule(world_size, rank, sync_on_step)
        assert len(case["step_values"]) == len(schedule)
        for step, (index, value) in enumerate(zip(schedule, case["step_values"], strict=True)):
            if sync_on_step:
                # Every rank's batch of this step, wherever it was computed.
                indices = [i for i in range(step * world_size, (step + 1) * world_size)]
                step_data = data[[i for i in indices if i < NUM_BATCHES]]
                want = reference_perplexity(**{kind: step_data.reshape(-1, data.shape[-1])})
            else:
                want = reference_perplexity(**{kind: data[index]})
            # float32 inputs are computed in float32: relative error near 1e-6.
            assert value == pytest.approx(want, rel=2e-6), (rank, step)
        assert case["final"] == pytest.approx(expected, rel=2e-6), rank
        assert case["final_again"] == case["final"]
        assert case["final_dtype"] == "torch.float64"
    # Every rank computes the same global value, bit for bit.
    finals = {result[("reference", name, kind, sync_on_step)]["final"] for result in results}
    assert len(finals) == 1


@pytest.mark.parametrize("name", CLASSES)
def test_uneven_batches(group, name):
    world_size, results = group
    rows = np.concatenate([b for rank in range(world_size) for b in uneven_batches(rank)])
    expected = reference_perplexity(logits=rows)
    assert expected == pytest.approx(categorical_mean("logits", rows), rel=1e-12)
    for result in results:
        assert result[("uneven", name)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", CLASSES)
def test_rank_without_data(group, name):
    world_size, results = group
    rows = np.concatenate(
        [b for rank in range(world_size) for b in sparse_batches(rank, world_size)]
    )
    expected = reference_perplexity(probs=rows)
    assert expected == pytest.approx(categorical_mean("probs", rows), rel=1e-12)
    for result in results:
        assert result[("sparse", name)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", CLASSES)
def test_masks(group, name):
    world_size, results = group
    pairs = [p for rank in range(world_size) for p in masked_batches(rank, world_size)]
    logits = np.concatenate([logits.reshape(-1, 6) for logits, _ in pairs])
    mask = np.concatenate([mask.reshape(-1) for _, mask in pairs])
    expected = reference_perplexity(logits=logits, mask=mask)
    assert math.isfinite(expected)
    for result in results:
        assert result[("masked", name)] == pytest.approx(expected, rel=1e-12)


def test_empty_everywhere_is_nan_and_warns_once_on_rank_zero(group):
    _, results = group
    for rank, result in enumerate(results):
        assert all(math.isnan(v) for v in result["empty"]["values"])
        assert len(result["empty"]["warnings"]) == (1 if rank == 0 else 0), rank


def test_sync_state_from_a_custom_loop(group):
    world_size, results = group
    rows = np.concatenate([b for rank in range(world_size) for b in uneven_batches(rank)])
    expected = reference_perplexity(logits=rows)
    for rank, result in enumerate(results):
        case = result["sync_state"]
        assert case["after"] == case["before"], "sync_state modified its argument"
        local_rows = np.concatenate(uneven_batches(rank))
        assert case["before"][1] == local_rows.shape[0]
        total, count, error, high = case["synced"]
        assert (count, high) == (rows.shape[0], 0)
        assert (total + error) / count == pytest.approx(expected, rel=1e-12)


def test_sync_state_count_is_exact_beyond_float64_integers(group):
    world_size, results = group
    expected_count = sum(2**52 + 2 * r + 1 + r * 2**32 for r in range(world_size))
    expected_error = sum(1e-20 * (r + 1) for r in range(world_size))
    for result in results:
        total, count, error, high = result["sync_state"]["huge"]
        assert high * 2**32 + count == expected_count
        assert total == 1.5 * world_size
        assert error == pytest.approx(expected_error, rel=1e-15)


def test_sync_state_over_a_subgroup(group):
    _, results = group
    members = results[0]["sync_state"]["members"]
    rows = np.concatenate([b for rank in members for b in uneven_batches(rank)])
    for rank, result in enumerate(results):
        case = result["sync_state"]
        if rank in members:
            assert case["sub"][1] == rows.shape[0]
            total, count, error, _ = case["sub"]
            assert (total + error) / count == pytest.approx(
                reference_perplexity(logits=rows), rel=1e-12
            )
        else:
            assert "does not contain this process" in case["sub_error"]


def test_sync_unsync_and_sync_context(group):
    world_size, results = group
    rows = np.concatenate([b for rank in range(world_size) for b in uneven_batches(rank)])
    expected = reference_perplexity(logits=rows)
    for rank, result in enumerate(results):
        case = result["sync_unsync"]
        assert case["before"][1] == np.concatenate(uneven_batches(rank)).shape[0]
        assert case["synced"][1] == rows.shape[0]
        assert case["compute_synced"] == pytest.approx(expected, rel=1e-12)
        assert "already synced" in case["errors"]["sync"]
        assert "call unsync() first" in case["errors"]["update"]
        # Exactly the local state again, bit for bit.
        assert case["after_unsync"] == case["before"]
        assert case["in_context"] == case["synced"]
        assert case["after_context"] == case["before"]
        assert case["compute_after"] == case["compute_synced"]


def test_metric_inside_distributed_data_parallel(group):
    # DDP broadcasts rank 0's registered buffers before every forward; the metric's state must
    # not be among them, or every rank would end up with rank 0's counts.
    world_size, results = group
    seen = np.concatenate([logits for result in results for logits in result["ddp"]["seen"]])
    assert seen.shape[0] == sum(3 * (6 + rank) for rank in range(world_size))
    for rank, result in enumerate(results):
        for step, logits in enumerate(result["ddp"]["seen"]):
            assert logits.shape[0] == ddp_inputs(rank, step).shape[0]
        assert result["ddp"]["value"] == pytest.approx(reference_perplexity(logits=seen), rel=1e-6)


def test_sync_timeout_names_the_rank_and_keeps_the_state(group):
    world_size, results = group
    if world_size != 2:
        pytest.skip("the timeout case runs on the group of 2 only")
    case = results[0]["timeout"]
    assert case["raised"] == "SyncTimeoutError"
    assert case["is_timeout_error"]
    assert (case["rank"], case["world_size"], case["timeout"]) == (0, 2, 1.0)
    assert case["group_ranks"] == [0, 1]
    for words in (
        "rank 0",
        "global ranks [0, 1]",
        "gloo",
        "waited 1 s",
        "local state is unchanged",
    ):
        assert words in case["message"]
    assert 1.0 <= case["elapsed"] < 10.0
    assert case["after"] == case["before"]
    assert case["count_after_update"] == 5
