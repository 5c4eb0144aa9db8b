"""A harness that runs a function in several processes joined by a gloo group on 127.0.0.1.

The parent holds the rendezvous `TCPStore` on a port the OS picks (port 0), so no port is guessed
and none can be taken by another test in between. Each child writes its result (or its traceback)
to a pickle file; the parent waits with a deadline, kills every child as soon as one fails or the
deadline passes, and reaps them all before it returns or raises.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

# Rendezvous and every collective of the children give up after this long.
COLLECTIVE_TIMEOUT_S = 30.0

# Set in a child by `mark_group_broken` once a case has left a collective pending on purpose.
_group_broken = False


def mark_group_broken() -> None:
    """Tells the harness that this child's group is unusable, so it exits without a barrier."""
    global _group_broken
    _group_broken = True


def run_in_processes(
    world_size: int, worker: Callable[..., Any], *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Runs `worker(rank, world_size, *args)` on `world_size` gloo processes; returns each result.

    `worker` must be a module-level function of an importable module (children are spawned). A
    child that raises makes this raise `AssertionError` with the child's traceback.
    """
    with spawned_group(world_size, worker, args) as (processes, outputs):
        _wait(processes, outputs, time.monotonic() + timeout)
        results = [_read(path) for path in outputs]

    failures = [
        f"rank {rank}: {result['error'] if result else 'no result (killed or crashed)'}"
        for rank, result in enumerate(results)
        if not result or "error" in result
    ]
    exit_codes = [process.exitcode for process in processes]
    if failures:
        raise AssertionError(
            f"{len(failures)} of {world_size} processes failed (exit codes {exit_codes}):\n"
            + "\n".join(failures)
        )
    return [result["ok"] for result in results]


@contextlib.contextmanager
def spawned_group(
    world_size: int, worker: Callable[..., Any], args: tuple[Any, ...]
) -> Iterator[tuple[list[Any], list[Path]]]:
    """Starts `world_size` children of `_child` on a store at a free port; yields them and the
    files their results go to. On leaving, every child still alive is killed, and all are reaped.
    """
    context = multiprocessing.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    with tempfile.TemporaryDirectory(prefix="ppl-dist-") as folder:
        outputs = [Path(folder) / f"rank{rank}.pkl" for rank in range(world_size)]
        processes = [
            context.Process(
                target=_child,
                args=(rank, world_size, store.port, worker, args, str(outputs[rank])),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        try:
            for process in processes:
                process.start()
            yield processes, outputs
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
            for process in processes:
                process.join(timeout=10)
    del store


def _wait(processes: list[Any], outputs: list[Path], deadline: float) -> None:
    """Returns when all children have exited; kills them all early when one fails."""
    while time.monotonic() < deadline:
        if all(not process.is_alive() for process in processes):
            return
        for process, output in zip(processes, outputs, strict=True):
            failed = process.exitcode not in (None, 0)
            if failed or (output.exists() and "error" in (_read(output) or {})):
                return
        time.sleep(0.05)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as file:
            return pickle.load(file)
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        return None


def _child(
    rank: int,
    world_size: int,
    port: int,
    worker: Callable[..., Any],
    args: tuple[Any, ...],
    output: str,
) -> None:
    # Keep gloo on the loopback device: no other interface is ever opened.
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    result: dict[str, Any]
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        result = {"ok": worker(rank, world_size, *args)}
        if not _group_broken:
            # No rank exits while a peer may still be reading its last message.
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        result = {"error": traceback.format_exc()}
    # Written to a temporary name first so that the parent never reads half a file.
    partial = output + ".partial"
    with open(partial, "wb") as file:
        pickle.dump(result, file)
    os.replace(partial, output)
    # After a deliberate timeout a collective is still pending and only exiting releases it;
    # `_exit` skips interpreter teardown, which could wait on it.
    os._exit(0)
