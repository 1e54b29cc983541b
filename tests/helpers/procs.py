"""Back-end programs started by tests: always reaped, never left running."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs, wait for it, close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def vhostuser_process(args: Sequence[str], **popen_kw: Any) -> Iterator[subprocess.Popen[Any]]:
    """``python -m vhostuser ARGS`` for the duration of the block (reaped at the end)."""
    proc = subprocess.Popen([sys.executable, "-m", "vhostuser", *args], **popen_kw)
    try:
        yield proc
    finally:
        reap(proc)


def wait_for_path(path: Path, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """Until ``path`` exists (a back-end's socket); fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the back-end exited with status {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.02)
