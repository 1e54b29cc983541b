#!/usr/bin/env python3
"""``vhostuser net``'s switch between two DPDK virtio-user front-ends, against
DPDK's own vhost PMD doing the same job, in one run.

    .venv/bin/python benchmarks/net_bench.py            # ~2 min
    .venv/bin/python benchmarks/net_bench.py --seconds 5 --sizes 64

For each frame size: ``dpdk-testpmd`` txonly (virtio-user on port 0) -> switch
-> ``dpdk-testpmd`` rxonly (virtio-user on port 1).  The switch is
``vhostuser net -c 2`` with the C ring core (``VHOSTUSER_IMPL=native``), then
with the pure-Python one, then the reference: a third testpmd with two
``net_vhost`` ports forwarding between them (``--forward-mode=io``).  The
receiver's rate (from its per-second ``RX-packets`` totals) is printed in Mpps and
Gbit/s, and the ratio to the reference.  Numbers are printed, never asserted;
on a shared 2-core machine only the ratios of one run mean anything.
Needs ``dpdk-testpmd`` (Debian package dpdk-dev).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TESTPMD = shutil.which("dpdk-testpmd") or "dpdk-testpmd"


def _popen(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _virtio_user(sock: Path, mode: str, size: int, cpu: int, tag: str, log: Path) -> subprocess.Popen[bytes]:
    return _popen([TESTPMD, "--lcores", f"0@{cpu},1@{cpu}", "--no-pci", "--no-huge", "-m", "256",
                   f"--file-prefix=vhubench{os.getpid()}{tag}",
                   "--vdev", f"net_virtio_user0,path={sock},queues=1", "--", f"--forward-mode={mode}",
                   f"--txpkts={size}", "--total-num-mbufs=4096", "--stats-period", "1", "-a", "--nb-cores=1"], log)


def _wait_for(path: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while what not in path.read_text(errors="replace") if path.exists() else True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what!r} not in {path}")
        time.sleep(0.2)


def _wait_socket(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.1)


def _rx_packets(rx_log: Path) -> int:
    return max((int(x) for x in re.findall(r"RX-packets:\s+(\d+)", rx_log.read_text(errors="replace"))), default=0)


def _measure(rx_log: Path, seconds: float) -> float:
    """Receive rate (pps) over ``seconds`` after a 3 s warm-up, from the receiver's
    per-second ``RX-packets`` totals."""
    time.sleep(3)
    c0, t0 = _rx_packets(rx_log), time.monotonic()
    time.sleep(seconds)
    return (_rx_packets(rx_log) - c0) / (time.monotonic() - t0)


def run_switch(work: Path, impl: str, size: int, seconds: float, cpus: list[int]) -> float:
    sock = work / f"sw-{impl}-{size}.sock"
    env = dict(os.environ, VHOSTUSER_IMPL=impl)
    sw = subprocess.Popen([sys.executable, "-m", "vhostuser", "net", "-s", str(sock), "-c", "2"],
                          env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _wait_socket(Path(f"{sock}1"))
        rx_log, tx_log = work / f"rx-{impl}-{size}.log", work / f"tx-{impl}-{size}.log"
        procs.append(_virtio_user(Path(f"{sock}1"), "rxonly", size, cpus[-1], "rx", rx_log))
        _wait_for(rx_log, "Port statistics")
        procs.append(_virtio_user(Path(f"{sock}0"), "txonly", size, cpus[0], "tx", tx_log))
        return _measure(rx_log, seconds)
    finally:
        _stop(procs)
        sw.send_signal(signal.SIGTERM)
        try:
            sw.wait(timeout=20)
        except subprocess.TimeoutExpired:
            sw.kill()
            sw.wait()


def run_dpdk_vhost(work: Path, size: int, seconds: float, cpus: list[int]) -> float:
    s0, s1 = work / f"dv0-{size}.sock", work / f"dv1-{size}.sock"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fwd_log = work / f"fwd-{size}.log"
        procs.append(_popen([TESTPMD, "--lcores", f"0@{cpus[0]},1@{cpus[0]}", "--no-pci", "--no-huge", "-m", "512",
                             f"--file-prefix=vhubench{os.getpid()}fwd",
                             "--vdev", f"net_vhost0,iface={s0},queues=1", "--vdev", f"net_vhost1,iface={s1},queues=1",
                             "--", "--forward-mode=io", "--total-num-mbufs=8192", "--stats-period", "1", "-a",
                             "--nb-cores=1"], fwd_log))
        _wait_socket(s1)
        rx_log, tx_log = work / f"rx-dpdk-{size}.log", work / f"tx-dpdk-{size}.log"
        procs.append(_virtio_user(s1, "rxonly", size, cpus[-1], "rx", rx_log))
        _wait_for(rx_log, "Port statistics")
        procs.append(_virtio_user(s0, "txonly", size, cpus[0], "tx", tx_log))
        return _measure(rx_log, seconds)
    finally:
        _stop(list(reversed(procs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run (default: 8)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes (default: 64,1500)")
    args = parser.parse_args()
    if not shutil.which("dpdk-testpmd"):
        sys.exit("dpdk-testpmd not found: install the Debian package dpdk-dev (scripts/install-deps --test)")
    cpus = sorted(os.sched_getaffinity(0))
    print(f"{'frames':>7} {'switch':<22} {'Mpps':>8} {'Gbit/s':>8} {'vs DPDK vhost':>14}")
    with tempfile.TemporaryDirectory(prefix="vhu-nb-") as d:
        work = Path(d)
        for size in (int(s) for s in args.sizes.split(",")):
            ref = run_dpdk_vhost(work, size, args.seconds, cpus)
            rows = [("DPDK vhost PMD (io fwd)", ref)]
            for impl in ("native", "python"):
                rows.append((f"vhostuser net ({impl})", run_switch(work, impl, size, args.seconds, cpus)))
            for name, pps in rows:
                ratio = f"{pps / ref:.3f}x" if ref else "-"
                print(f"{size:>6}B {name:<22} {pps / 1e6:>8.4f} {pps * size * 8 / 1e9:>8.4f} {ratio:>14}", flush=True)


if __name__ == "__main__":
    main()
