"""The stateful layer: `forward` against `update`, and `compute` with sync across gloo processes.

Needs `ppl.stateful` (issue 3); where it is missing, `available()` says why and the suite skips
this part. The reference for `forward` is a torchmetrics metric written the way NeMo's is
described (sums of `Categorical(...).perplexity()`, `full_state_update=True`), which makes
torchmetrics run `update` twice per `forward`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

from benchmarks._common import interleaved_medians

SYNC_TIMEOUT_S = 120


def available() -> str | None:
    """None when `ppl.stateful` can be imported, else the reason it cannot."""
    try:
        import ppl.stateful  # noqa: F401
    except ImportError as error:
        return f"ppl.stateful is not available ({error}); the stateful benchmarks are skipped"
    return None


def _nemo_style_metric(validate_args: bool) -> Any:
    import torch
    import torchmetrics

    class NemoStylePerplexity(torchmetrics.Metric):
        full_state_update = True

        def __init__(self) -> None:
            super().__init__()
            self.add_state("perplexities_sum", torch.tensor(0.0, dtype=torch.float64), "sum")
            self.add_state("num_distributions", torch.tensor(0, dtype=torch.int64), "sum")

        def update(self, logits: torch.Tensor) -> None:
            dist = torch.distributions.Categorical(logits=logits, validate_args=validate_args)
            perplexities = dist.perplexity()
            self.perplexities_sum += perplexities.sum().double()
            self.num_distributions += perplexities.numel()

        def compute(self) -> torch.Tensor:
            return self.perplexities_sum / self.num_distributions

    return NemoStylePerplexity()


def forward_vs_update(logits: Any, repeats: int) -> dict[str, Any]:
    """Median seconds of `update` and `forward` on one batch, for ppl's metric and NeMo's way."""
    from ppl.stateful import Perplexity

    ours = Perplexity(validate_args=True)
    ours_fast = Perplexity(validate_args=False)
    reference = _nemo_style_metric(validate_args=False)
    cases = {
        "ppl update": lambda: ours.update(logits=logits),
        "ppl forward": lambda: ours(logits=logits),
        "ppl update (no validation)": lambda: ours_fast.update(logits=logits),
        "ppl forward (no validation)": lambda: ours_fast(logits=logits),
        "reference update": lambda: reference.update(logits),
        "reference forward": lambda: reference(logits),
    }
    medians = interleaved_medians(cases, repeats)
    return {
        "seconds": medians,
        "ppl_forward_over_update": medians["ppl forward"] / medians["ppl update"],
        "ppl_forward_over_update_no_validation": medians["ppl forward (no validation)"]
        / medians["ppl update (no validation)"],
        "reference_forward_over_update": medians["reference forward"] / medians["reference update"],
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sync_across_processes(world_size: int, num_syncs: int) -> dict[str, Any]:
    """Runs `benchmarks._sync_child` on `world_size` gloo processes; returns rank 0's figures."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "benchmarks._sync_child"]
    children = [
        subprocess.Popen(
            [*command, str(rank), str(world_size), str(port), str(num_syncs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=SYNC_TIMEOUT_S)
            if child.returncode != 0:
                raise RuntimeError(f"sync child failed ({child.returncode}): {err[-2000:]}")
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return outputs[0]
