"""Crash recovery against real QEMU: a guest writes to our blk back-end; the
back-end process is SIGKILLed with requests in flight; QEMU (``reconnect=1``)
connects to a new back-end process, which resubmits them from QEMU's inflight
area; the guest's data is intact, in the guest and in the image file."""
from __future__ import annotations

import hashlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.procs import reap

from vhostuser.testing.guest import VhostUserDevice, start_guest

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parent.parent
PATTERN = hashlib.shake_256(b"vhostuser crash test").digest(4 << 20)  # 4 MiB = 64 writes of 64 KiB
GUEST_SCRIPT = """
echo READY
dd if=/pattern of=/dev/vda bs=64k oflag=direct 2>/dev/null || echo WRITE-FAILED
dd if=/dev/vda bs=64k count=64 iflag=direct 2>/dev/null | md5sum
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhu-crash-"))  # AF_UNIX paths must stay short
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the back-end within {timeout}s"
    line = proc.stdout.readline()
    assert line, f"the back-end exited (status {proc.poll()})"
    return line.strip()


def test_backend_killed_mid_write_then_restarted(short_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    sock = short_dir / "blk.sock"
    first = subprocess.Popen([sys.executable, "-m", "tests.helpers.stalling_blk", str(sock), str(image), "16"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    second: subprocess.Popen[str] | None = None
    try:
        assert read_line(first, 30) == "listening"
        device = VhostUserDevice("blk", sock, chardev_extra="reconnect=1")
        with start_guest(GUEST_SCRIPT, devices=[device], extra_files={"/pattern": PATTERN}, timeout=240) as guest:
            guest.wait_for_output("READY", timeout=120)
            assert read_line(first, 120).startswith("stalled with")
            first.send_signal(signal.SIGKILL)  # requests in flight die with it
            first.wait()
            second = subprocess.Popen([sys.executable, "-m", "vhostuser", "blk", "--socket-path", str(sock),
                                       "--blk-file", str(image), "-v"],
                                      stderr=subprocess.PIPE, text=True)
            result = guest.wait()
        second.send_signal(signal.SIGTERM)
        _, log = second.communicate(timeout=30)
        assert second.returncode == 0, log[-2000:]
        assert "WRITE-FAILED" not in result.output, result.console[-3000:]
        assert result.output.split()[1] == hashlib.md5(PATTERN).hexdigest(), result.console[-3000:]  # after READY
        assert image.read_bytes()[: len(PATTERN)] == PATTERN
        assert "resubmitting" in log, "the new back-end did not resubmit from QEMU's inflight area:\n" + log[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None:
                reap(proc)
