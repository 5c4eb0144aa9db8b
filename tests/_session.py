"""Running a script whose children must never outlive it (Lightning's DDP launcher, say)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_in_own_session(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Runs `command` in a new session and returns its exit code and combined output.

    Whatever the command started shares its session, so the whole process group is killed when the
    command ends or after `timeout` seconds, and the command is reaped.
    """
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = f"(timed out after {timeout} s)"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, output, None)
