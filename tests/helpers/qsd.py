"""qemu-storage-daemon (libvhost-user's vhost-user-blk) as a test peer."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "qemu-system-common"


def qsd_binary() -> str:
    """The qemu-storage-daemon binary; fails the test (never skips) if it is missing."""
    binary = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"qemu-storage-daemon not found: install the Debian package {PACKAGE}")
    return binary


@contextlib.contextmanager
def qsd_export(image: Path, sock: Path) -> Iterator[Path]:
    """Export ``image`` as vhost-user-blk on ``sock`` until the block ends.

    ``--daemonize`` returns once the export listens, so nothing needs polling;
    the daemon is killed at the end whatever happened."""
    pidfile = sock.with_suffix(".pid")
    cmd = [qsd_binary(),
           "--blockdev", f"driver=file,node-name=file0,filename={image}",
           "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on",
           "--daemonize", "--pidfile", str(pidfile)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert done.returncode == 0, done.stderr
        assert sock.exists()
        yield sock
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def qsd_blk(size: int) -> Iterator[tuple[Path, Path]]:
    """A fresh raw image of ``size`` bytes exported by qemu-storage-daemon, in a
    short temporary directory (AF_UNIX paths are limited to 108 bytes).
    Yields ``(socket path, image path)``."""
    directory = Path(tempfile.mkdtemp(prefix="vhu-qsd-"))
    try:
        image = directory / "disk.img"
        with open(image, "wb") as f:
            f.truncate(size)
        with qsd_export(image, directory / "qsd.sock") as sock:
            yield sock, image
    finally:
        shutil.rmtree(directory, ignore_errors=True)
