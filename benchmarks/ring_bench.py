#!/usr/bin/env python3
"""Ring-core benchmark: C core vs pure-Python core, in one run.

    .venv/bin/python benchmarks/ring_bench.py            # ~1 min
    .venv/bin/python benchmarks/ring_bench.py --quick    # ~10 s

Measures (numbers are printed, never asserted):

1. chains/s for pop + add_used on a null workload (the device touches no data),
   split and packed, 1 and 4 descriptors per chain:
   * "batch API": the core functions directly - ``pop_batch`` of up to 64 chains
     into flat arrays, then ``add_used_batch`` of all of them (one used-index
     publish), fed straight from the batch arrays;
   * "Queue API": ``Queue.pop_batch(64)`` -> DescriptorChain objects ->
     ``Queue.add_used_batch([(chain, 0), ...])``, what device code calls.
   The driver side refills the ring outside the timed region.
2. GB/s for 64 KiB copies into guest memory: the core's ``scatter`` copy helper
   and ``chain.writer().write``, and out of it: ``gather_into`` and
   ``chain.reader().readinto`` (into a bytearray), next to a plain memcpy of the same size
   (``ctypes.memmove``) and a memoryview slice assignment.

Both cores run whatever VHOSTUSER_IMPL says (the C one needs the extension built).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import struct
import sys
import time
from typing import Any, Callable

from vhostuser.memory import GuestMemory
from vhostuser.virtqueue import _pycore
from vhostuser.virtqueue import chain as chain_mod
from vhostuser.virtqueue import queue as queue_mod
from vhostuser.virtqueue.defs import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    Layout,
    packed_ring_sizes,
    split_ring_sizes,
)

try:
    from vhostuser.virtqueue import _nativecore
except ImportError as exc:  # extension not built
    _nativecore = None  # type: ignore[assignment]
    _NATIVE_ERR = str(exc)

SIZE = 256
BATCH = 64
RING_GPA = 0x10000
DATA_GPA = 0x100000
MEM_SIZE = 0x1000000  # 16 MiB
COPY = 64 * 1024


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class Ring:
    """A ring of SIZE descriptors holding SIZE/ndesc chains of ``ndesc`` 64-byte
    buffers, kept full by a minimal driver that only republishes what was used."""

    def __init__(self, mem: GuestMemory, packed: bool, ndesc: int) -> None:
        self.mem, self.packed, self.ndesc = mem, packed, ndesc
        self.nchains = SIZE // ndesc
        d, a, u = packed_ring_sizes(SIZE) if packed else split_ring_sizes(SIZE, True)
        self.desc = RING_GPA
        self.driver = _align(self.desc + d, 64)
        self.device = _align(self.driver + a, 64)
        self.region = mem.regions[0].view
        mem.fill(RING_GPA, _align(self.device + u, 4096) - RING_GPA)
        if packed:
            # the whole descriptor ring for each driver wrap counter value
            self.images = []
            for wrap in (0, 1):
                img = bytearray()
                for c in range(self.nchains):
                    for k in range(ndesc):
                        f = (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED) | (
                            VIRTQ_DESC_F_NEXT if k < ndesc - 1 else 0
                        )
                        img += struct.pack("<QIHH", DATA_GPA + 64 * (c * ndesc + k), 64, c, f)
                self.images.append(bytes(img))
            self.region[self.desc : self.desc + 16 * SIZE] = self.images[1]  # all available (wrap 1)
            self.dpos, self.dwrap = 0, 0  # the driver refills slots for the next lap
        else:
            for c in range(self.nchains):
                for k in range(ndesc):
                    i = c * ndesc + k
                    nxt = i + 1 if k < ndesc - 1 else 0
                    f = VIRTQ_DESC_F_NEXT if k < ndesc - 1 else 0
                    mem.write(self.desc + 16 * i, struct.pack("<QIHH", DATA_GPA + 64 * i, 64, f, nxt))
            for j in range(SIZE):
                mem.write_u16(self.driver + 4 + 2 * j, (j % self.nchains) * ndesc)
            self.avail_idx = self.nchains
            mem.write_u16(self.driver + 2, self.avail_idx)

    def refill(self, chains: int) -> None:
        """Make ``chains`` used chains available again (not timed)."""
        if not chains:
            return
        if not self.packed:
            self.avail_idx = (self.avail_idx + chains) & 0xFFFF
            struct.pack_into("<H", self.region, self.driver + 2, self.avail_idx)
            return
        slots = chains * self.ndesc
        while slots:
            take = min(slots, SIZE - self.dpos)
            a = self.desc + 16 * self.dpos
            self.region[a : a + 16 * take] = self.images[self.dwrap][16 * self.dpos : 16 * (self.dpos + take)]
            self.dpos += take
            slots -= take
            if self.dpos == SIZE:
                self.dpos, self.dwrap = 0, self.dwrap ^ 1

    def state(self, core: Any) -> Any:
        st = core.QueueState()
        st.layout = Layout.PACKED if self.packed else Layout.SPLIT
        st.size = SIZE
        st.desc_gpa, st.driver_gpa, st.device_gpa = self.desc, self.driver, self.device
        st.log_guest_addr = self.device
        assert core.configure(st, self.mem) == 0
        st.ready = True
        return st


def _timed(seconds: float, step: Callable[[], int]) -> float:
    """Run ``step`` (returns items done, and the time it spent in the measured
    part via the closure) repeatedly for ``seconds``; best of 3 rates."""
    best = 0.0
    for _ in range(3):
        items = 0
        spent = 0.0
        end = time.perf_counter() + seconds / 3
        while time.perf_counter() < end:
            n, dt = step()  # type: ignore[misc]
            items += n
            spent += dt
        best = max(best, items / spent if spent else 0.0)
    return best


def bench_batch_api(core: Any, packed: bool, ndesc: int, seconds: float) -> float:
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    try:
        ring = Ring(mem, packed, ndesc)
        st = ring.state(core)
        pop, add = core.pop_batch, core.add_used_batch
        clock = time.perf_counter
        if core is _pycore:
            zeros: Any = [0] * BATCH

            def step() -> tuple[int, float]:
                t0 = clock()
                b = _pycore.ChainBatch(SIZE)
                n = pop(st, mem, BATCH, b)
                add(st, mem, b.head, zeros, b.slots, n)
                dt = clock() - t0
                ring.refill(n)
                return n, dt
        else:
            b = core.ChainBatch(SIZE, raw=True)
            zeros = core.ffi.new("uint32_t[]", BATCH)

            def step() -> tuple[int, float]:
                t0 = clock()
                n = pop(st, mem, BATCH, b)
                add(st, mem, b.head, zeros, b.slots, n)
                dt = clock() - t0
                ring.refill(n)
                return n, dt

        return _timed(seconds, step)
    finally:
        mem.close()


def _queue_for(core: Any, ring: Ring) -> Any:
    saved = queue_mod.get_core, chain_mod.get_core
    queue_mod.get_core = chain_mod.get_core = lambda: core  # type: ignore[assignment]
    try:
        q = queue_mod.Queue(ring.mem, SIZE, packed=ring.packed, size=SIZE, desc_addr=ring.desc,
                            driver_addr=ring.driver, device_addr=ring.device)  # fmt: skip
    finally:
        queue_mod.get_core, chain_mod.get_core = saved  # type: ignore[assignment]
    return q


def bench_queue_api(core: Any, packed: bool, ndesc: int, seconds: float) -> float:
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    try:
        ring = Ring(mem, packed, ndesc)
        q = _queue_for(core, ring)
        clock = time.perf_counter

        def step() -> tuple[int, float]:
            t0 = clock()
            chains = q.pop_batch(BATCH)
            q.add_used_batch([(c, 0) for c in chains])
            dt = clock() - t0
            ring.refill(len(chains))
            return len(chains), dt

        rate = _timed(seconds, step)
        q.set_ready(False)
        return rate
    finally:
        mem.close()


def bench_copies(core: Any, seconds: float) -> dict[str, float]:
    """GB/s of 64 KiB copies into guest memory."""
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    out: dict[str, float] = {}
    try:
        ring = Ring(mem, False, 1)
        # one chain with a single 64 KiB writable buffer, then one with the same
        # buffer device-readable (heads 0 and 1 are the first two available)
        mem.write(ring.desc, struct.pack("<QIHH", DATA_GPA, COPY, VIRTQ_DESC_F_WRITE, 0))
        mem.write(ring.desc + 16, struct.pack("<QIHH", DATA_GPA, COPY, 0, 0))
        q = _queue_for(core, ring)
        c, c_in = q.pop_batch(2)
        data = os.urandom(COPY)
        clock = time.perf_counter
        addrs, lens = c._addrs, c._lens
        scatter = core.scatter

        def helper() -> tuple[int, float]:
            t0 = clock()
            for _ in range(64):
                scatter(mem, addrs, lens, 0, 1, 0, data)
            return 64 * COPY, clock() - t0

        def writer() -> tuple[int, float]:
            t0 = clock()
            for _ in range(64):
                c.writer().write(data)
            return 64 * COPY, clock() - t0

        out["scatter"] = _timed(seconds, helper) / 1e9
        out["Writer.write"] = _timed(seconds, writer) / 1e9
        assert mem.read(DATA_GPA, COPY) == data

        # and back out of guest memory (the same buffer, read as a byte stream)
        buf = bytearray(COPY)
        addrs, lens = c_in._addrs, c_in._lens
        first = c_in._start
        gather_into = core.gather_into
        dst = memoryview(buf)

        def helper_in() -> tuple[int, float]:
            t0 = clock()
            for _ in range(64):
                gather_into(mem, addrs, lens, first, 1, 0, dst, COPY)
            return 64 * COPY, clock() - t0

        def reader() -> tuple[int, float]:
            t0 = clock()
            for _ in range(64):
                c_in.reader().readinto(buf)
            return 64 * COPY, clock() - t0

        buf[:] = bytes(COPY)
        out["gather_into (out)"] = _timed(seconds, helper_in) / 1e9
        assert bytes(buf) == data
        buf[:] = bytes(COPY)
        out["Reader.readinto (out)"] = _timed(seconds, reader) / 1e9
        assert bytes(buf) == data
        q.set_ready(False)
    finally:
        mem.close()
    return out


def bench_memcpy(seconds: float) -> dict[str, float]:
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    try:
        data = os.urandom(COPY)
        dst = mem.gpa_to_host(DATA_GPA, COPY)
        src = ctypes.c_char_p(data)
        view = mem.regions[0].view
        clock = time.perf_counter
        memmove = ctypes.memmove

        def mm() -> tuple[int, float]:
            t0 = clock()
            for _ in range(64):
                memmove(dst, src, COPY)
            return 64 * COPY, clock() - t0

        def sl() -> tuple[int, float]:
            t0 = clock()
            for _ in range(64):
                view[DATA_GPA : DATA_GPA + COPY] = data
            return 64 * COPY, clock() - t0

        return {"memmove": _timed(seconds, mm) / 1e9, "slice": _timed(seconds, sl) / 1e9}
    finally:
        mem.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (noisier)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 3, quick 0.6)")
    args = ap.parse_args()
    secs = args.seconds or (0.6 if args.quick else 3.0)
    if _nativecore is None:
        print(f"C extension not available ({_NATIVE_ERR}): build it first", file=sys.stderr)
        return 1
    cores = (("native", _nativecore), ("python", _pycore))
    print(f"# vhostuser ring benchmark: Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, ring size {SIZE}, batch {BATCH}, one thread")  # fmt: skip
    print()
    print(f"{'pop+add_used, null workload':34} {'native chains/s':>16} {'python chains/s':>16} {'ratio':>7}")
    for api, fn in (("batch API", bench_batch_api), ("Queue API", bench_queue_api)):
        for packed in (False, True):
            for nd in (1, 4):
                rates = {name: fn(core, packed, nd, secs) for name, core in cores}
                label = f"{api}, {'packed' if packed else 'split'}, {nd} desc/chain"
                print(f"{label:34} {rates['native']:16,.0f} {rates['python']:16,.0f} "
                      f"{rates['native'] / rates['python']:6.1f}x", flush=True)  # fmt: skip
    print()
    base = bench_memcpy(secs)
    print(f"{'64 KiB copy into (out of) guest mem':34} {'GB/s':>8} {'vs memmove':>11}")
    print(f"{'ctypes.memmove (baseline)':34} {base['memmove']:8.2f} {1.0:10.2f}x")
    print(f"{'memoryview slice assignment':34} {base['slice']:8.2f} {base['slice'] / base['memmove']:10.2f}x")
    for name, core in cores:
        for what, gbs in bench_copies(core, secs).items():
            print(f"{name + ' ' + what:34} {gbs:8.2f} {gbs / base['memmove']:10.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
