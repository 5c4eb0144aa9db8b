"""`TorchmetricsPerplexity`: a torchmetrics `Metric` that stands in for NeMo's `Perplexity`.

Same constructor and `update(probs=None, logits=None)` as NeMo's, the same states
`perplexities_sum` (float64) and `num_distributions` (int64) reduced by sum, so that
`self.log("val_ppl", metric)` in a LightningModule works as before. Two more states keep the
functional core exact: `perplexities_sum_error` (the compensated sum's rounding error) and
`num_distributions_high` (zero on torch; kept so a state maps one-to-one on `PerplexityState`).

What changes against torchmetrics' defaults: `forward` computes the batch's entropies once, with or
without `dist_sync_on_step` (torchmetrics' own forward runs `update` twice whenever
`dist_sync_on_step` is set); a sync with torchmetrics' default gather is replaced by one all_reduce
of all states (`ppl.stateful.sync_state`); merges use compensated addition; and dtype casts
(`.half()`, `.to(torch.bfloat16)`, `set_dtype`) never touch the states.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from ppl.functional import (
    PerplexityState,
    perplexity_compute,
    perplexity_state_init,
    perplexity_state_merge,
    perplexity_state_update,
)
from ppl.stateful._metric import _moved, _warn_empty
from ppl.stateful._sync import sync_state

_FIELDS = PerplexityState._fields


class TorchmetricsPerplexity(Metric):
    """Mean perplexity of distributions in the last axis, as a torchmetrics `Metric`.

    A drop-in for `nemo.collections.common.metrics.Perplexity`: the perplexity of each
    distribution is `exp(entropy)` in nats, averaged over all distributions seen since the last
    `reset`, across all processes. Differences from NeMo's: `compute()` on an empty state returns
    NaN and warns (NeMo: None); `forward` computes the entropies once (NeMo: twice); `update` also
    takes a `mask`; probabilities are normalised by their sum. Like NeMo's, `compute()` does not
    reset the state by itself: Lightning resets a logged metric at the end of each epoch.

    Args:
        dist_sync_on_step: whether `forward` returns the value over all processes' current
            batches (a collective every step).
        process_group: the `torch.distributed` group to sync over; None for the whole world.
        validate_args: whether `update` checks its inputs' values (one host sync per update).
        sync_timeout: seconds (or a `timedelta`) a sync waits for the other processes before
            raising `ppl.stateful.SyncTimeoutError`; None for the group's own timeout.
        **kwargs: passed on to `torchmetrics.Metric` (e.g. `sync_on_compute`, `dist_sync_fn`).

    Example:
        >>> import torch
        >>> metric = TorchmetricsPerplexity()
        >>> float(metric(logits=torch.zeros(2, 4)))  # this batch
        4.0
        >>> metric.update(probs=torch.tensor([[1.0, 0.0]]))
        >>> float(metric.compute())  # (4 + 4 + 1) / 3
        3.0
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    perplexities_sum: torch.Tensor
    num_distributions: torch.Tensor
    perplexities_sum_error: torch.Tensor
    num_distributions_high: torch.Tensor

    def __init__(
        self,
        dist_sync_on_step: bool = False,
        process_group: Any = None,
        validate_args: bool = True,
        *,
        sync_timeout: float | datetime.timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dist_sync_on_step=dist_sync_on_step, process_group=process_group, **kwargs)
        self.validate_args = validate_args
        self.sync_timeout = sync_timeout
        empty = perplexity_state_init("torch")
        for name, value in zip(_FIELDS, empty, strict=True):
            self.add_state(name, default=value, dist_reduce_fx="sum")

    def update(
        self,
        probs: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Adds the distributions along the last axis of `probs` or `logits` to the state.

        Args:
            probs: non-negative weights with shape `[..., vocab]`, each row with a positive finite
                sum; on the metric's device.
            logits: unnormalised log-probabilities with shape `[..., vocab]`.
            mask: optional boolean tensor of shape `input.shape[:-1]`; False rows are left out.

        Raises:
            ValueError, TypeError: as `ppl.functional.perplexity_state_update`; the state is left
                as it was.
        """
        self._set_state(
            perplexity_state_update(
                self._state(),
                probs=probs,
                logits=logits,
                mask=mask,
                validate_args=self.validate_args,
            )
        )

    def forward(
        self,
        probs: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adds the batch to the state and returns the perplexity of this batch alone.

        The batch's entropies are computed once. With `dist_sync_on_step` the value is that of all
        processes' current batches (one all_reduce; every process must call `forward`).

        Returns:
            A 0-d float64 tensor; NaN when the batch holds no distribution.

        Raises:
            TorchMetricsUserError: the metric is synced.
            ValueError, TypeError: as `update`; the state is left as it was.
        """
        if self._is_synced:
            raise TorchMetricsUserError(
                "The Metric shouldn't be synced when performing ``forward``; call ``unsync`` first."
            )
        # The core detaches the inputs and keeps no graph; the batch starts on the metric's device.
        batch = perplexity_state_update(
            perplexity_state_init(self.perplexities_sum),
            probs=probs,
            logits=logits,
            mask=mask,
            validate_args=self.validate_args,
        )
        shown = batch
        if self.dist_sync_on_step and _distributed():
            shown = sync_state(batch, self.process_group, timeout=self.sync_timeout)
        self._set_state(perplexity_state_merge(self._state(), batch))
        self._update_count += 1
        self._computed = None
        value = perplexity_compute(shown)
        self._forward_cache = value
        return value

    def compute(self) -> torch.Tensor:
        """Returns the mean perplexity (over all processes: torchmetrics syncs before compute).

        Returns:
            A 0-d float64 tensor; NaN with a `UserWarning` (once per process, global rank 0 only)
            when no distribution was seen.
        """
        state = self._state()
        if int(state.num_distributions) == 0 and int(state.num_distributions_high) == 0:
            # One more frame than `Perplexity`: torchmetrics wraps `compute`.
            _warn_empty("TorchmetricsPerplexity", stacklevel=4)
        return perplexity_compute(state)

    def _state(self) -> PerplexityState:
        return PerplexityState(*(getattr(self, name) for name in _FIELDS))

    def _set_state(self, state: PerplexityState) -> None:
        for name, value in zip(_FIELDS, state, strict=True):
            setattr(self, name, value)

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None
    ) -> None:
        # A user's own `dist_sync_fn` (e.g. for another transport) is honoured as torchmetrics
        # would; the default per-state gather becomes one all_reduce of all four states.
        if dist_sync_fn is not gather_all_tensors:
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            return
        group = process_group or self.process_group
        self._set_state(sync_state(self._state(), group, timeout=self.sync_timeout))

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        if not all(name in incoming_state for name in _FIELDS):
            super()._reduce_states(incoming_state)
            return
        incoming = PerplexityState(*(incoming_state[name] for name in _FIELDS))
        self._set_state(perplexity_state_merge(incoming, self._state()))

    def _apply(self, fn: Callable, exclude_state: Any = "") -> torch.nn.Module:
        excluded = tuple(exclude_state) + _FIELDS if exclude_state else _FIELDS
        super()._apply(fn, exclude_state=excluded)
        # Device moves only: a cast of the float64 sum or the int64 count would lose them.
        self._set_state(_moved(self._state(), fn))
        defaults = PerplexityState(*(self._defaults[name] for name in _FIELDS))
        for name, value in zip(_FIELDS, _moved(defaults, fn), strict=True):
            self._defaults[name] = value
        return self


def _distributed() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())
