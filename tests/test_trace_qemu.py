"""``vhostuser trace`` between real QEMU 7.2 and our back-ends: one guest with a
virtio-blk and a virtio-rng device, each relayed by a checking proxy.

The guest's I/O goes through intact (the disk holds what the guest wrote, the
guest reads it back, /dev/hwrng gives bytes); the trace of each session is the
sequence of requests the back-end logged, in order; and ``--check`` finds
nothing in QEMU's valid sessions of rng and blk."""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.daemon import VhostUserDaemon
from vhostuser.devices.blk.device import BlkBackend
from vhostuser.devices.rng import RngBackend
from vhostuser.testing.guest import VhostUserDevice, run_guest
from vhostuser.trace import TraceEvent, TraceOptions, TraceProxy

pytestmark = pytest.mark.qemu

MiB = 1 << 20
PATTERN = hashlib.shake_256(b"vhostuser-trace-guest").digest(MiB)
SCRIPT = r"""
set -e
dd if=/pattern.bin of=/dev/vda bs=65536 seek=16 oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=65536 skip=16 count=16 iflag=direct 2>/dev/null
echo "readback $(md5sum < /tmp/back)"
echo "hwrng $(head -c 256 /dev/hwrng | wc -c)"
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhu-tq-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _requests(events: list[TraceEvent]) -> list[str]:
    return [e.request or "" for e in events if e.kind == "request" and e.channel == "main"]


def test_qemu_blk_and_rng_sessions_through_checking_proxies(tmp_path: Path, short_dir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    blk = BlkBackend(image)
    rng = RngBackend()
    events: dict[str, list[TraceEvent]] = {"blk": [], "rng": []}
    caplog.set_level(logging.DEBUG, logger="vhostuser.handler")
    try:
        with VhostUserDaemon("blk", blk) as dblk, VhostUserDaemon("rng", rng) as drng:
            dblk.start_server(str(short_dir / "blk.sock"))
            drng.start_server(str(short_dir / "rng.sock"))
            proxies = [TraceProxy(str(short_dir / f"{name}-front.sock"), str(short_dir / f"{name}.sock"),
                                  events[name].append, TraceOptions(check=True, device=name,
                                                                    rings=name == "blk")).start()
                       for name in ("blk", "rng")]
            try:
                result = run_guest(SCRIPT, devices=[VhostUserDevice("blk", short_dir / "blk-front.sock"),
                                                    VhostUserDevice("rng", short_dir / "rng-front.sock")],
                                   extra_files={"/pattern.bin": PATTERN}, timeout=240).check()
            finally:
                for p in proxies:
                    p.stop()
    finally:
        blk.close()
        rng.close()
    # the guest's I/O went through the proxy intact
    assert f"readback {hashlib.md5(PATTERN).hexdigest()}" in result.output  # noqa: S324
    assert "hwrng 256" in result.output
    assert image.read_bytes()[MiB:2 * MiB] == PATTERN
    # the trace is what each back-end saw, in order
    logged: dict[str, list[str]] = {"blk": [], "rng": []}
    for rec in caplog.records:
        msg = rec.getMessage()
        if msg.startswith("request ") and rec.threadName in ("vhostuser-blk", "vhostuser-rng"):
            logged[rec.threadName.split("-")[1]].append(msg.split()[1])
    for name in ("blk", "rng"):
        traced = _requests(events[name])
        assert traced == logged[name], name
        assert "SET_VRING_KICK" in traced and "GET_VRING_BASE" in traced
        findings = [(e.rule, e.text) for e in events[name] if e.kind == "finding"]
        assert findings == [], f"{name}: {findings}"
        summary = next(e.data for e in events[name] if e.kind == "summary")
        assert summary and summary["first_ring_start_s"] > 0 and summary["regions"]
    blk_add = [e for e in events["blk"] if e.request in ("ADD_MEM_REG", "SET_MEM_TABLE") and e.kind == "request"]
    assert blk_add and all(f["kind"] == "memfd" and f["size"] > 0 for e in blk_add for f in e.fds or [])
    # --rings on the blk proxy: every kick and call went through it (the I/O above is
    # intact), and it saw the guest's write of the pattern at 1 MiB (sector 2048)
    ring = [e.data for e in events["blk"] if e.kind == "ring" and e.data]
    reqs = [q for r in ring for q in r.get("requests", [])]
    done = [c for r in ring for c in r.get("completions", [])]
    assert any(q.get("type") == "OUT" and q.get("sector") == 2048 for q in reqs), reqs[:20]
    assert any(q.get("type") == "IN" for q in reqs)
    assert done and {c.get("status") for c in done} <= {"OK", "UNSUPP"}
    assert not [r for r in reqs if "error" in r]
