#!/usr/bin/env python3
"""What ``vhostuser trace`` costs a session: blk requests at queue depth 1, direct
to the back-end, through the tracer, and through the tracer with ``--rings``
(which relays every kick and call itself), interleaved in one run; and the
tracer's own time per relayed kick/call with ``--rings`` (reading the ring,
decoding the requests, passing the notification on).

    .venv/bin/python benchmarks/trace_overhead.py            # ~30 s
    .venv/bin/python benchmarks/trace_overhead.py --quick

Numbers are printed, never asserted; only the ratios of one run mean anything on
a shared machine.  The front-end is the library's mock front-end (Python), whose
own wait for completions dominates the request rates: the per-notification time
is the figure to quote.
"""
from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.blk.device import BlkBackend
from vhostuser.testing import FrontendOptions, MockFrontend
from vhostuser.trace import TraceOptions, TraceProxy

OPTS = FrontendOptions(queue_size=128, memory=((0, 4 << 20),), data_size=2 << 20)


def rate(path: str, requests: int) -> float:
    """4 KiB reads per second, one at a time."""
    header = struct.pack("<IIQ", 0, 0, 0)
    with MockFrontend.connect(path, OPTS) as fe:
        fe.request(0, [header], [4096, 1])  # warm-up
        t0 = time.perf_counter()
        for i in range(requests):
            fe.request(0, [struct.pack("<IIQ", 0, 0, (i * 8) % 2048)], [4096, 1])
        return requests / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    args = parser.parse_args()
    requests, rounds = (300, 2) if args.quick else (2000, 3)
    with tempfile.TemporaryDirectory(prefix="vhu-tb-") as d:
        image = Path(d) / "disk.img"
        image.write_bytes(bytes(1 << 20))
        backend = BlkBackend(image)
        summaries: list = []
        with VhostUserDaemon("blk", backend) as daemon:
            daemon.start_server(f"{d}/blk.sock")
            proxies = {
                "direct": None,
                "trace": TraceProxy(f"{d}/t.sock", f"{d}/blk.sock", lambda ev: None, TraceOptions(device="blk")),
                "trace --rings": TraceProxy(f"{d}/r.sock", f"{d}/blk.sock", summaries.append,
                                            TraceOptions(device="blk", rings=True)),
            }
            paths = {"direct": f"{d}/blk.sock", "trace": f"{d}/t.sock", "trace --rings": f"{d}/r.sock"}
            for p in proxies.values():
                if p is not None:
                    p.start()
            try:
                best: dict[str, float] = {}
                for _ in range(rounds):  # interleaved: the machine's load hits all alike
                    for name in proxies:
                        best[name] = max(best.get(name, 0.0), rate(paths[name], requests))
            finally:
                for p in proxies.values():
                    if p is not None:
                        p.stop()
        backend.close()
    base = best["direct"]
    print(f"blk 4 KiB reads, QD 1, mock front-end, best of {rounds} rounds of {requests}:")
    for name, r in best.items():
        print(f"  {name:14s} {r:9.0f} req/s   {r / base:5.2f}x direct   {1e6 / r:7.1f} us/request")
    stats = [e.data["ring_notifications"] for e in summaries if e.kind == "summary" and e.data]
    kicks = sum(s["kicks"] for s in stats)
    calls = sum(s["calls"] for s in stats)
    per = sum(s["us_per_notification"] * (s["kicks"] + s["calls"]) for s in stats) / max(kicks + calls, 1)
    print(f"--rings: {kicks} kicks and {calls} calls relayed, {per:.1f} us of tracer time per notification")


if __name__ == "__main__":
    main()
