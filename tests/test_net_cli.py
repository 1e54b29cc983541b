"""``vhostuser net``: option errors, and the command serving two ports through
its switch to mock front-ends (``--socket-count 2``, ``--pcap``, ``--impair``)."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path
from test_net_device import BCAST, MAC_A, MAC_B, RX, frame, options, post_rx, receive, send

from vhostuser.devices.net import read_pcap
from vhostuser.testing import MockFrontend


@pytest.mark.parametrize("args", [["--impair", "wobble=1"], ["--impair", "loss=200"],
                                  ["--impair", "loss=1,port=5"], ["--mac", "nope"]])
def test_bad_options_exit_2(tmp_path: Path, args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "vhostuser", "net", "-s", str(tmp_path / "s"), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "vhostuser net:" in out.stderr


def test_command_switches_between_two_sockets(tmp_path: Path) -> None:
    sock, cap = tmp_path / "net.sock", tmp_path / "cap.pcap"
    with vhostuser_process(["net", "-s", str(sock), "--socket-count", "2", "--pcap", str(cap),
                            "--impair", "duplicate=100,port=1"], stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(Path(f"{sock}1"), proc)
        with MockFrontend.connect(f"{sock}0", options()) as fe_a, MockFrontend.connect(f"{sock}1", options()) as fe_b:
            post_rx(fe_a, 8)
            post_rx(fe_b, 8)
            send(fe_a, frame(BCAST, MAC_A, b"hello"))
            assert [f for _, f in receive(fe_b, 2)] == [frame(BCAST, MAC_A, b"hello")] * 2  # duplicated to port 1
            send(fe_b, frame(MAC_A, MAC_B, b"hi a"))
            assert receive(fe_a)[0][1] == frame(MAC_A, MAC_B, b"hi a")
            assert fe_a.reap(RX) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert [f[14:] for _, f in read_pcap(cap)] == [b"hello", b"hi a"]


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _read_framed(sock, timeout: float = 10.0) -> bytes:  # noqa: ANN001 - socket.socket
    sock.settimeout(timeout)
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    n = int.from_bytes(head, "big")
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return body


def test_stream_peer_with_qemu_netdev_stream_framing(tmp_path: Path) -> None:
    """``--stream``: a peer speaking QEMU's -netdev stream framing (played by a
    plain socket) exchanges frames with a vhost-user guest; a peer sending a bad
    length is disconnected and the next one is served."""
    import socket

    sock, stream = tmp_path / "net.sock", tmp_path / "stream.sock"
    mac_s = bytes.fromhex("020000000009")
    with vhostuser_process(["net", "-s", str(sock), "--stream", str(stream), "-v"],
                           stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        with MockFrontend.connect(str(sock), options()) as fe:
            post_rx(fe, 8)
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bad.connect(str(stream))
            bad.sendall((5).to_bytes(4, "big") + b"short")
            bad.settimeout(10)
            assert bad.recv(16) == b""            # disconnected
            bad.close()
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(str(stream))
            try:
                hello = frame(BCAST, mac_s, b"from a stock QEMU NIC")
                peer.sendall(_framed(hello) + _framed(frame(BCAST, mac_s, b"second")))
                assert [f for _, f in receive(fe, 2)] == [hello, frame(BCAST, mac_s, b"second")]
                reply = frame(mac_s, MAC_A, b"reply" * 300)
                send(fe, reply)
                assert _read_framed(peer) == reply
            finally:
                peer.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
    assert "frame length of 5" in stderr
    assert not stream.exists()
