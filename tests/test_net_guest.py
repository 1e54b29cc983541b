"""virtio-net under real QEMU 7.2: two busybox guests whose own virtio_net
drivers use ``vhostuser net`` (one process, ``--socket-count 2``, its built-in
switch) ping each other and move 4 MiB over TCP with ``nc``; the SHA-256 of
what arrived is compared with what was sent.  The command also captures
(``--pcap``): the ICMP echo requests between the two MACs are in the file.

One boot per guest.
"""
from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.procs import vhostuser_process, wait_for_path

from vhostuser.devices.net import read_pcap
from vhostuser.testing.guest import VhostUserDevice, start_guest

pytestmark = pytest.mark.qemu

MAC1 = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"
DATA_SIZE = 4 << 20
BOOT_TIMEOUT = 600.0

_WAIT_PING = """
i=0
until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 300 ] || {{ echo "no answer from {peer}"; exit 1; }}
done
ping -c 3 {peer} | grep -E 'packets transmitted'
"""

RECEIVER = """
ip link set eth0 up && ip addr add 10.0.0.1/24 dev eth0 || exit 1
""" + _WAIT_PING.format(peer="10.0.0.2") + """
mkfifo /tmp/hold
nc -l -p 5000 </tmp/hold >/tmp/recv &
pid=$!
exec 3>/tmp/hold
wait $pid
echo "received $(wc -c < /tmp/recv) bytes"
sha256sum /tmp/recv
"""

SENDER = """
ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 || exit 1
""" + _WAIT_PING.format(peer="10.0.0.1") + """
i=0
until nc 10.0.0.1 5000 </root/data; do
    i=$((i+1)); [ $i -lt 120 ] || { echo "cannot connect"; exit 1; }
    sleep 1
done
echo sent
"""


def test_two_guests_ping_and_move_data_through_the_switch(tmp_path: Path) -> None:
    data = random.Random(11).randbytes(DATA_SIZE)
    sock = tmp_path / "net.sock"
    pcap = tmp_path / "net.pcap"
    with vhostuser_process(["net", "--socket-path", str(sock), "--socket-count", "2", "--mac-filter",
                            "--pcap", str(pcap), "-v"], stderr=subprocess.PIPE, text=True) as proc:
        for i in range(2):
            wait_for_path(Path(f"{sock}{i}"), proc)
        with start_guest(RECEIVER, devices=[VhostUserDevice("net", f"{sock}0", extra=f"mac={MAC1}")],
                         timeout=BOOT_TIMEOUT) as g1, \
             start_guest(SENDER, devices=[VhostUserDevice("net", f"{sock}1", extra=f"mac={MAC2}")],
                         extra_files={"/root/data": data}, timeout=BOOT_TIMEOUT) as g2:
            r2 = g2.wait()
            r1 = g1.wait()
        r2.check()
        r1.check()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
    for out in (r1.output, r2.output):
        assert re.search(r"3 packets transmitted, 3 (packets )?received", out), out
    assert f"received {DATA_SIZE} bytes" in r1.output
    assert hashlib.sha256(data).hexdigest() in r1.output, r1.output
    # the capture holds the guests' ICMP echo requests, MAC2 -> MAC1
    frames = [f for _, f in read_pcap(pcap)]
    mac1, mac2 = (bytes.fromhex(m.replace(":", "")) for m in (MAC1, MAC2))
    echo = [f for f in frames if f[:6] == mac1 and f[6:12] == mac2 and f[12:14] == b"\x08\x00"
            and f[23] == 1 and f[34] == 8]
    assert len(echo) >= 3
    assert sum(len(f) for f in frames) > DATA_SIZE
