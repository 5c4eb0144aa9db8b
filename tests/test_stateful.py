"""`ppl.stateful` in one process: values, state handling, round trips, errors and sync bookkeeping.

Every value is checked against the float64 reference of `tests/reference.py` (and
`torch.distributions.Categorical`); state round trips are checked bit for bit.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from reference import reference_perplexity

import ppl.stateful._metric as metric_module
from ppl.functional import PerplexityState, perplexity_state_update
from ppl.stateful import Perplexity, SyncTimeoutError, TorchmetricsPerplexity, sync_state

CLASSES = [Perplexity, TorchmetricsPerplexity]


def numbers(state):
    return tuple((t.dtype, t.item()) for t in state)


def metric_state(metric):
    return PerplexityState(*(getattr(metric, name) for name in PerplexityState._fields))


def batches(seed=0, count=5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(2.0 * rng.standard_normal((4 + i, 6))).astype(dtype) for i in range(count)]


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(metric_module, "_warned_empty", False)


def test_imports_stay_lazy():
    code = (
        "import sys, ppl; assert 'torch' not in sys.modules and 'jax' not in sys.modules; "
        "import ppl.stateful; assert 'torch' in sys.modules; "
        "assert 'torchmetrics' not in sys.modules and 'lightning' not in sys.modules; "
        "ppl.stateful.TorchmetricsPerplexity; assert 'torchmetrics' in sys.modules; "
        "assert 'lightning' not in sys.modules and 'jax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("cls", CLASSES)
def test_value_matches_references(cls):
    data = batches()
    metric = cls()
    for batch in data:
        metric.update(logits=torch.from_numpy(batch))
    rows = np.concatenate(data)
    value = metric.compute()
    assert value.dtype == torch.float64 and value.shape == ()
    assert float(value) == pytest.approx(reference_perplexity(logits=rows), rel=1e-12)
    categorical = torch.distributions.Categorical(logits=torch.from_numpy(rows))
    assert float(value) == pytest.approx(float(categorical.perplexity().mean()), rel=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_positional_constructor_as_nemo(cls):
    metric = cls(False, None, False)
    assert metric.dist_sync_on_step is False and metric.validate_args is False


@pytest.mark.parametrize("cls", CLASSES)
def test_forward_returns_the_batch_and_keeps_the_same_state_as_update(cls):
    forwarded, updated = cls(), cls()
    for batch in batches(dtype=np.float32):
        value = forwarded(probs=torch.from_numpy(np.exp(batch)))
        updated.update(probs=torch.from_numpy(np.exp(batch)))
        assert float(value) == pytest.approx(reference_perplexity(probs=np.exp(batch)), rel=2e-6)
    assert numbers(metric_state(forwarded)) == numbers(metric_state(updated))
    assert float(forwarded.compute()) == float(updated.compute())


@pytest.mark.parametrize("sync_on_step", [False, True])
@pytest.mark.parametrize("cls", CLASSES)
def test_forward_computes_the_batch_once(cls, sync_on_step, monkeypatch):
    module = sys.modules[cls.__module__]
    calls = []
    original = module.perplexity_state_update

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "perplexity_state_update", counting)
    metric = cls(dist_sync_on_step=sync_on_step)
    metric(logits=torch.zeros(3, 4))
    assert len(calls) == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_inputs_are_detached(cls):
    logits = torch.randn(5, 3, requires_grad=True)
    metric = cls()
    value = metric(logits=logits * 2)
    metric.update(logits=logits)
    assert value.grad_fn is None and not value.requires_grad
    for tensor in metric_state(metric):
        assert tensor.grad_fn is None and not tensor.requires_grad


def test_no_host_read_back_without_validation():
    # Meta tensors hold no values: any read back to the host (`.item()`, `bool()`) raises, so an
    # update that passes on them made none.
    metric = Perplexity(validate_args=False).to("meta")
    logits = torch.empty(64, 10, device="meta")
    metric.update(logits=logits, mask=torch.empty(64, dtype=torch.bool, device="meta"))
    value = metric(logits=logits)
    assert value.device.type == "meta" and metric.perplexities_sum.device.type == "meta"
    checking = Perplexity(validate_args=True).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        checking.update(logits=logits)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "double", "to_float16"])
@pytest.mark.parametrize("cls", CLASSES)
def test_dtype_casts_leave_the_state_exact(cls, cast):
    metric = cls()
    metric.update(logits=torch.from_numpy(batches()[0]))
    before = numbers(metric_state(metric))
    if cast == "to_float16":
        metric.to(torch.float16)
    else:
        getattr(metric, cast)()
    assert numbers(metric_state(metric)) == before


@pytest.mark.parametrize("cls", CLASSES)
def test_device_move_to_meta_keeps_dtypes(cls):
    metric = cls()
    metric.update(logits=torch.zeros(2, 3))
    metric.to("meta")
    state = metric_state(metric)
    assert [t.device.type for t in state] == ["meta"] * 4
    assert [t.dtype for t in state] == [torch.float64, torch.int64, torch.float64, torch.int64]


def test_state_dict_round_trip_is_exact():
    metric = Perplexity()
    for batch in batches(dtype=np.float32):
        metric.update(logits=torch.from_numpy(batch))
    saved = metric.state_dict()
    assert list(saved) == list(PerplexityState._fields)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = Perplexity()
    result = loaded.load_state_dict(torch.load(buffer))
    assert not result.missing_keys and not result.unexpected_keys
    assert numbers(loaded.state) == numbers(metric.state)
    # The loaded copy owns its tensors: updating the original does not change it.
    metric.update(logits=torch.zeros(2, 3))
    assert loaded.num_distributions.item() == saved["num_distributions"].item()


def test_state_dict_inside_a_parent_module():
    parent = torch.nn.Module()
    parent.linear = torch.nn.Linear(2, 2)
    parent.ppl = Perplexity()
    parent.ppl.update(logits=torch.zeros(3, 7, dtype=torch.float64))
    keys = set(parent.state_dict())
    assert {"ppl.perplexities_sum", "ppl.num_distributions", "linear.weight"} <= keys
    other = torch.nn.Module()
    other.linear = torch.nn.Linear(2, 2)
    other.ppl = Perplexity()
    other.load_state_dict(parent.state_dict())
    assert float(other.ppl.compute()) == pytest.approx(7.0, rel=1e-15)


def test_load_state_dict_errors_name_the_key_and_keep_the_state():
    metric = Perplexity()
    metric.update(logits=torch.zeros(2, 3))
    before = numbers(metric.state)
    bad = dict(metric.state_dict())
    bad["num_distributions"] = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match=r"`num_distributions` must be a 0-d torch.int64"):
        metric.load_state_dict(bad)
    missing = dict(metric.state_dict())
    del missing["perplexities_sum_error"]
    with pytest.raises(RuntimeError, match="perplexities_sum_error"):
        metric.load_state_dict(missing)
    assert numbers(metric.state) == before
    result = metric.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["perplexities_sum_error"]
    assert numbers(metric.state) == before


def test_resume_from_a_checkpoint_ends_with_the_same_value():
    data = batches(seed=3, count=10, dtype=np.float32)
    straight = Perplexity()
    for batch in data:
        straight.update(logits=torch.from_numpy(batch))
    first = Perplexity()
    for batch in data[:5]:
        first.update(logits=torch.from_numpy(batch))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = Perplexity()
    resumed.load_state_dict(torch.load(buffer))
    for batch in data[5:]:
        resumed.update(logits=torch.from_numpy(batch))
    assert numbers(resumed.state) == numbers(straight.state)
    assert resumed.compute().item() == straight.compute().item()


@pytest.mark.parametrize("copier", ["pickle", "deepcopy"])
@pytest.mark.parametrize("cls", CLASSES)
def test_pickle_and_deepcopy_round_trip(cls, copier):
    metric = cls()
    metric.update(logits=torch.from_numpy(batches()[1]))
    clone = pickle.loads(pickle.dumps(metric)) if copier == "pickle" else copy.deepcopy(metric)
    assert numbers(metric_state(clone)) == numbers(metric_state(metric))
    for m in (metric, clone):
        m.update(probs=torch.tensor([[0.25, 0.75]]))
    assert numbers(metric_state(clone)) == numbers(metric_state(metric))


def test_torchmetrics_states_are_not_persistent_by_default_as_nemo():
    metric = TorchmetricsPerplexity()
    metric.update(logits=torch.zeros(3, 4))
    assert dict(metric.state_dict()) == {}
    metric.persistent(True)
    restored = TorchmetricsPerplexity()
    restored.persistent(True)
    restored.load_state_dict(metric.state_dict())
    assert numbers(metric_state(restored)) == numbers(metric_state(metric))


def test_torchmetrics_declares_nemo_states():
    metric = TorchmetricsPerplexity()
    assert TorchmetricsPerplexity.full_state_update is False
    assert metric.perplexities_sum.dtype == torch.float64
    assert metric.num_distributions.dtype == torch.int64
    for name in ("perplexities_sum", "num_distributions"):
        assert metric._reductions[name].__name__ == "dim_zero_sum"


def test_torchmetrics_merge_state_is_exact():
    data = batches(seed=5)
    whole, part_a, part_b = (
        TorchmetricsPerplexity(),
        TorchmetricsPerplexity(),
        TorchmetricsPerplexity(),
    )
    for i, batch in enumerate(data):
        whole.update(logits=torch.from_numpy(batch))
        (part_a if i % 2 else part_b).update(logits=torch.from_numpy(batch))
    part_a.merge_state(part_b)
    assert int(part_a.num_distributions) == int(whole.num_distributions)
    assert float(part_a.compute()) == pytest.approx(float(whole.compute()), rel=1e-15)


@pytest.mark.parametrize("cls", CLASSES)
def test_reset_empties(cls, fresh_warning):
    metric = cls()
    metric.update(logits=torch.zeros(2, 3))
    metric.reset()
    assert numbers(metric_state(metric)) == numbers(
        perplexity_state_update(None, logits=torch.zeros(0, 3))
    )
    with pytest.warns(UserWarning, match="empty state"):
        assert math.isnan(float(metric.compute()))


def test_compute_on_empty_warns_once_per_process_at_the_caller(fresh_warning):
    metric = Perplexity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = metric.compute()
        second = metric.compute()
    assert math.isnan(first.item()) and math.isnan(second.item())
    assert first.dtype == torch.float64
    ours = [w for w in caught if "empty state" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__
    assert "returns None" in str(ours[0].message)


@pytest.mark.parametrize("cls", CLASSES)
def test_compute_leaves_the_state(cls):
    metric = cls()
    metric.update(logits=torch.from_numpy(batches()[2]))
    before = numbers(metric_state(metric))
    assert metric.compute().item() == metric.compute().item()
    assert numbers(metric_state(metric)) == before


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"probs": torch.tensor([[0.5, -0.5]])}, ValueError, "probs"),
        ({"logits": torch.tensor([[0.0, float("nan")]])}, ValueError, "logits"),
        ({"probs": torch.ones(2, 2), "logits": torch.ones(2, 2)}, ValueError, "exactly one"),
        ({}, ValueError, "exactly one"),
        ({"logits": torch.ones(2, 2, dtype=torch.int64)}, TypeError, "floating"),
        ({"logits": np.ones((2, 2))}, TypeError, "numpy"),
        ({"logits": torch.ones(2, 3), "mask": torch.ones(3, dtype=torch.bool)}, ValueError, "mask"),
        ({"logits": torch.ones(2, 3), "mask": torch.ones(2)}, TypeError, "mask"),
    ],
)
@pytest.mark.parametrize("method", ["update", "forward"])
def test_errors_leave_the_state_unchanged(cls, method, kwargs, error, match):
    metric = cls()
    metric.update(logits=torch.zeros(3, 4))
    before = numbers(metric_state(metric))
    call = metric.update if method == "update" else metric
    with pytest.raises(error, match=match):
        call(**kwargs)
    assert numbers(metric_state(metric)) == before


def test_sync_bookkeeping_in_one_process():
    metric = Perplexity()
    metric.update(logits=torch.zeros(2, 5))
    before = numbers(metric.state)
    metric.sync()
    assert metric.is_synced and numbers(metric.state) == before
    with pytest.raises(RuntimeError, match="already synced"):
        metric.sync()
    with pytest.raises(RuntimeError, match="unsync"):
        metric.update(logits=torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="unsync"):
        metric(logits=torch.zeros(2, 5))
    metric.unsync()
    with pytest.raises(RuntimeError, match="not synced"):
        metric.unsync()
    with pytest.raises(KeyError), metric.sync_context():
        raise KeyError("body fails")
    assert not metric.is_synced and numbers(metric.state) == before


def test_sync_state_without_a_group_is_the_state_itself():
    state = perplexity_state_update(None, logits=torch.zeros(3, 2))
    assert sync_state(state) is state
    assert sync_state(state, timeout=0.5) is state


@pytest.mark.parametrize(
    ("timeout", "error"), [(0, ValueError), (-1.0, ValueError), ("5", TypeError), (True, TypeError)]
)
def test_sync_state_rejects_bad_timeouts(timeout, error):
    state = perplexity_state_update(None, logits=torch.zeros(3, 2))
    with pytest.raises(error, match="timeout"):
        sync_state(state, timeout=timeout)


def test_sync_state_rejects_other_backends():
    with pytest.raises(TypeError, match="torch"):
        sync_state(perplexity_state_update(None, logits=np.zeros((2, 2))))
    with pytest.raises(TypeError, match="PerplexityState"):
        sync_state((torch.zeros(()),) * 4)


def test_sync_timeout_error_is_a_timeout_error():
    assert issubclass(SyncTimeoutError, TimeoutError) and issubclass(SyncTimeoutError, RuntimeError)
