"""`Perplexity`: a `torch.nn.Module` metric on the functional core, synced by one collective.

The state is the four fields of a `PerplexityState`, kept as plain tensor attributes rather than
registered buffers: `DistributedDataParallel` broadcasts every registered buffer from rank 0 when
it wraps a model and, by default, before every forward, which would overwrite each rank's local
state with rank 0's. The attributes are still moved by `.to()` / `.cuda()` (never cast: `.half()`
leaves them float64 / int64), written by `state_dict()` and read by `load_state_dict()` under the
field names, and pickled with the module.
"""

from __future__ import annotations

import contextlib
import datetime
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ppl.functional import (
    PerplexityState,
    perplexity_compute,
    perplexity_state_init,
    perplexity_state_merge,
    perplexity_state_update,
)
from ppl.stateful._sync import sync_state

_FIELDS = PerplexityState._fields
_FIELD_DTYPES = {
    "perplexities_sum": torch.float64,
    "num_distributions": torch.int64,
    "perplexities_sum_error": torch.float64,
    "num_distributions_high": torch.int64,
}

# The empty-state warning is given once per process (see `_warn_empty`).
_warned_empty = False


class Perplexity(torch.nn.Module):
    """Mean perplexity of the distributions along the last axis of every batch seen.

    For each distribution p, the perplexity is `exp(H(p))` with `H(p) = -sum_i p_i log p_i` in
    nats, as `torch.distributions.Categorical(...).perplexity()`; the metric is the mean over all
    distributions passed to `update` or `forward` since the last `reset`, over all processes of the
    group. Built on `ppl.functional`: float64 sums with compensated addition, an exact int64 count.

    Differences from NeMo's `Perplexity` (same constructor, same `update(probs, logits)`):
    `compute()` on an empty state returns NaN and warns where NeMo returns None; `compute()` leaves
    the state as it was where NeMo's resets it (call `reset()`); `forward` computes the batch's
    entropies once where NeMo's computes them twice; a sync is one all_reduce, not one gather per
    field; `update` also takes a `mask`; probabilities are normalised by their sum.

    Args:
        dist_sync_on_step: whether `forward` returns the value of all processes' current batches
            (one collective per step, every process must call `forward`) instead of this
            process's batch alone.
        process_group: the `torch.distributed` group to sync over; None for the whole world.
        validate_args: whether `update` checks its inputs' values (one host sync per update); the
            shapes and dtypes are always checked.
        sync_timeout: seconds (or a `timedelta`) that a sync waits for the other processes before
            raising `ppl.stateful.SyncTimeoutError`; None for the process group's own timeout.

    Example:
        >>> import torch
        >>> metric = Perplexity()
        >>> metric.update(logits=torch.zeros(2, 4))
        >>> metric.update(probs=torch.tensor([[1.0, 0.0]]))
        >>> float(metric.compute())  # (4 + 4 + 1) / 3
        3.0
    """

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
    ) -> None:
        super().__init__()
        self.dist_sync_on_step = dist_sync_on_step
        self.process_group = process_group
        self.validate_args = validate_args
        self.sync_timeout = sync_timeout
        # The local state while `sync()` has replaced it by the group's; None when not synced.
        self._local_state: PerplexityState | None = None
        self._set_state(perplexity_state_init("torch"))

    @property
    def state(self) -> PerplexityState:
        """The current state as a torch `PerplexityState` (the group's while synced)."""
        return PerplexityState(*(getattr(self, name) for name in _FIELDS))

    @property
    def is_synced(self) -> bool:
        """Whether `sync()` has replaced the local state by the group's (until `unsync()`)."""
        return self._local_state is not None

    def update(
        self,
        probs: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Adds the distributions along the last axis of `probs` or `logits` to the state.

        The inputs are detached (no graph is kept) and may be of any floating dtype; they must be
        on the metric's device. Without `validate_args` no value is read back to the host. On an
        error the state is left as it was.

        Args:
            probs: non-negative weights with shape `[..., vocab]`, each row with a positive finite
                sum (rows are normalised by it).
            logits: unnormalised log-probabilities with shape `[..., vocab]`: no NaN or `+inf`, at
                least one finite entry per row.
            mask: optional boolean tensor of shape `input.shape[:-1]`; False rows are left out.

        Raises:
            RuntimeError: the metric is synced (call `unsync()` first).
            ValueError, TypeError: as `ppl.functional.perplexity_state_update` (both or neither
                input, wrong shapes or dtypes, another device than the metric's, invalid values).
        """
        self._check_not_synced("update")
        self._set_state(
            perplexity_state_update(
                self.state, probs=probs, logits=logits, mask=mask, validate_args=self.validate_args
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

        The batch's entropies are computed once: its state is merged into the running state and
        turned into the returned value. With `dist_sync_on_step` the value is that of all
        processes' current batches (one collective; every process must call `forward`).

        Args:
            probs: as in `update`.
            logits: as in `update`.
            mask: as in `update`.

        Returns:
            A 0-d float64 tensor on the metric's device; NaN (without a warning) when the batch
            holds no distribution.

        Raises:
            RuntimeError: the metric is synced.
            ValueError, TypeError: as `update`; the state is left as it was.
            ppl.stateful.SyncError: the step's sync failed; the batch is not counted.
        """
        self._check_not_synced("forward")
        # The core detaches the inputs and keeps no graph; the batch starts on the metric's device.
        batch = perplexity_state_update(
            perplexity_state_init(self.perplexities_sum),
            probs=probs,
            logits=logits,
            mask=mask,
            validate_args=self.validate_args,
        )
        # Synced before it is merged, so that a failed sync leaves the state as it was.
        shown = batch
        if self.dist_sync_on_step:
            shown = sync_state(batch, self.process_group, timeout=self.sync_timeout)
        self._set_state(perplexity_state_merge(self.state, batch))
        return perplexity_compute(shown)

    def compute(self) -> torch.Tensor:
        """Returns the mean perplexity over every process of the group; the state is kept.

        Where `torch.distributed` is initialised with more than one process this is a collective
        (every process must call it) over a copy of the state; the local state is not changed.
        Inside `sync_context()` the synced state is used as it is.

        Returns:
            A 0-d float64 tensor on the metric's device. NaN when no distribution was seen on any
            process, with a `UserWarning` (once per process, on global rank 0 only), where NeMo's
            metric returns None.

        Raises:
            ppl.stateful.SyncError: the sync failed (`SyncTimeoutError` after `sync_timeout`).
        """
        state = self.state
        if not self.is_synced:
            state = sync_state(state, self.process_group, timeout=self.sync_timeout)
        value = perplexity_compute(state)
        # Reading the count back is one host sync per compute, the price of the warning.
        if int(state.num_distributions) == 0 and int(state.num_distributions_high) == 0:
            _warn_empty("Perplexity")
        return value

    def reset(self) -> None:
        """Empties the state (and drops a synced state: the metric is unsynced afterwards)."""
        self._local_state = None
        self._set_state(perplexity_state_init(self.perplexities_sum))

    def sync(self) -> None:
        """Replaces the local state by the state of the whole group, until `unsync()`.

        A collective where `torch.distributed` is initialised with more than one process; a
        plain bookkeeping step otherwise, so that code using it runs alike in one process.

        Raises:
            RuntimeError: the metric is already synced.
            ppl.stateful.SyncError: the sync failed; the metric stays unsynced and unchanged.
        """
        if self.is_synced:
            raise RuntimeError(
                "Perplexity.sync() was called on a metric that is already synced; call "
                "unsync() first (syncing twice would count every process's data twice)."
            )
        local = self.state
        synced = sync_state(local, self.process_group, timeout=self.sync_timeout)
        self._set_state(synced)
        self._local_state = local

    def unsync(self) -> None:
        """Restores exactly the local state that `sync()` replaced.

        Raises:
            RuntimeError: the metric is not synced.
        """
        if self._local_state is None:
            raise RuntimeError("Perplexity.unsync() was called on a metric that is not synced.")
        self._set_state(self._local_state)
        self._local_state = None

    @contextlib.contextmanager
    def sync_context(self) -> Iterator[Perplexity]:
        """`sync()` on entry and `unsync()` on exit, also when the body raises.

        Example:
            >>> metric = Perplexity()
            >>> with metric.sync_context():
            ...     global_count = int(metric.num_distributions)
        """
        self.sync()
        try:
            yield self
        finally:
            if self.is_synced:
                self.unsync()

    def extra_repr(self) -> str:
        return f"dist_sync_on_step={self.dist_sync_on_step}, validate_args={self.validate_args}"

    def _check_not_synced(self, method: str) -> None:
        if self.is_synced:
            raise RuntimeError(
                f"Perplexity.{method}() was called while the metric is synced; call unsync() "
                f"first (or leave sync_context())."
            )

    def _set_state(self, state: PerplexityState) -> None:
        for name, value in zip(_FIELDS, state, strict=True):
            self.__dict__[name] = value

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        super()._apply(fn, recurse)
        self._set_state(_moved(self.state, fn))
        if self._local_state is not None:
            self._local_state = _moved(self._local_state, fn)
        return self

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The state tensors are replaced, never written in place, so a reference is a snapshot.
        for name in _FIELDS:
            destination[prefix + name] = getattr(self, name).detach()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        loaded = {}
        for name in _FIELDS:
            key = prefix + name
            # The base class counts keys that are neither parameters nor buffers as unexpected.
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if (
                not isinstance(value, torch.Tensor)
                or value.shape != ()
                or (value.dtype != _FIELD_DTYPES[name])
            ):
                error_msgs.append(
                    f"`{key}` must be a 0-d {_FIELD_DTYPES[name]} tensor; got {_describe(value)}."
                )
                continue
            problem = _value_problem(name, value, self.validate_args)
            if problem is not None:
                error_msgs.append(f"`{key}` {problem}")
                continue
            loaded[name] = value
        if len(loaded) != len(_FIELDS):
            return
        device = self.perplexities_sum.device
        self._local_state = None
        self._set_state(
            PerplexityState(*(loaded[name].detach().to(device, copy=True) for name in _FIELDS))
        )


def _moved(state: PerplexityState, fn: Callable[[torch.Tensor], torch.Tensor]) -> PerplexityState:
    """`fn` applied to each field, but only its device kept: a dtype cast would lose the sums."""
    fields = []
    for value in state:
        converted = fn(value)
        if converted.dtype != value.dtype:
            converted = value.to(device=converted.device)
        fields.append(converted)
    return PerplexityState(*fields)


def _value_problem(name: str, value: torch.Tensor, validate_args: bool) -> str | None:
    """Why a loaded state value cannot be a metric's, or None: a corrupt checkpoint is refused."""
    if name.startswith("num_distributions"):
        if int(value) < 0:
            return f"must be a count of at least 0; got {int(value)} (is the checkpoint corrupt?)."
        return None
    # With validation on, no update can make a sum NaN or infinite; with it off, NaN is expected.
    if validate_args and not bool(torch.isfinite(value)):
        return (
            f"must be finite; got {float(value)}. The metric that saved it ran with "
            f"validate_args=False, or the checkpoint is corrupt; load it into a metric with "
            f"validate_args=False to keep it."
        )
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _warn_empty(owner: str, stacklevel: int = 3) -> None:
    """Warns (once per process, on global rank 0) that `owner.compute()` saw an empty state.

    `stacklevel` counts from here: 3 points at the caller of `compute`.
    """
    global _warned_empty
    if _warned_empty:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    _warned_empty = True
    warnings.warn(
        f"{owner}.compute() was called on an empty state (no distribution was seen on any "
        "process since the last reset) and returns NaN; NeMo's metric returns None here. "
        "This warning is shown once per process.",
        UserWarning,
        stacklevel=stacklevel,
    )
