"""Summing a torch `PerplexityState` over the processes of a `torch.distributed` group.

One sync is one `all_reduce` of one float64 tensor that packs every field. The sum and its
rounding error travel as float64. The count is cut into 21-bit words first: a float64 holds every
integer below 2**53 exactly, so the sum of the words of up to 2**32 processes loses no bit, and
the count comes back exact (NeMo's int64 count is exact too; one float64 buffer is what lets a
single collective carry both). The reduction of the float64 sums rounds once per process, as
NeMo's does: a relative error of at most about `world_size * 2**-53`.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from ppl.functional import PerplexityState
from ppl.functional._state import check_state

# Bits of one word of the packed count: 3 words hold any int64 count >= 0, and the sum of the
# same word over 2**32 processes stays below 2**53, exact in float64.
_WORD_BITS = 21
_NUM_WORDS = 3
_WORD_MASK = (1 << _WORD_BITS) - 1
_HIGH_SHIFT = 32


class SyncError(RuntimeError):
    """The collective of `sync_state` failed; the local state was left as it was.

    The backend's own error is chained as `__cause__`. After a failed collective the process group
    is in an unknown state (a peer may still be inside it): destroy it rather than reuse it.

    Attributes:
        rank: this process's rank in the group.
        global_rank: this process's rank in the default group.
        world_size: the number of processes in the group.
        group_ranks: the global ranks the group holds.
        backend: the group's backend, e.g. `"gloo"` or `"nccl"`.
        timeout: the timeout the sync waited under, in seconds; None for the group's own.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        global_rank: int,
        world_size: int,
        group_ranks: list[int],
        backend: str,
        timeout: float | None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.global_rank = global_rank
        self.world_size = world_size
        self.group_ranks = group_ranks
        self.backend = backend
        self.timeout = timeout


class SyncTimeoutError(SyncError, TimeoutError):
    """`sync_state` waited `timeout` seconds and the other processes never joined the collective."""


def sync_state(
    state: PerplexityState,
    process_group: Any = None,
    *,
    timeout: float | datetime.timedelta | None = None,
) -> PerplexityState:
    """Returns the state of all processes of `process_group` together, on every process.

    A collective: every process of the group must call it, in the same order as its other
    collectives. It makes one `all_reduce` (sum) of one packed float64 tensor on the state's
    device, so a gloo group takes CPU states and an NCCL group CUDA states. Where
    `torch.distributed` is unavailable or not initialised, or the group has one process, the state
    is returned as it is. The argument is never modified.

    Args:
        state: a torch `PerplexityState` (0-d float64 sums, 0-d int64 counts), as made by
            `ppl.functional.perplexity_state_update`.
        process_group: the group to sum over; None for the default (whole world) group.
        timeout: how long to wait for the other processes, in seconds or as a `timedelta`; None
            waits as long as the group's own timeout (`init_process_group(timeout=...)`, 30
            minutes by default for gloo). A process whose peers never arrive raises
            `SyncTimeoutError` after this long.

    Returns:
        A new `PerplexityState` on the state's device whose count is the exact total count and
        whose sum is the sum over processes; `num_distributions_high` is zero.

    Raises:
        TypeError: `state` is no torch `PerplexityState`.
        ValueError: `timeout` is not positive; this process is not in `process_group`; the group
            is NCCL-only and the state is not on a CUDA device.
        SyncTimeoutError: the other processes did not join within `timeout`; the message names
            this rank, the group and the time waited. The group is unusable afterwards.
        SyncError: the backend failed otherwise (e.g. a peer died).

    Example:
        >>> import torch
        >>> from ppl.functional import perplexity_state_update
        >>> local = perplexity_state_update(None, logits=torch.zeros(4, 3))
        >>> sync_state(local).num_distributions  # no process group: the state itself
        tensor(4)
    """
    backend = check_state(state, "state")
    if backend.NAME != "torch":
        raise TypeError(
            f"`state` must hold torch tensors; got {backend.NAME} arrays (use "
            f"ppl.functional.perplexity_state_psum for JAX)."
        )
    timeout_delta = _as_timedelta(timeout)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return state
    group_rank = dist.get_rank(process_group)
    if group_rank < 0:
        raise ValueError(
            f"`process_group` does not contain this process (global rank {dist.get_rank()}); "
            f"only its members may sync over it."
        )
    world_size = dist.get_world_size(process_group)
    if world_size == 1:
        return state
    group_backend = str(dist.get_backend(process_group))
    device = state.perplexities_sum.device
    if group_backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"`process_group` uses NCCL, which reduces CUDA tensors only, but `state` lives on "
            f"{device}; move the state (or the metric) to this rank's CUDA device first."
        )

    packed = _pack(state)
    try:
        if timeout_delta is None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        else:
            work = dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group, async_op=True)
            assert work is not None
            work.wait(timeout=timeout_delta)
    except RuntimeError as error:
        raise _sync_error(
            error, process_group, group_rank, world_size, group_backend, timeout_delta
        ) from error
    return _unpack(packed)


def _pack(state: PerplexityState) -> torch.Tensor:
    """`[sum, sum_error, word_0, word_1, word_2]` in float64, count = sum(word_k * 2**(21 k))."""
    count = state.num_distributions + (state.num_distributions_high << _HIGH_SHIFT)
    words = [(count >> (_WORD_BITS * k)) & _WORD_MASK for k in range(_NUM_WORDS)]
    fields = [state.perplexities_sum, state.perplexities_sum_error, *words]
    return torch.stack([field.to(torch.float64) for field in fields])


def _unpack(packed: torch.Tensor) -> PerplexityState:
    """The state of a reduced `_pack` tensor; each word sum is an exact integer below 2**53."""
    words = packed[2:].to(torch.int64)
    count = words[0] + (words[1] << _WORD_BITS) + (words[2] << (2 * _WORD_BITS))
    return PerplexityState(packed[0], count, packed[1], torch.zeros_like(count))


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None:
        return None
    delta = timeout if isinstance(timeout, datetime.timedelta) else None
    if delta is None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(
                f"`timeout` must be seconds (a number), a datetime.timedelta or None; got "
                f"{type(timeout).__name__}."
            )
        delta = datetime.timedelta(seconds=float(timeout))
    if not delta.total_seconds() > 0:
        raise ValueError(f"`timeout` must be positive; got {timeout!r}.")
    return delta


def _sync_error(
    error: RuntimeError,
    process_group: Any,
    group_rank: int,
    world_size: int,
    group_backend: str,
    timeout: datetime.timedelta | None,
) -> SyncError:
    dist = torch.distributed
    group_ranks = list(dist.get_process_group_ranks(process_group or dist.group.WORLD))
    global_rank = dist.get_rank()
    seconds = None if timeout is None else timeout.total_seconds()
    group = "the default group" if process_group is None else "process group"
    where = (
        f"rank {group_rank} (global rank {global_rank}) of {group} with global ranks "
        f"{group_ranks} ({group_backend}, {world_size} processes)"
    )
    # gloo and NCCL both report a `wait(timeout)` that ran out as "... timed out ...".
    timed_out = timeout is not None and "timed out" in str(error).lower()
    if timed_out:
        message = (
            f"sync_state: {where} waited {seconds:g} s for the all_reduce of the perplexity "
            f"state and the other processes did not join. The local state is unchanged; the "
            f"group still holds the pending collective, so destroy it instead of reusing it."
        )
    else:
        message = (
            f"sync_state: the all_reduce of the perplexity state failed on {where}: {error}. The "
            f"local state is unchanged; do not reuse the group."
        )
    error_type = SyncTimeoutError if timed_out else SyncError
    return error_type(
        message,
        rank=group_rank,
        global_rank=global_rank,
        world_size=world_size,
        group_ranks=group_ranks,
        backend=group_backend,
        timeout=seconds,
    )
