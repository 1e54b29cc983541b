"""``vhostuser net --tap``: the host side is a TAP interface in a network
namespace this test creates (``ip netns``; needs root and ``/dev/net/tun``).
A mock front-end plays the guest: it resolves the host's address by ARP and
pings it, and the host kernel's answers come back through the switch.  Then
the TAP is deleted under the running command: frames to it are dropped, the
command keeps serving and ends cleanly.
"""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.procs import reap, wait_for_path
from test_net_device import BCAST, MAC_A, frame, options, post_rx, receive, send

from vhostuser.devices.net.tap import complete_checksum, internet_checksum
from vhostuser.testing import MockFrontend

HOST_IP = bytes([10, 77, 0, 1])
GUEST_IP = bytes([10, 77, 0, 2])
TAP = "vhutap0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.fail("ip not found: install iproute2 (scripts/install-deps --test)")
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.fail("the TAP test needs root (network namespaces) and /dev/net/tun")
    name = f"vhu-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def arp_request() -> bytes:
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_A, GUEST_IP, bytes(6), HOST_IP)
    return frame(BCAST, MAC_A, body, 0x0806)


def echo_request(dst_mac: bytes, payload: bytes) -> bytes:
    icmp = struct.pack(">BBHHH", 8, 0, 0, 0x1234, 1) + payload
    icmp = icmp[:2] + internet_checksum(icmp).to_bytes(2, "big") + icmp[4:]
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, GUEST_IP, HOST_IP)
    ip = ip[:10] + internet_checksum(ip).to_bytes(2, "big") + ip[12:]
    return frame(dst_mac, MAC_A, ip + icmp, 0x0800)


def wait_frame(fe, ethertype: int, tries: int = 20) -> bytes:  # noqa: ANN001 - MockFrontend
    """The next frame of ``ethertype`` (the host also sends IPv6 noise)."""
    for _ in range(tries):
        post_rx(fe, 1)
        [(_, f)] = receive(fe, 1, timeout=20)
        if struct.unpack(">H", f[12:14])[0] == ethertype:
            return f
    raise AssertionError(f"no frame of type {ethertype:#x}")


def test_complete_checksum() -> None:
    udp = bytearray(frame(BCAST, MAC_A, bytes(20) + b"\x00\x35\x00\x35\x00\x0c\x00\x00abcd"))
    done = complete_checksum(bytes(udp), 34, 6)
    assert internet_checksum(done[34:]) == 0


def test_tap_host_answers_arp_and_ping_and_survives_the_tap_going_away(netns: str, tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "vhostuser", "net",
                             "-s", str(sock), "--tap", TAP, "-v"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_path(sock, proc)
        _ip("-n", netns, "addr", "add", "10.77.0.1/24", "dev", TAP)
        _ip("-n", netns, "link", "set", TAP, "up")
        with MockFrontend.connect(str(sock), options()) as fe:
            send(fe, arp_request())
            reply = wait_frame(fe, 0x0806)
            op, sha, spa, tha, tpa = struct.unpack(">6xH6s4s6s4s", reply[14:42])
            assert (op, spa, tha, tpa) == (2, HOST_IP, MAC_A, GUEST_IP)
            payload = os.urandom(56)
            send(fe, echo_request(sha, payload))
            pong = wait_frame(fe, 0x0800)
            assert pong[:6] == MAC_A and pong[6:12] == sha
            assert pong[23] == 1 and pong[34] == 0 and pong[42:] == payload   # ICMP echo reply, same data
            assert internet_checksum(pong[34:]) == 0
            # the TAP disappears: frames to it are dropped, the port keeps serving
            _ip("-n", netns, "link", "del", TAP)
            for _ in range(3):
                send(fe, echo_request(sha, payload))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "tap-error" in stderr or "went away" in stderr or "read failed" in stderr, stderr
    finally:
        reap(proc)
