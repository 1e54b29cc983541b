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
