"""Crash recovery end to end: a back-end process is killed (SIGKILL) with
requests in flight; a new back-end process on the same socket gets the inflight
area from the front-end and completes exactly those requests."""
from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import reap

from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.testing.frontend import FrontendOptions, MockFrontend

ROOT = Path(__file__).resolve().parent.parent


def start_backend(sock: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.inflight_backend", str(sock), mode],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    expect_line(proc, "listening")
    return proc


def expect_line(proc: subprocess.Popen[str], wanted: str, timeout: float = 20.0) -> None:
    assert proc.stdout is not None
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"back-end said nothing for {timeout}s (waiting for {wanted!r})"
        line = proc.stdout.readline()
        assert line, f"back-end exited (status {proc.poll()}) before saying {wanted!r}"
        if line.strip() == wanted:
            return


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_requests_in_flight_when_the_backend_dies_complete_after_restart(tmp_path: Path, packed: bool) -> None:
    sock = tmp_path / "inflight.sock"
    first = start_backend(sock, "hold")
    second = None
    try:
        opts = FrontendOptions(inflight=True, packed=packed, queue_size=8)
        with MockFrontend.connect(str(sock), opts) as fe:
            assert fe.protocol_features & PF.INFLIGHT_SHMFD
            sent = {fe.add(0, [f"request {i}".encode()], [16]): f"REQUEST {i}".encode() for i in range(3)}
            fe.publish(0)
            expect_line(first, "holding 3")
            first.kill()  # the back-end dies with three requests in flight
            first.wait()
            second = start_backend(sock, "echo")
            fe.reconnect()  # QEMU's reconnect: same handshake, SET_INFLIGHT_FD, rings from the used index
            fe.kick(0)
            used = fe.wait_used(0, 3, timeout=20)
            assert {u.token: u.data[: u.length] for u in used} == sent
            # nothing is completed twice, and new requests still work
            assert fe.request(0, [b"after"], [8]).data[:5] == b"AFTER"
            assert fe.reap(0) == []
    finally:
        reap(first)
        if second is not None:
            reap(second)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_new_inflight_area_keeps_the_ring_position_of_set_vring_base(tmp_path: Path, packed: bool) -> None:
    """A live-migration destination: its QEMU has a NEW inflight area while the
    rings continue from the source's GET_VRING_BASE.  The position must come from
    SET_VRING_BASE (a packed ring once restarted from the new area's used index 0
    and the guest hung)."""
    sock = tmp_path / "inflight.sock"
    backend = start_backend(sock, "echo")
    try:
        opts = FrontendOptions(inflight=True, packed=packed, queue_size=8)
        with MockFrontend.connect(str(sock), opts) as fe:
            for i in range(5):  # the ring positions move away from 0
                assert fe.request(0, [f"r{i}".encode()], [8]).data[:2] == f"R{i}".encode()
            bases = fe.stop()
            assert bases[0] not in (0, 0x80008000)
            fe.drop_inflight_area()
            fe.start(bases)
            for i in range(12):  # past the end of the 8-entry ring: the wrap counters matter too
                assert fe.request(0, [f"n{i:02}".encode()], [8]).data[:3] == f"N{i:02}".encode()
            assert fe.reap(0) == []
    finally:
        reap(backend)
