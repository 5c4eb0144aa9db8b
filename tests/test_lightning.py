"""A real `lightning.Trainer` with `strategy="ddp"` on 2 CPU processes, checked from outside.

The Trainer runs in `_lightning_script.py`, a subprocess in its own session (Lightning's launcher
starts rank 1 as a further subprocess), bounded by a timeout after which the whole session is
killed. Every value must equal the float64 reference computed here, in one process, over the
whole data set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from _session import run_in_own_session
from reference import reference_perplexity

pytest.importorskip("lightning")

SCRIPT = Path(__file__).with_name("_lightning_script.py")
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lightning")
    rng = np.random.default_rng(7)
    # 48 and 40 rows split evenly over 2 ranks in batches of 4: no sampler padding.
    data = {
        "train": (2.0 * rng.standard_normal((48, 5))).astype(np.float32),
        "val": (2.0 * rng.standard_normal((40, 5))).astype(np.float32),
    }
    np.savez(folder / "data.npz", **data)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)  # Lightning then picks a free port itself
    # The launcher's child (rank 1) shares the session, so it is killed with the launcher.
    result = run_in_own_session(
        [sys.executable, str(SCRIPT), str(folder / "data.npz"), str(folder)],
        cwd=folder,
        env=env,
        timeout=TIMEOUT_S,
    )
    ranks = [folder / f"rank{rank}.json" for rank in range(2)]
    if result.returncode != 0 or not all(path.exists() for path in ranks):
        pytest.fail(f"Lightning run failed (exit {result.returncode}):\n{result.stdout[-6000:]}")
    return data, [json.loads(path.read_text()) for path in ranks]


def records(result, name):
    return {r["epoch"]: r["value"] for r in result["records"] if r["name"] == name}


def test_plain_metric_computed_and_logged_at_epoch_end(run):
    data, results = run
    expected = reference_perplexity(logits=data["val"])
    for result in results:
        assert result["world_size"] == 2
        values = records(result["a"], "val_plain")
        assert sorted(values) == [0, 1]
        for value in values.values():
            assert value == pytest.approx(expected, rel=2e-6)
        assert result["a"]["callback"]["val_ppl_plain"] == pytest.approx(expected, rel=2e-6)


def test_dropin_logged_with_self_log(run):
    data, results = run
    expected = reference_perplexity(logits=data["val"])
    for result in results:
        assert result["a"]["callback"]["val_ppl_dropin"] == pytest.approx(expected, rel=2e-6)
        assert result["a"]["callback_dtypes"]["val_ppl_dropin"] == "torch.float64"


def test_running_metric_over_epochs(run):
    data, results = run
    train = data["train"].astype(np.float64)
    first = reference_perplexity(logits=train)
    both = reference_perplexity(logits=np.concatenate([train, 2.0 * train]))
    for result in results:
        values = records(result["a"], "train_running")
        assert values[0] == pytest.approx(first, rel=2e-6)
        assert values[1] == pytest.approx(both, rel=2e-6)


def test_resume_from_checkpoint_gives_the_same_final_value(run):
    data, results = run
    train = data["train"].astype(np.float64)
    both = reference_perplexity(logits=np.concatenate([train, 2.0 * train]))
    for result in results:
        assert records(result["b"], "train_running")[0] == records(result["a"], "train_running")[0]
        resumed = records(result["c"], "train_running")
        assert sorted(resumed) == [1]
        assert resumed[1] == records(result["a"], "train_running")[1]
        assert resumed[1] == pytest.approx(both, rel=2e-6)
        assert records(result["c"], "val_plain")[1] == records(result["a"], "val_plain")[1]
    # Rank 0 restored the group's 48 rows of epoch 0; each rank then added its 24 of epoch 1.
    assert [result["c"]["local_count"] for result in results] == [72, 24]
