"""A torch update without validation reads nothing back to the host; a validating one reads once.

A host read of a tensor's value shows in a profiler trace as `aten::_local_scalar_dense` (what
`.item()`, `bool()` and `int()` of a tensor run). On CUDA that read is the stream sync that
`torch.cuda.set_sync_debug_mode` reports; on CPU the trace shows the same event, so the property
is checked here without a GPU and without timing anything.
"""

from __future__ import annotations

import pytest

from ppl.functional import perplexity_state_init, perplexity_state_update

torch = pytest.importorskip("torch")
profiler = torch.profiler


def _host_reads(function) -> int:
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as trace:
        function()
    return sum(1 for event in trace.events() if event.name == "aten::_local_scalar_dense")


def _inputs(kind: str, multi_block: bool):
    generator = torch.Generator().manual_seed(0)
    # 300 rows of 4096 float32 cross several 1 MiB blocks of the eager kernel.
    shape = (300, 4096) if multi_block else (4, 3, 7)
    values = torch.randn(shape, generator=generator)
    if kind == "probs":
        values = values.abs()
    mask = torch.rand(shape[:-1], generator=generator) < 0.7
    return values, mask


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("multi_block", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_update_without_validation_makes_no_host_read(
    kind: str, multi_block: bool, masked: bool
) -> None:
    values, mask = _inputs(kind, multi_block)
    state = perplexity_state_init(values)
    kwargs = {kind: values, "mask": mask if masked else None, "validate_args": False}
    # Once outside the trace, so that first-use work (imports, caches) is not counted.
    perplexity_state_update(state, **kwargs)
    assert _host_reads(lambda: perplexity_state_update(state, **kwargs)) == 0


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("multi_block", [False, True])
def test_validating_update_makes_exactly_one_host_read(kind: str, multi_block: bool) -> None:
    values, mask = _inputs(kind, multi_block)
    state = perplexity_state_init(values)
    perplexity_state_update(state, **{kind: values}, mask=mask)
    assert _host_reads(lambda: perplexity_state_update(state, **{kind: values}, mask=mask)) == 1


def test_the_trace_does_see_a_host_read() -> None:
    # Guards the two tests above against a profiler that records nothing.
    values = torch.ones(3)
    assert _host_reads(lambda: bool(values.sum() > 0)) == 1
