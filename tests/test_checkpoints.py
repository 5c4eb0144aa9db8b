"""Checkpoints: a metric's state survives `state_dict`, `torch.save`, `pickle` and Lightning.

In-process, hypothesis draws a stream of updates and a point at which the metric is saved (as a
`state_dict` through `torch.save` / `torch.load(weights_only=True)`, or pickled); the restored
metric and the original then take the rest of the stream and must end bit for bit equal, and equal
to the float64 reference. A checkpoint whose values are corrupt is refused with the state kept.

Across processes, `_checkpoint_script.py` trains a tiny LightningModule on CPU three ways: without
interruption; with a checkpoint every few steps and a crash (`os._exit`) in the middle of the
second epoch; and resumed from the crashed run's last checkpoint, mid-epoch. The resumed run must
end with exactly the uninterrupted run's values, having trained on exactly the batches it missed.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests._reliability import hypothesis_settings
from tests._session import run_in_own_session
from tests.reference import reference_row_perplexities

torch = pytest.importorskip("torch")
from ppl import PerplexityState  # noqa: E402
from ppl.stateful import Perplexity  # noqa: E402  (needs torch)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_checkpoint_script.py")
FIELDS = PerplexityState._fields


def make_metric(cls_name: str):
    if cls_name == "plain":
        return Perplexity()
    pytest.importorskip("torchmetrics")
    from ppl.stateful import TorchmetricsPerplexity

    metric = TorchmetricsPerplexity()
    # torchmetrics leaves metric states out of `state_dict` unless asked (see the README).
    metric.persistent(True)
    return metric


def state_of(metric) -> tuple:
    return tuple(getattr(metric, name).item() for name in FIELDS)


def save_and_restore(metric, cls_name: str, how: str):
    if how == "pickle":
        return pickle.loads(pickle.dumps(metric))
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    restored = make_metric(cls_name)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    return restored


@st.composite
def update_streams(draw: st.DrawFn) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Up to 6 updates of float32 probs or logits, `[rows, 4]`, some with masks."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["probs", "logits"]))
        rows = draw(st.integers(0, 5))
        values = rng.standard_normal((rows, 4)) * 3
        if kind == "probs":
            values = np.exp(values)
        mask = rng.random(rows) < 0.7 if draw(st.booleans()) else None
        updates.append((kind, values.astype(np.float32), mask))
    return updates


def feed(metric, updates) -> None:
    for kind, values, mask in updates:
        torch_mask = None if mask is None else torch.from_numpy(mask)
        metric.update(**{kind: torch.from_numpy(values)}, mask=torch_mask)


def reference_of(updates) -> tuple[float, int]:
    rows = []
    for kind, values, mask in updates:
        row_values = reference_row_perplexities(**{kind: values})
        rows.append(row_values if mask is None else row_values[mask])
    kept = np.concatenate(rows) if rows else np.zeros(0)
    return (math.fsum(kept) / len(kept) if len(kept) else math.nan), len(kept)


# torchmetrics does not restore its count of `update` calls, so a restored drop-in that is
# computed before any further update warns that it was never updated (its state is intact).
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")
@hypothesis_settings(max_examples=25)
@given(
    updates=update_streams(),
    cut=st.integers(0, 6),
    cls_name=st.sampled_from(["plain", "dropin"]),
    how=st.sampled_from(["state_dict", "pickle"]),
)
def test_a_saved_and_restored_metric_ends_bit_for_bit_as_the_original(updates, cut, cls_name, how):
    original = make_metric(cls_name)
    feed(original, updates[:cut])
    restored = save_and_restore(original, cls_name, how)
    assert state_of(restored) == state_of(original)

    feed(original, updates[cut:])
    feed(restored, updates[cut:])
    assert state_of(restored) == state_of(original)
    expected, count = reference_of(updates)
    assert int(restored.num_distributions) == count
    if count:
        value = float(restored.compute())
        assert value == float(original.compute())
        assert value == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("cls_name", ["plain", "dropin"])
@pytest.mark.parametrize("how", ["state_dict", "pickle"])
def test_a_state_past_2_to_the_32_with_a_rounding_error_survives_exactly(cls_name, how):
    metric = make_metric(cls_name)
    count = 2**32 + 2**31 + 7
    state = {
        "perplexities_sum": torch.tensor(3.0 * count + 0.5, dtype=torch.float64),
        "num_distributions": torch.tensor(count, dtype=torch.int64),
        "perplexities_sum_error": torch.tensor(2.0**-40, dtype=torch.float64),
        "num_distributions_high": torch.tensor(0, dtype=torch.int64),
    }
    metric.load_state_dict(state)
    restored = save_and_restore(metric, cls_name, how)
    assert state_of(restored) == tuple(value.item() for value in state.values())
    restored.update(logits=torch.zeros(3, 4))
    assert int(restored.num_distributions) == count + 3


CORRUPT_VALUES = [
    pytest.param("perplexities_sum", float("nan"), id="nan-sum"),
    pytest.param("perplexities_sum", float("inf"), id="inf-sum"),
    pytest.param("perplexities_sum_error", float("nan"), id="nan-error"),
    pytest.param("num_distributions", -3, id="negative-count"),
    pytest.param("num_distributions_high", -1, id="negative-high-word"),
]


@pytest.mark.parametrize(("key", "value"), CORRUPT_VALUES)
def test_a_checkpoint_with_corrupt_values_is_refused_and_the_state_kept(key, value):
    metric = Perplexity()
    metric.update(logits=torch.zeros(3, 4))
    saved = metric.state_dict()
    corrupt = dict(saved)
    corrupt[key] = torch.tensor(value, dtype=saved[key].dtype)

    target = Perplexity()
    target.update(probs=torch.tensor([[0.5, 0.5]]))
    before = state_of(target)
    with pytest.raises(RuntimeError, match=rf"`{key}`"):
        target.load_state_dict(corrupt)
    assert state_of(target) == before
    assert math.isfinite(float(target.compute()))


def test_a_nan_sum_saved_with_validation_off_loads_into_a_metric_without_validation():
    # With validation off a NaN may be in the state by design; such a checkpoint stays loadable.
    metric = Perplexity(validate_args=False)
    metric.update(logits=torch.tensor([[0.0, float("nan")]]))
    unchecked = Perplexity(validate_args=False)
    unchecked.load_state_dict(metric.state_dict())
    assert math.isnan(float(unchecked.compute()))


def test_torchmetrics_states_stay_out_of_the_state_dict_unless_persistent():
    # torchmetrics' default, kept by the drop-in: a checkpoint holds its state only after
    # `persistent(True)`. The README states it; this test keeps the statement true.
    pytest.importorskip("torchmetrics")
    from ppl.stateful import TorchmetricsPerplexity

    metric = TorchmetricsPerplexity()
    metric.update(logits=torch.zeros(3, 4))
    assert dict(metric.state_dict()) == {}
    metric.persistent(True)
    assert int(metric.state_dict()["num_distributions"]) == 3


# --- Lightning, mid-epoch ------------------------------------------------------------------------

LIGHTNING_TIMEOUT_S = 240


def run_script(mode: str, folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return run_in_own_session(
        [sys.executable, str(SCRIPT), mode, str(folder)],
        cwd=folder,
        env=env,
        timeout=LIGHTNING_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    pytest.importorskip("lightning")
    import _checkpoint_script as script

    folder = tmp_path_factory.mktemp("mid-epoch")
    crashed = run_script("crash", folder)
    assert crashed.returncode == script.CRASH_EXIT_CODE, crashed.stdout[-6000:]
    finished = run_script("resume-and-uninterrupted", folder)
    assert finished.returncode == 0, finished.stdout[-6000:]
    return script, json.loads((folder / "results.json").read_text())


def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_values(lightning_runs):
    script, results = lightning_runs
    uninterrupted, resumed = results["uninterrupted"], results["resumed"]

    # The crash came mid-epoch, after the checkpoint of its last completed step.
    assert results["checkpoint"]["epoch"] == 1
    assert 0 < results["checkpoint"]["batch_in_epoch"] < script.BATCHES_PER_EPOCH
    # The resumed run trained on exactly the batches the crashed one had not.
    assert resumed["batches_seen"] == uninterrupted["batches_seen"][script.CRASH_AFTER_STEPS :]

    for name in ("plain", "dropin"):
        assert resumed["final"][name] == uninterrupted["final"][name]
        assert resumed["count"][name] == uninterrupted["count"][name]
    assert resumed["epoch_values"][-1] == uninterrupted["epoch_values"][-1]

    data = script.make_data()
    rows = np.concatenate(
        [reference_row_perplexities(logits=data * (1 + epoch)) for epoch in range(script.EPOCHS)]
    )
    assert uninterrupted["count"]["plain"] == len(rows)
    assert uninterrupted["final"]["plain"] == pytest.approx(math.fsum(rows) / len(rows), rel=2e-6)
