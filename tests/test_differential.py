"""Differential tests: the C ring core against the pure-Python reference.

Every operation runs on BOTH cores, each over its own copy of the same guest
memory (and its own dirty log).  After each step we require: the same return
value, the same error (exception type and message, via ``make_error`` of the
code and details), the same queue state, the same batch contents, byte-for-byte
identical guest memory and identical dirty-log bitmaps.

Rings come from hypothesis (hostile descriptors, indirect tables, avail index
jumps, wrap, EVENT_IDX sequences, API misuse) and from the test driver (valid
traffic with out-of-order completion), plus deterministic examples.  A second
part runs whole device loops through the public Queue/DescriptorChain/Reader/
Writer API once per core and compares the traces.
"""
from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import import_native_core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser.memory import DirtyLog, GuestMemory, MemoryRegion
from vhostuser.virtqueue import _pycore as PC
from vhostuser.virtqueue.defs import (
    VIRTQ_DESC_F_AVAIL as AV,
    VIRTQ_DESC_F_INDIRECT as IND,
    VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_USED as US,
    VIRTQ_DESC_F_WRITE as WRITE,
    Layout,
    packed_ring_sizes,
    split_ring_sizes,
)
from vhostuser.virtqueue.errcodes import ErrorCode, make_error

NC = import_native_core()  # skips without the C extension; fails in CI or with VHOSTUSER_IMPL=native

CORES = (PC, NC)
# hole at 0x30000..0x40000; 0x20000 is adjacent to the first region
MEM_LAYOUT = [(0, 0x20000), (0x20000, 0x10000), (0x40000, 0x10000)]
RING = 0x1000
TABLE = 0x9000  # indirect tables
BUF = 0x10000  # valid data
LOG_BYTES = 8  # 64 pages = 0x40000: pages of the third region are beyond the bitmap

FIELDS = (
    "layout", "size", "ready", "event_idx", "desc_gpa", "driver_gpa", "device_gpa",
    "next_avail", "avail_wrap", "next_used", "used_wrap", "num_added", "inflight",
    "notify_enabled", "broken", "err_a", "err_b", "log_used", "log_guest_addr",
)  # fmt: skip
BATCH_CHAIN = ("head", "slots", "desc_start", "ndesc", "nread", "read_bytes", "write_bytes")


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _memory(layout: list[tuple[int, int]]) -> GuestMemory:
    """Guest memory for a twin.  VHOSTUSER_TEST_HEAP_MEMORY=1 backs each region
    with its own heap bytearray instead of an mmap, so that a sanitizer build
    (ASan with PYTHONMALLOC=malloc) sees any access past a region's ends."""
    if os.environ.get("VHOSTUSER_TEST_HEAP_MEMORY") == "1" and sum(n for _, n in layout) < 1 << 26:
        return GuestMemory([MemoryRegion.from_buffer(bytearray(n), gpa) for gpa, n in layout])
    return GuestMemory.anonymous(layout)


def ring_layout(packed: bool, size: int) -> tuple[int, int, int]:
    d, a, u = packed_ring_sizes(size) if packed else split_ring_sizes(size, True)
    desc = RING
    drv = _align(desc + d, 16)
    dev = _align(drv + a, 16)
    return desc, drv, dev


class Outcome:
    """A step's result on one core: a value, or an exception (type + message)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
            self.exc: tuple[type, str] | None = None
        except Exception as e:  # noqa: BLE001 - compared between the cores
            self.value = None
            self.exc = (type(e), str(e))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and (self.value, self.exc) == (other.value, other.exc)

    def __repr__(self) -> str:
        return f"Outcome(value={self.value!r}, exc={self.exc!r})"


class Twin:
    """The same queue on both cores, over two identical guest memories."""

    def __init__(self, log_bytes: int = LOG_BYTES, layout: list[tuple[int, int]] = MEM_LAYOUT) -> None:
        self.mems = [_memory(layout) for _ in CORES]
        self.logs = [DirtyLog.anonymous(log_bytes) for _ in CORES]
        self.st = [c.QueueState() for c in CORES]
        self.batches: list[Any] = [None, None]
        #: chains popped and not yet used: dicts of Python ints + per-core (addr, len) arrays
        self.popped: list[dict[str, Any]] = []
        self.steps = 0
        #: indexes of the regions compared after each step (None: all)
        self.compare_regions: list[int] | None = None

    def close(self) -> None:
        for s in self.st:
            s.reset()
        self.batches = [None, None]
        self.popped = []
        for m in self.mems:
            m.close()
        for lg in self.logs:
            lg.close()

    # ----------------------------------------------------------- driver side
    def write(self, gpa: int, data: bytes) -> None:
        """A driver write, into both memories (ignored if outside memory)."""
        for m in self.mems:
            if m.check_range(gpa, len(data)):
                m.write(gpa, data)

    def write_desc(self, gpa: int, a: int, b: int, c: int, d: int) -> None:
        self.write(gpa, struct.pack("<QIHH", a, b, c, d))

    def sync_from(self, k: int) -> None:
        """Copy memory ``k`` into the other (after the driver wrote into one)."""
        src = self.mems[k]
        for j, m in enumerate(self.mems):
            if j != k:
                for ra, rb in zip(src.regions, m.regions):
                    rb.view[:] = ra.view

    # ---------------------------------------------------------- comparisons
    def check_same(self) -> None:
        a, b = self.st
        sa = {f: int(getattr(a, f)) for f in FIELDS}
        sb = {f: int(getattr(b, f)) for f in FIELDS}
        assert sa == sb, f"state differs after step {self.steps}"
        for i, (ra, rb) in enumerate(zip(self.mems[0].regions, self.mems[1].regions)):
            if self.compare_regions is not None and i not in self.compare_regions:
                continue
            if bytes(ra.view) != bytes(rb.view):
                diff = next(i for i, (x, y) in enumerate(zip(bytes(ra.view), bytes(rb.view))) if x != y)
                raise AssertionError(f"guest memory differs at gpa {ra.guest_phys_addr + diff:#x} (step {self.steps})")
        assert bytes(self.logs[0].view) == bytes(self.logs[1].view), f"dirty log differs (step {self.steps})"

    def both(self, fn: Callable[[int, Any, Any, GuestMemory], Any]) -> Any:
        """Run ``fn(k, core, state, mem)`` on both cores; require identical outcomes
        (a negative code is compared as the exception it becomes) and state."""
        self.steps += 1
        outs = []
        for k, core in enumerate(CORES):
            outs.append(Outcome(lambda: fn(k, core, self.st[k], self.mems[k])))
        for k, o in enumerate(outs):
            if isinstance(o.value, int) and not isinstance(o.value, bool) and o.value < 0:
                s = self.st[k]
                e = make_error(o.value, s.err_a, s.err_b)
                o.exc = (type(e), str(e))
        assert outs[0] == outs[1], f"step {self.steps}: python {outs[0]} != native {outs[1]}"
        self.check_same()
        return outs[0].value

    # ------------------------------------------------------------ device side
    def setup(
        self,
        packed: bool,
        size: int,
        event_idx: bool,
        *,
        areas: tuple[int, int, int] | None = None,
        next_avail: int = 0,
        next_used: int | None = None,
        avail_wrap: int = 1,
        used_wrap: int = 1,
        log: bool = True,
        log_used: bool = True,
        log_guest_addr: int | None = None,
    ) -> int:
        """Configure both states (fields set directly, as the Queue does) and make
        them ready if configure succeeded; returns configure's result."""
        areas = areas or ring_layout(packed, size)
        self.batches = [None, None]
        self.popped = []

        def fn(k: int, core: Any, s: Any, mem: GuestMemory) -> int:
            s.reset()
            s.layout = Layout.PACKED if packed else Layout.SPLIT
            s.size = size
            s.event_idx = event_idx
            s.desc_gpa, s.driver_gpa, s.device_gpa = areas
            s.next_avail = next_avail
            s.next_used = next_avail if next_used is None else next_used
            s.avail_wrap = avail_wrap
            s.used_wrap = used_wrap
            s.log = self.logs[k] if log else None
            s.log_used = log_used
            s.log_guest_addr = areas[2] if log_guest_addr is None else log_guest_addr
            rc = core.configure(s, mem)
            s.ready = rc == 0
            return rc

        return self.both(fn)  # type: ignore[no-any-return]

    def pop(self, max_chains: int, desc_cap: int | None = None) -> int:
        cap = self.st[0].size if desc_cap is None else desc_cap
        new: list[Any] = [None, None]

        def fn(k: int, core: Any, s: Any, mem: GuestMemory) -> Any:
            # the C core's batch: cdata per-chain arrays (raw) or lists, alternately
            b = core.ChainBatch(cap, raw=bool(self.steps & 1)) if core is NC else core.ChainBatch(cap)
            rc = core.pop_batch(s, mem, max_chains, b)
            new[k] = b
            if rc <= 0:
                return rc
            chains = []
            for i in range(b.count):
                c = tuple(int(getattr(b, f)[i]) for f in BATCH_CHAIN)
                s0, nd = c[2], c[3]
                descs = [(int(b.addr[j]), int(b.len[j]), int(b.flags[j])) for j in range(s0, s0 + nd)]
                chains.append((c, descs))
            return rc, b.count, chains

        rc = self.both(fn)
        if isinstance(rc, tuple):
            n, _, chains = rc
            self.batches = new
            for i, (c, _d) in enumerate(chains):
                self.popped.append(
                    {"head": c[0], "slots": c[1], "start": c[2], "ndesc": c[3], "nread": c[4],
                     "arrays": [(new[k].addr, new[k].len) for k in range(2)], "i": i}  # fmt: skip
                )
            return n  # type: ignore[no-any-return]
        return rc  # type: ignore[no-any-return]

    def add_used(self, ids: list[int], lens: list[int], slots: list[int], *, as_cdata: bool = False) -> int:
        def fn(k: int, core: Any, s: Any, mem: GuestMemory) -> int:
            if as_cdata and core is NC:
                arr = [NC.ffi.new("uint32_t[]", v) if v else NC.ffi.NULL for v in (ids, lens, slots)]
                return core.add_used_batch(s, mem, *arr, len(ids))  # type: ignore[no-any-return]
            return core.add_used_batch(s, mem, list(ids), list(lens), list(slots), len(ids))  # type: ignore[no-any-return]

        return self.both(fn)  # type: ignore[no-any-return]

    def complete(self, rng: random.Random, count: int, lens: list[int]) -> int:
        """Return ``count`` popped chains (random order) with ``lens``."""
        if not self.popped:
            return 0
        rng.shuffle(self.popped)
        done, rest = self.popped[:count], self.popped[count:]
        ids = [c["head"] for c in done]
        slots = [c["slots"] for c in done]
        ln = [lens[i % len(lens)] if lens else 0 for i in range(len(done))]
        rc = self.add_used(ids, ln, slots)
        if rc == 0:
            self.popped = rest
        return rc

    def needs_notification(self) -> int:
        return self.both(lambda k, core, s, mem: core.needs_notification(s, mem))  # type: ignore[no-any-return]

    def set_notification(self, enable: bool) -> int:
        return self.both(lambda k, core, s, mem: core.set_notification(s, mem, int(enable)))  # type: ignore[no-any-return]

    def avail_pending(self) -> int:
        return self.both(lambda k, core, s, mem: core.avail_pending(s, mem))  # type: ignore[no-any-return]

    def copy(self, pick: int, writable: bool, skip: int, n: int, data: bytes) -> Any:
        """gather (readable part) or scatter (writable part) on a popped chain."""
        if not self.popped:
            return None
        c = self.popped[pick % len(self.popped)]
        if writable:
            start, count = c["start"] + c["nread"], c["ndesc"] - c["nread"]
        else:
            start, count = c["start"], c["nread"]

        def fn(k: int, core: Any, s: Any, mem: GuestMemory) -> Any:
            addrs, lens = c["arrays"][k]
            if writable:
                return core.scatter(mem, addrs, lens, start, count, skip, data)
            return core.gather(mem, addrs, lens, start, count, skip, n)

        return self.both(fn)

    def raw_copy(self, addrs: list[int], lens: list[int], skip: int, n: int, data: bytes | None) -> Any:
        """gather/scatter over arbitrary (possibly bad) buffers: C arrays for the C core."""

        def fn(k: int, core: Any, s: Any, mem: GuestMemory) -> Any:
            if core is NC:
                a = NC.ffi.new("uint64_t[]", addrs)
                ln = NC.ffi.new("uint32_t[]", lens)
            else:
                a, ln = addrs, lens
            if data is None:
                return core.gather(mem, a, ln, 0, len(addrs), skip, n)
            return core.scatter(mem, a, ln, 0, len(addrs), skip, data)

        return self.both(fn)

    def edit(self, **fields: int) -> int:
        """Change fields (as Queue.set_vring_base etc. do) and reconfigure."""

        def fn(k: int, core: Any, s: Any, mem: GuestMemory) -> int:
            for f, v in fields.items():
                setattr(s, f, v)
            rc = core.configure(s, mem)
            s.ready = rc == 0
            return rc

        if "next_avail" in fields or "next_used" in fields:
            self.popped = []
        return self.both(fn)  # type: ignore[no-any-return]


@contextlib.contextmanager
def twin(log_bytes: int = LOG_BYTES, layout: list[tuple[int, int]] = MEM_LAYOUT) -> Iterator[Twin]:
    t = Twin(log_bytes, layout)
    try:
        yield t
    finally:
        t.close()


# ====================================================================== hostile
# Biased towards valid values so that real chains, and the deep errors behind
# them, show up often; every field can also be anything.


def weighted(*pairs: tuple[int, Any]) -> Any:
    """Choose a strategy with the given weights (``one_of`` dedupes repeated
    strategies, so repetition there does not weight)."""
    return st.sampled_from([s for w, s in pairs for _ in range(w)]).flatmap(lambda s: s)


VALID_ADDR = st.integers(BUF, BUF + 0x1000)
ADDRS = weighted(
    (30, VALID_ADDR),
    (1, st.sampled_from([0x1FFF0, 0x2FFF8, 0x30000, 0x3FFF0, 0x4FFF0, 0x50000, TABLE, 2**64 - 1, 2**64 - 16, 0])),
    (1, st.integers(0, 2**64 - 1)),
)
LENS = weighted(
    (30, st.integers(1, 64)),
    (1, st.sampled_from([0, 16, 32, 48, 0x1000, 0x10010, 0xFFFFFFFF, 0x80000000, 17])),
    (1, st.integers(0, 2**32 - 1)),
)
SFLAGS = weighted(
    (24, st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, NEXT, NEXT | WRITE])),
    (2, st.sampled_from([IND, IND | WRITE])),
    (1, st.sampled_from([IND | NEXT])),
    (1, st.integers(0, 0xFFFF)),
)
# (raw next index, keep it in range?)
NEXTS = st.tuples(st.integers(0, 0xFFFF), st.sampled_from([True] * 9 + [False]))
# packed flags: (available for the current wrap?, extra bits)
PKIND = weighted(
    (20, st.tuples(st.just("avail"), st.sampled_from([0, NEXT, WRITE, NEXT | WRITE]))),
    (2, st.tuples(st.just("avail"), st.sampled_from([IND, IND | NEXT, IND | WRITE]))),
    (2, st.tuples(st.just("used"), st.sampled_from([0, NEXT]))),
    (1, st.tuples(st.just("raw"), st.integers(0, 0xFFFF))),
)
TABLE_DESC = st.tuples(ADDRS, LENS, SFLAGS, NEXTS)
SDESC = st.tuples(ADDRS, LENS, SFLAGS, NEXTS)
PDESC = st.tuples(ADDRS, LENS, st.integers(0, 0xFFFF), PKIND)

OPS = weighted(
    (3, st.tuples(st.just("desc"), st.integers(0, 15), SDESC, PDESC)),
    (2, st.tuples(st.just("avail"), st.integers(0, 15), NEXTS)),
    (3, st.tuples(st.just("avail_idx"), weighted((8, st.integers(0, 12)), (1, st.integers(0, 0xFFFF))))),
    (1, st.tuples(st.just("table"), st.integers(0, 7), TABLE_DESC)),
    (6, st.tuples(st.just("pop"), st.integers(0, 10), st.sampled_from(["size", "small", "big", "big", "under"]))),
    (5, st.tuples(st.just("complete"), st.integers(0, 2**16), st.integers(1, 4),
                  st.lists(weighted((4, st.integers(0, 64)), (1, st.integers(0, 2**32 - 1))), max_size=3))),
    (1, st.tuples(st.just("bad_used"), st.lists(st.integers(0, 20), min_size=1, max_size=4),
                  st.lists(st.integers(0, 20), min_size=1, max_size=4))),
    (2, st.tuples(st.just("notify"))),
    (2, st.tuples(st.just("setnotif"), st.booleans())),
    (1, st.tuples(st.just("pending"))),
    (2, st.tuples(st.just("event"), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))),
    (3, st.tuples(st.just("copy"), st.integers(0, 7), st.booleans(), st.integers(0, 40), st.integers(0, 80),
                  st.binary(max_size=80))),
    (1, st.tuples(st.just("reset"))),
)  # fmt: skip


def _split_desc(size: int, entries: int, d: tuple) -> tuple[int, int, int, int]:
    a, ln, f, (nxt, keep) = d
    return a, ln, f, (nxt % entries if keep else nxt)


def _packed_desc(t: Twin, pos: int, d: tuple) -> tuple[int, int, int, int]:
    a, ln, bid, (kind, bits) = d
    s = t.st[0]
    wrap = int(s.avail_wrap) ^ (1 if pos < s.next_avail else 0)  # slots behind us belong to the next lap
    if kind == "avail":
        f = (AV if wrap else US) | bits
    elif kind == "used":
        f = (US | AV if wrap else 0) | bits
    else:
        f = bits
    return a, ln, bid, f


def _run_op(t: Twin, op: tuple, packed: bool, size: int, drv_gpa: int, rng: random.Random) -> None:
    name = op[0]
    desc_gpa = RING
    if name == "desc":
        _, i, sd, pd = op
        i %= size
        t.write_desc(desc_gpa + 16 * i, *(_packed_desc(t, i, pd) if packed else _split_desc(size, size, sd)))
    elif name == "avail":
        if not packed:
            _, slot, (head, keep) = op
            t.write(drv_gpa + 4 + 2 * ((t.st[0].next_avail + slot) % size), struct.pack("<H", head % size if keep else head))
    elif name == "avail_idx":
        if not packed:
            k = op[1]
            t.write(drv_gpa + 2, struct.pack("<H", (t.st[0].next_avail + k % (size + 1)) & 0xFFFF if k <= 12 else k))
    elif name == "table":
        _, i, d = op
        t.write_desc(TABLE + 16 * i, *_split_desc(size, 8, d))
    elif name == "pop":
        _, m, capk = op
        cap = {"size": size, "small": size, "big": 4 * max(m, 1) + size, "under": size - 1}[capk]
        t.pop(m, cap)
    elif name == "complete":
        _, seed, count, lens = op
        t.complete(random.Random(seed), count, lens)
    elif name == "bad_used":
        _, ids, slots = op
        n = min(len(ids), len(slots))
        t.add_used(ids[:n], [1] * n, slots[:n], as_cdata=rng.random() < 0.5)
    elif name == "notify":
        t.needs_notification()
    elif name == "setnotif":
        t.set_notification(op[1])
    elif name == "pending":
        t.avail_pending()
    elif name == "event":
        # split: used_event (and avail flags); packed: driver event area
        _, v, w = op
        if packed:
            t.write(drv_gpa, struct.pack("<HH", v, w))
        else:
            t.write(drv_gpa + 4 + 2 * size, struct.pack("<H", v))
            t.write(drv_gpa, struct.pack("<H", w & 1))
    elif name == "copy":
        _, pick, writable, skip, n, data = op
        t.copy(pick, writable, skip, n, data)
    elif name == "reset":
        # recover from a broken queue: SET_VRING_BASE-like restart at the current positions
        s = t.st[0]
        t.edit(broken=0, inflight=0, next_used=s.next_used if packed else s.next_avail)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packed=st.booleans(),
    size_exp=st.integers(0, 4),
    psize=st.integers(1, 12),
    event_idx=st.booleans(),
    base=weighted((2, st.just(0)), (2, st.integers(0xFFF0, 0xFFFF)), (1, st.integers(0, 0xFFFF))),
    descs=st.lists(SDESC, min_size=16, max_size=16),
    pdescs=st.lists(PDESC, min_size=12, max_size=12),
    heads=st.lists(NEXTS, min_size=16, max_size=16),
    avail_ahead=weighted((10, st.integers(0, 16)), (1, st.integers(0, 0xFFFF))),
    table=st.lists(TABLE_DESC, max_size=8),
    ops=st.lists(OPS, max_size=25),
    log_guest_addr=st.one_of(st.none(), st.just(2**64 - 4), st.integers(0, 0x60000)),
    seed=st.integers(0, 1000),
)
def test_hostile_rings(
    packed, size_exp, psize, event_idx, base, descs, pdescs, heads, avail_ahead, table, ops, log_guest_addr, seed
) -> None:
    size = psize if packed else 1 << size_exp
    rng = random.Random(seed)
    with twin() as t:
        desc_gpa, drv_gpa, dev_gpa = ring_layout(packed, size)
        if packed:
            pos = base % size
            wrap = 1 if base & 0x8000 == 0 else 0
            t.setup(True, size, event_idx, next_avail=pos, avail_wrap=wrap, next_used=(pos * 7) % size,
                    used_wrap=wrap ^ (base & 1), log_guest_addr=log_guest_addr)  # fmt: skip
            for i, d in enumerate(pdescs[:size]):
                t.write_desc(desc_gpa + 16 * i, *_packed_desc(t, i, d))
        else:
            for i, d in enumerate(descs[:size]):
                t.write_desc(desc_gpa + 16 * i, *_split_desc(size, size, d))
            for i, (h, keep) in enumerate(heads[:size]):
                t.write(drv_gpa + 4 + 2 * ((base + i) % size), struct.pack("<H", h % size if keep else h))
            ahead = avail_ahead % (size + 1) if avail_ahead <= 16 else avail_ahead  # mostly sane
            t.write(drv_gpa + 2, struct.pack("<H", (base + ahead) & 0xFFFF))
            t.setup(False, size, event_idx, next_avail=base, log_guest_addr=log_guest_addr)
        for i, d in enumerate(table):
            t.write_desc(TABLE + 16 * i, *_split_desc(size, 8, d))
        t.pop(rng.randrange(1, 5), size)
        for op in ops:
            _run_op(t, op, packed, size, drv_gpa, rng)
        t.pop(size, 4 * size)


# ======================================================== valid traffic (driver)
def _model_walk(seed: int, packed: bool, size: int, event_idx: bool, steps: int, base: int = 0) -> None:
    """The test driver fills memory 0; memory 1 is synced from it before each device
    step (so both start every step identical); the device side runs on both cores."""
    from vhostuser.virtqueue.driver import RingDriver  # noqa: PLC0415

    rng = random.Random(seed)
    with twin(log_bytes=16) as t:
        drv = RingDriver.create(t.mems[0], size, packed=packed, event_idx=event_idx, ring_gpa=RING,
                                data_gpa=0x8000, data_size=0x38000)  # fmt: skip
        if base and not packed:
            drv.avail_idx = drv.published_idx = drv._kick_old = drv.last_used = base  # type: ignore[attr-defined]
        t.sync_from(0)
        t.setup(packed, size, event_idx, areas=(drv.desc_gpa, drv.driver_gpa, drv.device_gpa),
                next_avail=base, log_used=rng.random() < 0.7)  # fmt: skip
        for _ in range(steps):
            op = rng.random()
            if op < 0.3:
                nr, nw = rng.randrange(0, 3), rng.randrange(0, 3)
                rd = [rng.randbytes(rng.randrange(1, 40)) for _ in range(nr)]
                wr = [rng.randrange(1, 300) for _ in range(nw)] or ([] if rd else [8])
                if drv.num_free >= len(rd) + len(wr):
                    drv.add(rd, wr, indirect=rng.random() < 0.3)
                    if rng.random() < 0.5:
                        drv.publish()
                        drv.kick_needed()
            elif op < 0.4:
                drv.publish()
                drv.kick_needed()
                if rng.random() < 0.3:
                    drv.disable_interrupts() if rng.random() < 0.5 else drv.enable_interrupts()
            elif op < 0.45:
                drv.get_used()
            t.sync_from(0)
            op = rng.random()
            if op < 0.3:
                t.pop(rng.randrange(1, 6), rng.choice([size, 4 * size, 64]))
            elif op < 0.5:
                t.complete(rng, rng.randrange(1, 4), [rng.randrange(0, 400) for _ in range(3)])
            elif op < 0.65:
                t.copy(rng.randrange(8), True, rng.randrange(0, 30), 0, rng.randbytes(rng.randrange(0, 300)))
            elif op < 0.75:
                t.copy(rng.randrange(8), False, rng.randrange(0, 30), rng.randrange(0, 200), b"")
            elif op < 0.85:
                t.needs_notification()
            elif op < 0.95:
                t.set_notification(rng.random() < 0.6)
            else:
                t.avail_pending()
        t.pop(size, 4 * size)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["noevt", "evt"])
@pytest.mark.parametrize("size", [1, 4, 16])
def test_driver_model_walk(packed: bool, event_idx: bool, size: int) -> None:
    for seed in range(2):
        _model_walk(seed, packed, size, event_idx, 250)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), packed=st.booleans(), size=st.sampled_from([2, 3, 8, 5, 32]),
       evt=st.booleans(), base=st.sampled_from([0, 0xFFFE, 0xFFF0, 0x7FF0]))  # fmt: skip
def test_driver_model_walk_hypothesis(seed: int, packed: bool, size: int, evt: bool, base: int) -> None:
    if not packed and size & (size - 1):
        size = 8
    _model_walk(seed, packed, size, evt, 150, base=0 if packed else base)


# ================================================================ deterministic
def _split(t: Twin, size: int = 8, event_idx: bool = False, base: int = 0, **kw: Any) -> tuple[int, int, int]:
    areas = ring_layout(False, size)
    assert t.setup(False, size, event_idx, next_avail=base, **kw) == 0
    return areas


def _publish_split(t: Twin, drv_gpa: int, size: int, base: int, heads: list[int]) -> None:
    for i, h in enumerate(heads):
        t.write(drv_gpa + 4 + 2 * ((base + i) % size), struct.pack("<H", h))
    t.write(drv_gpa + 2, struct.pack("<H", (base + len(heads)) & 0xFFFF))


@pytest.mark.parametrize(
    "packed,size,event_idx,areas,base,code",
    [
        (False, 3, False, None, 0, ErrorCode.BAD_SIZE),
        (False, 0, False, None, 0, ErrorCode.BAD_SIZE),
        (True, 32769, False, (RING, 0x2000, 0x3000), 0, ErrorCode.BAD_SIZE),
        (False, 8, False, (RING + 8, 0x2000, 0x3000), 0, ErrorCode.RING_ALIGNMENT),
        (False, 8, False, (RING, 0x2001, 0x3000), 0, ErrorCode.RING_ALIGNMENT),
        (True, 8, False, (RING, 0x2002, 0x3000), 0, ErrorCode.RING_ALIGNMENT),
        (False, 8, True, (RING, 0x2000, 0x3002), 0, ErrorCode.RING_ALIGNMENT),
        (False, 8, False, (0x30000, 0x2000, 0x3000), 0, ErrorCode.RING_ADDRESS),
        (False, 8, False, (0x1FFF0, 0x2000, 0x3000), 0, ErrorCode.RING_ADDRESS),  # straddles 2 regions
        (False, 8, True, (RING, 0x2000, 0x4FFC0), 0, ErrorCode.RING_ADDRESS),
        (True, 8, False, (RING, 0x2000, 2**64 - 4), 0, ErrorCode.RING_ADDRESS),
        (True, 8, False, None, 8, ErrorCode.BASE_RANGE),
        (False, 8, True, None, 0, ErrorCode.OK),
        (True, 5, True, None, 4, ErrorCode.OK),
    ],
)
def test_configure_errors(packed, size, event_idx, areas, base, code) -> None:
    with twin() as t:
        rc = t.setup(packed, size, event_idx, areas=areas or ring_layout(packed, max(size, 1) if size <= 64 else 1),
                     next_avail=base)  # fmt: skip
        assert rc == -code


def test_not_ready_everywhere() -> None:
    with twin() as t:
        t.setup(False, 8, False, areas=(RING + 8, 0x2000, 0x3000))
        assert t.pop(4) == -ErrorCode.NOT_READY
        assert t.add_used([0], [0], [1]) == -ErrorCode.NOT_READY
        assert t.needs_notification() == -ErrorCode.NOT_READY
        assert t.set_notification(True) == -ErrorCode.NOT_READY
        assert t.avail_pending() == -ErrorCode.NOT_READY


def test_split_wrap_around_u16_with_event_idx_and_logging() -> None:
    size = 4
    with twin() as t:
        desc, drv, dev = _split(t, size, event_idx=True, base=0xFFFE)
        for i in range(size):
            t.write_desc(desc + 16 * i, BUF + 0x100 * i, 0x40, WRITE, 0)
        total = 0
        base = 0xFFFE
        for rnd in range(6):
            _publish_split(t, drv, size, base, [rnd % size, (rnd + 1) % size])
            t.write(drv + 4 + 2 * size, struct.pack("<H", (base + rnd) & 0xFFFF))  # used_event
            assert t.avail_pending() == 2
            assert t.pop(8) == 2
            t.copy(0, True, 3, 0, b"x" * 70)
            assert t.complete(random.Random(rnd), 2, [0x40, 7]) == 0
            t.needs_notification()
            base = (base + 2) & 0xFFFF
            total += 2
        assert t.st[0].next_avail == (0xFFFE + total) & 0xFFFF
        assert t.logs[0].dirty_pages()  # used-ring pages were logged by both


def test_packed_wrap_and_event_suppression() -> None:
    size = 3
    with twin() as t:
        desc, drv, dev = ring_layout(True, size)
        assert t.setup(True, size, True) == 0
        wrap = 1
        pos = 0
        for rnd in range(8):
            f = (AV if wrap else US)  # available for the driver's wrap counter
            t.write_desc(desc + 16 * pos, BUF + 0x40 * rnd, 16, rnd, f | WRITE)
            t.write(drv, struct.pack("<HH", (pos + 1) % size | (wrap << 15), 2))
            assert t.pop(4) == 1
            t.copy(0, True, 0, 0, bytes(range(16)))
            assert t.complete(random.Random(0), 1, [16]) == 0
            t.needs_notification()
            t.set_notification(rnd % 2 == 0)
            pos += 1
            if pos == size:
                pos, wrap = 0, wrap ^ 1


def test_split_indirect_and_batch_capacity_no_room() -> None:
    size = 4
    with twin() as t:
        desc, drv, dev = _split(t, size)
        # chain 0: indirect with 4 entries; chain 1: 3 direct descriptors
        for k in range(4):
            t.write_desc(TABLE + 16 * k, BUF + 0x10 * k, 0x10, (WRITE if k >= 2 else 0) | (NEXT if k < 3 else 0), k + 1)
        t.write_desc(desc, TABLE, 64, IND, 0)
        t.write_desc(desc + 16, BUF, 8, NEXT, 2)
        t.write_desc(desc + 32, BUF + 8, 8, NEXT, 3)
        t.write_desc(desc + 48, BUF + 16, 8, WRITE, 0)
        _publish_split(t, drv, size, 0, [0, 1])
        assert t.pop(8, desc_cap=3) == -ErrorCode.BATCH_CAPACITY
        assert t.pop(8, desc_cap=4) == 1  # the second chain does not fit: stays available
        assert t.pop(8, desc_cap=4) == 1
        t.copy(0, False, 0, 100, b"")
        t.copy(1, True, 2, 0, b"abcdefgh")
        assert t.complete(random.Random(1), 2, [5, 9]) == 0


@pytest.mark.parametrize(
    "case,code",
    [
        ("avail_jump", ErrorCode.AVAIL_INDEX),
        ("head", ErrorCode.HEAD_INDEX),
        ("next", ErrorCode.DESC_INDEX),
        ("zero", ErrorCode.DESC_ZERO_LEN),
        ("hole", ErrorCode.DESC_ADDRESS),
        ("wrap64", ErrorCode.DESC_ADDRESS),
        ("order", ErrorCode.DESC_ORDER),
        ("loop", ErrorCode.CHAIN_TOO_LONG),
        ("nested", ErrorCode.INDIRECT_NESTED),
        ("chained", ErrorCode.INDIRECT_CHAINED),
        ("ind_len", ErrorCode.INDIRECT_LENGTH),
        ("ind_size", ErrorCode.INDIRECT_SIZE),
        ("ind_addr", ErrorCode.INDIRECT_ADDRESS),
        ("inflight", ErrorCode.INFLIGHT),
    ],
)
def test_split_each_error_code(case: str, code: ErrorCode) -> None:
    size = 4
    with twin() as t:
        desc, drv, dev = _split(t, size)
        t.write_desc(desc, BUF, 8, 0, 0)
        heads = [0]
        if case == "avail_jump":
            t.write(drv + 2, struct.pack("<H", 5))
            heads = []
        elif case == "head":
            heads = [4]
        elif case == "next":
            t.write_desc(desc, BUF, 8, NEXT, 9)
        elif case == "zero":
            t.write_desc(desc, BUF, 0, 0, 0)
        elif case == "hole":
            t.write_desc(desc, 0x2FFF0, 0x20, 0, 0)
        elif case == "wrap64":
            t.write_desc(desc, 2**64 - 8, 16, 0, 0)
        elif case == "order":
            t.write_desc(desc, BUF, 8, WRITE | NEXT, 1)
            t.write_desc(desc + 16, BUF, 8, 0, 0)
        elif case == "loop":
            t.write_desc(desc, BUF, 8, NEXT, 1)
            t.write_desc(desc + 16, BUF, 8, NEXT, 0)
        elif case == "nested":
            t.write_desc(desc, TABLE, 16, IND, 0)
            t.write_desc(TABLE, TABLE, 16, IND, 0)
        elif case == "chained":
            t.write_desc(desc, BUF, 8, NEXT, 1)
            t.write_desc(desc + 16, TABLE, 16, IND, 0)
        elif case == "ind_len":
            t.write_desc(desc, TABLE, 24, IND, 0)
        elif case == "ind_size":
            t.write_desc(desc, TABLE, 16 * 5, IND, 0)
        elif case == "ind_addr":
            t.write_desc(desc, 0x2FFF0, 32, IND, 0)
        elif case == "inflight":
            heads = [0, 0, 0, 0]
        if heads:
            _publish_split(t, drv, size, 0, heads)
        if case == "inflight":
            assert t.pop(8) == 4
            _publish_split(t, drv, size, 4, [0])
        assert t.pop(8) == -code
        assert t.pop(8) == -ErrorCode.BROKEN
        assert t.add_used([0], [0], [1]) in (0, -ErrorCode.USED_OVERFLOW)  # works on a broken queue


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_chain_of_more_than_4gib(packed: bool) -> None:
    big = 0x100000000  # 2 GiB + 64 KiB of lazily-mapped anonymous memory per core
    with twin(layout=[(0, 0x20000), (big, 0x80010000)]) as t:
        t.compare_regions = [0]  # the rings; the big region is only read
        desc, drv, dev = ring_layout(packed, 4)
        assert t.setup(packed, 4, False) == 0
        f = AV if packed else 0
        t.write_desc(desc, big, 0x80000000, *((0, f | NEXT) if packed else (NEXT, 1)))
        t.write_desc(desc + 16, big, 0x80000000, *((0, f | NEXT) if packed else (NEXT, 2)))  # exactly 4 GiB: fine
        t.write_desc(desc + 32, big, 1, *((7, f) if packed else (0, 0)))
        if not packed:
            _publish_split(t, drv, 4, 0, [0])
        assert t.pop(4) == -ErrorCode.CHAIN_TOO_BIG
        t.edit(broken=0)
        t.write_desc(desc + 32, big + 5, 0x10, *((7, f) if packed else (0, 0)))
        t.write_desc(desc + 16, big, 0x7FFFFFF0, *((0, f | NEXT) if packed else (NEXT, 2)))
        assert t.pop(4) == 1
        t.copy(0, False, 0x7FFFFFF8, 0x20, b"")


def test_packed_errors_and_reserved_flags() -> None:
    size = 4
    with twin() as t:
        desc, drv, dev = ring_layout(True, size)
        t.setup(True, size, False)
        t.write_desc(TABLE, BUF, 4, 123, NEXT | IND | AV)
        t.write_desc(TABLE + 16, BUF, 8, 0, WRITE)
        t.write_desc(desc, TABLE, 32, 3, AV | IND)
        assert t.pop(8) == 1
        t.write_desc(desc + 16, BUF, 4, 1, AV | NEXT)
        t.write_desc(desc + 32, BUF, 4, 1, AV | IND)
        assert t.pop(8) == -ErrorCode.INDIRECT_CHAINED
    with twin() as t:
        desc, drv, dev = ring_layout(True, size)
        t.setup(True, size, False)
        for i in range(size):
            t.write_desc(desc + 16 * i, BUF, 4, i, AV | NEXT)
        assert t.pop(8) == -ErrorCode.CHAIN_TOO_LONG


def test_used_api_misuse() -> None:
    with twin() as t:
        desc, drv, dev = _split(t, 4)
        assert t.add_used([4], [0], [1]) == -ErrorCode.USED_ID
        assert t.add_used([1], [0], [1]) == -ErrorCode.USED_OVERFLOW
        assert t.add_used([], [], [], as_cdata=True) == 0
        assert t.add_used([2, 2**40], [0, 0], [1, 1]) == -ErrorCode.USED_ID  # does not fit a u32
        assert t.add_used([2**40, 2], [0, 0], [1, 1]) == -ErrorCode.USED_ID
    with twin() as t:
        t.setup(True, 4, False)
        assert t.add_used([1], [0], [0]) == -ErrorCode.USED_SLOTS
        assert t.add_used([1, 1], [0, 0], [1, 2**33]) == -ErrorCode.USED_SLOTS
        assert t.add_used([1], [0], [5], as_cdata=True) == -ErrorCode.USED_SLOTS
        assert t.add_used([1], [0], [2]) == -ErrorCode.USED_OVERFLOW


@pytest.mark.parametrize(
    "addrs,lens,skip,n,data",
    [
        ([BUF, 0x1FFF8], [16, 16], 0, 32, None),  # across adjacent regions
        ([BUF, 0x1FFF8], [16, 16], 3, 20, b"y" * 25),
        ([BUF, 0x2FFF8], [16, 16], 0, 32, None),  # second buffer crosses into the hole
        ([BUF, 0x2FFF8], [16, 16], 0, 0, b"z" * 32),  # first piece written, then the error
        ([2**64 - 4], [16], 0, 8, None),
        ([2**64 - 4], [16], 8, 8, b"12345678"),  # address + skip beyond 2**64
        ([0x50000], [4], 0, 4, b"abcd"),
        ([BUF], [8], 10, 4, None),  # skip past everything
    ],
)
def test_copy_helpers_raw(addrs, lens, skip, n, data) -> None:
    with twin() as t:
        t.write(BUF, bytes(range(16)))
        t.raw_copy(addrs, lens, skip, n, data)


def test_closed_memory_copy_raises_the_same() -> None:
    with twin() as t:
        addrs, lens = [BUF], [8]
        for m in t.mems:
            m.close()
        outs = [Outcome(lambda c=c, m=m: c.gather(m, NC.ffi.new("uint64_t[]", addrs) if c is NC else addrs,
                                                  NC.ffi.new("uint32_t[]", lens) if c is NC else lens, 0, 1, 0, 4))
                for c, m in zip(CORES, t.mems)]  # fmt: skip
        assert outs[0] == outs[1] and outs[0].exc is not None
        t.mems = [_memory(MEM_LAYOUT) for _ in CORES]


# =========================================== whole device loops through the Queue API
def _device_trace(core: Any, seed: int, packed: bool, size: int, event_idx: bool) -> list[Any]:
    """Run a device loop through Queue/DescriptorChain/Reader/Writer with ``core``
    forced; record every result, exception and the memory/log after each round."""
    from vhostuser.virtqueue import chain as chain_mod  # noqa: PLC0415
    from vhostuser.virtqueue import queue as queue_mod  # noqa: PLC0415
    from vhostuser.virtqueue.driver import RingDriver  # noqa: PLC0415

    trace: list[Any] = []
    rng = random.Random(seed)
    mp = pytest.MonkeyPatch()
    mp.setattr(queue_mod, "get_core", lambda: core)
    mp.setattr(chain_mod, "get_core", lambda: core)
    mem = GuestMemory.anonymous([(0, 0x40000), (0x40000, 0x40000)])
    dlog = DirtyLog.for_memory(mem)
    try:
        drv = RingDriver.create(mem, size, packed=packed, event_idx=event_idx)
        q = drv.make_queue()
        assert q.state.__class__ is core.QueueState
        q.set_dirty_log(dlog)
        q.set_used_log(drv.device_gpa)
        held: list[Any] = []
        for rnd in range(60):
            for _ in range(rng.randrange(0, 4)):
                if drv.num_free >= 4:
                    rd = [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(0, 3))]
                    wr = [rng.randrange(1, 200) for _ in range(rng.randrange(0 if rd else 1, 3))]
                    drv.add(rd, wr, indirect=rng.random() < 0.3)
            drv.publish()
            trace.append(("kick", drv.kick_needed()))
            out = Outcome(lambda: q.pop_batch(rng.randrange(1, 5)))
            chains = out.value or []
            trace.append(("pop", [repr(c) for c in chains], out.exc))
            for c in chains:
                trace.append(("descs", c.descriptors(), c.readable_buffers(), c.writable_buffers(), c.id, c.desc_count))
                r = c.reader()
                if rng.random() < 0.5:
                    r2 = r.split_at(rng.randrange(0, 8))
                    trace.append(("split", r.read(), r2.read(3), r2.read_all()))
                else:
                    trace.append(("read", r.read(rng.randrange(0, 20)), Outcome(lambda: r.read_exact(5)),
                                  Outcome(lambda: r.read_u16()), r.read_all(), r.bytes_read))  # fmt: skip
                w = c.writer()
                trace.append(("write", Outcome(lambda: w.write(rng.randbytes(rng.randrange(0, 250)))),
                              Outcome(lambda: w.write_u32(0xDEADBEEF)), w.bytes_written, w.available_bytes))  # fmt: skip
                held.append((c, w.bytes_written))
            rng.shuffle(held)
            k = rng.randrange(0, len(held) + 1)
            done, held = held[:k], held[k:]
            trace.append(("used", Outcome(lambda: q.add_used_batch(done))))
            trace.append(("notify", Outcome(q.needs_notification)))
            if rng.random() < 0.3:
                trace.append(("enable", Outcome(q.enable_notification)))
            elif rng.random() < 0.2:
                trace.append(("disable", Outcome(q.disable_notification)))
            trace.append(("got", drv.get_used(), q.next_avail, q.next_used, q.vring_base(), q.has_available()))
            trace.append(("mem", bytes(mem.regions[0].view), bytes(dlog.view)))
        trace.append(("misuse", Outcome(lambda: q.add_used(size + 3 if not packed else held[0][0] if held else 0, 1))))
        q.set_ready(False)
    finally:
        mp.undo()
        mem.close()
        dlog.close()
    return trace


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["noevt", "evt"])
@pytest.mark.parametrize("size", [2, 8, 64])
def test_queue_api_traces_identical(packed: bool, event_idx: bool, size: int) -> None:
    for seed in range(2):
        a = _device_trace(PC, seed, packed, size, event_idx)
        b = _device_trace(NC, seed, packed, size, event_idx)
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert x == y, f"trace entry {i}: {x!r:.300} != {y!r:.300}"
