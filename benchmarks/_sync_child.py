"""One rank of the sync benchmark: `python -m benchmarks._sync_child RANK WORLD PORT SYNCS`.

Counts every collective the process issues by wrapping the `torch.distributed` functions that
issue one, and times `Perplexity.compute()` (which syncs), `sync_state` alone, and a torchmetrics
metric written NeMo's way. Prints one JSON object.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "gather",
    "scatter",
    "barrier",
)
counts: dict[str, int] = {}


def _count_collectives() -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, __name=name, __original=original, **kwargs):
            counts[__name] = counts.get(__name, 0) + 1
            return __original(*args, **kwargs)

        setattr(dist, name, counted)
        # Modules that did `from torch.distributed import all_reduce` keep the original.
        distributed_c10d = sys.modules.get("torch.distributed.distributed_c10d")
        if distributed_c10d is not None and getattr(distributed_c10d, name, None) is original:
            setattr(distributed_c10d, name, counted)


def _timed(function, repeats: int) -> tuple[float, dict[str, int]]:
    function()
    dist.barrier()
    counts.clear()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    elapsed = (time.perf_counter() - start) / repeats
    per_call = {name: count / repeats for name, count in counts.items()}
    return elapsed, per_call


def main() -> None:
    rank, world, port, repeats = (int(arg) for arg in sys.argv[1:5])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    _count_collectives()
    from benchmarks._stateful import _nemo_style_metric
    from ppl.stateful import Perplexity, sync_state

    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(rank))
    metric = Perplexity()
    metric.update(logits=logits)
    reference = _nemo_style_metric(validate_args=False)
    reference.update(logits)

    compute_s, compute_calls = _timed(metric.compute, repeats)
    sync_s, sync_calls = _timed(lambda: sync_state(metric.state), repeats)

    def reference_compute() -> None:
        reference._computed = None  # torchmetrics caches compute(); force a sync every time
        reference.compute()

    reference_s, reference_calls = _timed(reference_compute, repeats)
    dist.barrier()
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "world_size": world,
                "syncs_timed": repeats,
                "compute_seconds": compute_s,
                "compute_collectives": compute_calls,
                "sync_state_seconds": sync_s,
                "sync_state_collectives": sync_calls,
                "reference_compute_seconds": reference_s,
                "reference_compute_collectives": reference_calls,
            }
        )
    )


if __name__ == "__main__":
    main()
