"""``vhostuser check --frontend`` on DPDK 22.11's virtio-user (``dpdk-testpmd``),
a second real front-end besides QEMU: it drives our net back-end (txonly)
behind a checking tracer.  DPDK comes from the Debian packages dpdk/dpdk-dev
(``scripts/install-deps --test``); a missing testpmd fails the test."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vhostuser.trace.frontend_check import check_frontend

TESTPMD = "dpdk-testpmd"


def _testpmd(path: str, log: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which(TESTPMD)
    assert binary, f"{TESTPMD} is missing: install the Debian package dpdk-dev (scripts/install-deps --test)"
    # two lcores pinned to one CPU, no hugepages, a small mbuf pool (see docs/tools/trace.md)
    return subprocess.Popen(
        [binary, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "256", f"--file-prefix=vhu{os.getpid()}",
         "--vdev", f"net_virtio_user0,path={path},queues=1", "--", "--forward-mode=txonly", "--txpkts=64",
         "--total-num-mbufs=2048", "--stats-period", "1", "-a", "--nb-cores=1"],
        stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.impl_pass("native")  # testpmd sometimes segfaults against the Python core: see docs/devices/net.md
def test_dpdk_virtio_user_front_end_is_judged(tmp_path: Path) -> None:
    log = tmp_path / "testpmd.log"
    results = check_frontend("net", lambda path: _testpmd(path, log), timeout=60)
    by_name = {r.name: r for r in results}
    output = log.read_text(errors="replace")
    for name in ("connects", "starts-a-ring", "order", "negotiation", "memory-table", "rings",
                 "get-vring-base-before-reuse", "messages", "backend-close", "handles-nack"):
        assert by_name[name].status == "pass", (name, by_name[name].detail, output[-2000:])
    # testpmd transmitted through our back-end before it went away
    sent = [int(m) for m in re.findall(r"TX-packets:\s+(\d+)", output)]
    assert sent and max(sent) > 0, output[-2000:]
    # DPDK logs the refused memory table and gives up the device, as the spec expects
    assert "NACK" in output and "Failed to start device" in output, output[-2000:]
    # virtio-user in client mode does not reconnect (an optional check)
    assert by_name["reconnect"].status == "fail" and not by_name["reconnect"].required
