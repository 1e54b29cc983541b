#!/usr/bin/env python3
"""Live-migration benchmark: what dirty logging costs and what a migration takes.

    .venv/bin/python benchmarks/migration_bench.py                 # ~3 min
    .venv/bin/python benchmarks/migration_bench.py --runs 1 --negative 0 --overhead-seconds 2

Measures (numbers are printed, never asserted):

1. ``--runs N`` live migrations of the blk workload guest (QEMU 7.2, TCG; the
   same guest, parameters and back-ends as tests/test_migration_qemu.py): QEMU's
   total migration time and downtime, dirty-page rounds (bitmap syncs), bytes
   sent, the pages the SOURCE back-end marked in the dirty log (``vhostuser blk
   -v`` logs the count when the log closes), whether guest RAM compared
   identical and whether the guest's own check passed.
2. ``--negative N`` the same with ``VHOSTUSER_TEST_SKIP_DATA_LOG=1`` on the source
   (data pages not logged): how often the RAM comparison and the guest's check
   catch it (the negative control's detection rate).
3. the back-end's logging overhead on its I/O path: chains/s through
   ``Queue.pop_batch`` + ``add_used_batch`` (what every device's completions go
   through) with 64 bytes written per chain, without a dirty log and with one
   (buffers and ring writes logged), C core and Python core, in one process
   (ring_bench.py's ring and timing).  Per chain the log costs the same whatever
   its size up to a page; bigger requests mark more pages in one call.

The back-ends use whatever VHOSTUSER_IMPL says (C core by default).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vhostuser._impl import IMPL
from vhostuser.memory import DirtyLog, GuestMemory
from vhostuser.testing.blk_workload import BlkWorkload, WorkloadReport, is_read_block
from vhostuser.testing.guest import VhostUserDevice
from vhostuser.testing.migration import MigratingGuest, MigrationParams, compare_ram, ram_dumps
from vhostuser.virtqueue.chain import SKIP_DATA_LOG_ENV
from vhostuser.virtqueue.defs import VIRTQ_DESC_F_WRITE

WORKLOAD = BlkWorkload()
#: bytes a chain reports written in the overhead test (64 B buffers: one page each)
LOGGED_BYTES = 64


def _wait_for(path: Path, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"back-end did not come up ({proc.returncode})")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def migrate_once(negative: bool) -> dict[str, Any]:
    """One migration of the workload guest; its numbers."""
    d = Path(tempfile.mkdtemp(prefix="vhu-migb-"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        image = WORKLOAD.make_image(d / "disk.img")
        socks = []
        for name in ("a", "b"):
            sock = d / f"{name}.sock"
            env = dict(os.environ)
            if negative and name == "a":
                env[SKIP_DATA_LOG_ENV] = "1"
            with open(d / f"{name}.log", "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", "vhostuser", "blk", "-v", "--no-lock",
                                         "--socket-path", str(sock), "--blk-file", str(image)],
                                        stderr=err, env=env)
            procs.append(proc)
            _wait_for(sock, proc)
            socks.append(sock)
        with MigratingGuest(WORKLOAD.script(), devices=[VhostUserDevice("blk", socks[0])],
                            extra_files=WORKLOAD.extra_files()) as mg:
            src = mg.start([VhostUserDevice("blk", socks[0])])
            src.guest.wait_for_output("ready", 180)
            dst = mg.incoming([VhostUserDevice("blk", socks[1])])
            stats = mg.migrate(src, dst, MigrationParams())
            with ram_dumps(src, dst) as (a, b):
                cmp = compare_ram(a, b, backend_page=is_read_block)
            src.close()  # the source back-end closes its dirty log and logs the count
            WORKLOAD.stop(image)
            dst.cont()
            report = WorkloadReport.parse(mg.wait(dst, 120).output)
        _stop(procs[0])
        logged = re.findall(r"dirty log of \d+ bytes closed: (\d+) pages marked", (d / "a.log").read_text())
        return {"time_ms": stats.total_time_ms, "downtime_ms": stats.downtime_ms, "syncs": stats.dirty_syncs,
                "sent_mb": stats.transferred / 1e6, "pages_logged": sum(map(int, logged)),
                "differing": len(cmp.differing), "backend_written": len(cmp.backend_written),
                "guest_ok": report.ok, "bad_slots": report.bad_slots, "reads": report.reads}
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(d, ignore_errors=True)


def logging_overhead(seconds: float, written: int) -> list[tuple[str, float, float]]:
    """Chains/s through ``Queue.pop_batch`` + ``add_used_batch`` with ``written``
    bytes reported written per chain, without and with a dirty log (and ring
    logging, ``set_used_log``), for each core that is available.  The ring and
    the timing are ring_bench.py's (split, 1 descriptor a chain)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ring_bench as rb  # noqa: PLC0415

    out = []
    for name, core in (("native", rb._nativecore), ("python", rb._pycore)):
        if core is None:
            continue
        rates = []
        for logging_on in (False, True):
            mem = GuestMemory.anonymous([(0, rb.MEM_SIZE)])
            dlog = DirtyLog.for_memory(mem) if logging_on else None
            try:
                ring = rb.Ring(mem, False, 1)
                for i in range(rb.SIZE):  # make every buffer device-writable
                    mem.write_u16(ring.desc + 16 * i + 12, VIRTQ_DESC_F_WRITE)
                q = rb._queue_for(core, ring)
                if dlog is not None:
                    q.set_dirty_log(dlog)
                    q.set_used_log(ring.device)
                clock = time.perf_counter

                def step(q: Any = q, ring: Any = ring) -> tuple[int, float]:
                    t0 = clock()
                    chains = q.pop_batch(rb.BATCH)
                    q.add_used_batch([(c, written) for c in chains])
                    dt = clock() - t0
                    ring.refill(len(chains))
                    return len(chains), dt

                rates.append(rb._timed(seconds, step))
                if dlog is not None:
                    assert len(dlog.dirty_pages()) > 1, "no buffer page was logged"
                q.set_ready(False)
            finally:
                if dlog is not None:
                    dlog.close()
                mem.close()
        out.append((name, rates[0], rates[1]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=2, help="migrations with correct logging (default 2)")
    p.add_argument("--negative", type=int, default=3, help="negative-control migrations (default 3)")
    p.add_argument("--overhead-seconds", type=float, default=3.0, help="per measurement of the overhead test")
    args = p.parse_args()
    print(f"implementation: {IMPL}; workload: {WORKLOAD}")
    cols = ("time_ms", "downtime_ms", "syncs", "sent_mb", "pages_logged", "differing", "backend_written",
            "guest_ok", "bad_slots", "reads")
    for label, n, negative in (("correct logging", args.runs, False), ("negative control", args.negative, True)):
        if not n:
            continue
        print(f"\n== {n} migration(s), {label}")
        print("  ".join(f"{c:>15}" for c in cols))
        caught = 0
        for _ in range(n):
            r = migrate_once(negative)
            print("  ".join(f"{r[c]:>15.1f}" if isinstance(r[c], float) else f"{r[c]!s:>15}" for c in cols))
            caught += bool(r["differing"]) or not r["guest_ok"]
        if negative:
            print(f"negative control caught in {caught}/{n} runs")
    print("\n== logging overhead on the completion path (Queue.pop_batch + add_used_batch, split ring,"
          f" {LOGGED_BYTES} bytes written per chain)")
    print(f"{'core':8} {'no log chains/s':>16} {'logging chains/s':>17} {'ratio':>6}")
    for name, off, on in logging_overhead(args.overhead_seconds, LOGGED_BYTES):
        print(f"{name:8} {off:16,.0f} {on:17,.0f} {on / off:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
