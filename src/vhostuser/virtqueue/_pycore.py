"""The pure-Python ring core: the reference for the C core (docs/ring-core.md).

Everything here works on plain state: a :class:`QueueState` record, a guest
memory table (a :class:`~vhostuser.memory.GuestMemory`), a :class:`ChainBatch`
of flat arrays.  Functions return ``0``/a count on success and ``-ErrorCode`` on
failure, with details in ``state.err_a``/``state.err_b``; they never raise for a
hostile ring.  The C twin implements the same functions with the same results,
step for step: the ORDER of checks below is part of the contract.
"""
from __future__ import annotations

import bisect
import errno
import os
import struct
import threading
import time
from typing import Any

from ..errors import GuestMemoryError
from ..memory import GuestMemory
from .defs import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Layout,
)
from .errcodes import BREAKS_QUEUE, ErrorCode

__all__ = [
    "NAME",
    "QueueState",
    "ChainBatch",
    "configure",
    "pop_batch",
    "add_used_batch",
    "needs_notification",
    "set_notification",
    "avail_pending",
    "gather",
    "gather_into",
    "scatter",
    "chain_io",
    "chain_heads",
    "poll",
    "IO_NONE",
    "IO_READ",
    "IO_WRITE",
]

NAME = "python"

_DESC = struct.Struct("<QIHH")  # split: addr, len, flags, next / packed: addr, len, id, flags
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_USED_ELEM = struct.Struct("<II")
_PACKED_USED = struct.Struct("<IHH")  # len, id, flags at offset 8 of a packed descriptor
_FENCE_LOCK = threading.Lock()

E = ErrorCode
_SPLIT = Layout.SPLIT
_PACKED = Layout.PACKED


def fence() -> None:
    """Full memory barrier (best effort in Python: a lock round trip is a locked
    instruction on x86; the C core uses ``atomic_thread_fence(seq_cst)``)."""
    with _FENCE_LOCK:
        pass


class QueueState:
    """Plain per-queue state; field names are those of ``struct vu_queue`` in C."""

    __slots__ = (
        "layout", "size", "ready", "event_idx",
        "desc_gpa", "driver_gpa", "device_gpa",
        "next_avail", "avail_wrap", "next_used", "used_wrap",
        "num_added", "inflight", "notify_enabled",
        "broken", "err_a", "err_b",
        "log", "log_used", "log_guest_addr",
        "desc_mv", "driver_mv", "device_mv",
    )  # fmt: skip

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the power-on state (keeps nothing)."""
        self.layout = _SPLIT
        self.size = 0
        self.ready = False
        self.event_idx = False
        self.desc_gpa = 0
        self.driver_gpa = 0  # split: avail ring; packed: driver event suppression area
        self.device_gpa = 0  # split: used ring;  packed: device event suppression area
        self.next_avail = 0  # split: free-running u16; packed: ring position
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.num_added = 0  # used ring slots written since the last needs_notification
        self.inflight = 0  # split: chains; packed: ring slots popped and not yet used
        self.notify_enabled = True
        self.broken = 0
        self.err_a = 0
        self.err_b = 0
        self.log: Any = None  # DirtyLog or None
        self.log_used = False
        self.log_guest_addr = 0
        self.desc_mv: memoryview | None = None
        self.driver_mv: memoryview | None = None
        self.device_mv: memoryview | None = None


class ChainBatch:
    """Flat output of :func:`pop_batch`.

    Per chain ``i`` (``0 <= i < count``): ``head[i]`` (split head index / packed
    buffer id), ``slots[i]`` (ring descriptors the chain occupies: 1 for split),
    ``desc_start[i]``, ``ndesc[i]``, ``nread[i]`` (its readable descriptors come
    first), ``read_bytes[i]``, ``write_bytes[i]``.  Per descriptor ``j``:
    ``addr[j]`` (gpa), ``len[j]``, ``flags[j]`` (``VIRTQ_DESC_F_WRITE`` or 0).
    """

    __slots__ = (
        "count", "desc_cap", "head", "slots", "desc_start", "ndesc", "nread",
        "read_bytes", "write_bytes", "addr", "len", "flags",
    )  # fmt: skip

    def __init__(self, desc_cap: int) -> None:
        self.count = 0
        self.desc_cap = desc_cap
        self.head: list[int] = []
        self.slots: list[int] = []
        self.desc_start: list[int] = []
        self.ndesc: list[int] = []
        self.nread: list[int] = []
        self.read_bytes: list[int] = []
        self.write_bytes: list[int] = []
        self.addr: list[int] = []
        self.len: list[int] = []
        self.flags: list[int] = []


# ----------------------------------------------------------------- memory helpers
def _region_view(mem: GuestMemory, gpa: int, length: int) -> memoryview | None:
    """A view of ``[gpa, gpa+length)`` if it lies inside ONE region, else None."""
    starts = mem._starts
    i = bisect.bisect_right(starts, gpa) - 1
    if i < 0 or gpa + length > mem._ends[i]:
        return None
    off = gpa - starts[i]
    return mem._views[i][off : off + length]


def _in_memory(mem: GuestMemory, gpa: int, length: int) -> bool:
    """True if every byte of the range is guest memory (adjacent regions allowed)."""
    starts = mem._starts
    i = bisect.bisect_right(starts, gpa) - 1
    if i >= 0 and gpa + length <= mem._ends[i]:
        return True
    return mem.check_range(gpa, length)


def _fail(st: QueueState, code: ErrorCode, a: int = 0, b: int = 0) -> int:
    st.err_a = a
    st.err_b = b
    if code in BREAKS_QUEUE:
        st.broken = int(code)
    return -int(code)


def _log(st: QueueState, gpa: int, length: int) -> None:
    if st.log is not None and st.log_used:
        st.log.mark(gpa, length)


# ---------------------------------------------------------------------- configure
def configure(st: QueueState, mem: GuestMemory) -> int:
    """Validate the configuration and resolve the ring areas in ``mem``.

    Checks, in order: size, alignment of desc/driver/device areas, each area
    inside ONE region, (packed) next_avail/next_used < size.  On success the
    areas are resolved (C: host pointers) and 0 is returned.  Does not set
    ``ready``, does not touch ``broken``.
    """
    size = st.size
    packed = st.layout == _PACKED
    if size <= 0 or size > MAX_QUEUE_SIZE or (not packed and size & (size - 1)):
        return _fail(st, E.BAD_SIZE, size, MAX_QUEUE_SIZE)
    if packed:
        areas = ((st.desc_gpa, DESC_SIZE * size, 16), (st.driver_gpa, 4, 4), (st.device_gpa, 4, 4))
    else:
        extra = 2 if st.event_idx else 0
        areas = (
            (st.desc_gpa, DESC_SIZE * size, 16),
            (st.driver_gpa, 4 + 2 * size + extra, 2),
            (st.device_gpa, 4 + 8 * size + extra, 4),
        )
    for gpa, _, align in areas:
        if gpa % align:
            return _fail(st, E.RING_ALIGNMENT, gpa, align)
    views = []
    for gpa, length, _ in areas:
        v = _region_view(mem, gpa, length)
        if v is None:
            return _fail(st, E.RING_ADDRESS, gpa, length)
        views.append(v)
    if packed:
        if st.next_avail >= size:
            return _fail(st, E.BASE_RANGE, st.next_avail, size)
        if st.next_used >= size:
            return _fail(st, E.BASE_RANGE, st.next_used, size)
    st.desc_mv, st.driver_mv, st.device_mv = views
    return 0


# ------------------------------------------------------------------------- pop
def pop_batch(st: QueueState, mem: GuestMemory, max_chains: int, batch: ChainBatch) -> int:
    """Pop up to ``max_chains`` available chains into ``batch``.

    Returns the number of chains (0 if none), or ``-code``.  On a hostile ring the
    queue is marked broken and nothing of this batch is consumed.  A chain whose
    descriptors would exceed ``batch.desc_cap`` ends the batch, unconsumed.
    """
    if not st.ready:
        return _fail(st, E.NOT_READY)
    if st.broken:
        return _fail(st, E.BROKEN, st.broken, 0)
    if batch.desc_cap < st.size:
        return _fail(st, E.BATCH_CAPACITY, batch.desc_cap, st.size)
    if st.layout == _PACKED:
        n = _pop_packed(st, mem, max_chains, batch)
    else:
        n = _pop_split(st, mem, max_chains, batch)
    if n < 0:
        # nothing of this batch is consumed
        del batch.head[:], batch.slots[:], batch.desc_start[:], batch.ndesc[:], batch.nread[:]
        del batch.read_bytes[:], batch.write_bytes[:], batch.addr[:], batch.len[:], batch.flags[:]
        batch.count = 0
        return n
    batch.count = n
    if n and st.event_idx and st.notify_enabled:
        _write_avail_event(st)
    return n


class _NoRoom(Exception):
    """Internal: the chain does not fit in the batch."""


def _emit(
    st: QueueState, mem: GuestMemory, batch: ChainBatch, state: list[int], addr: int, ln: int, writable: int, idx: int
) -> int:
    """Check one buffer descriptor and append it.  ``state`` = [total, seen_write, nread].

    Returns 0 or -code.  Raises _NoRoom when the batch is full.
    """
    if ln == 0:
        return _fail(st, E.DESC_ZERO_LEN, addr)
    if addr + ln > 1 << 64 or not _in_memory(mem, addr, ln):
        return _fail(st, E.DESC_ADDRESS, addr, ln)
    if writable:
        state[1] = 1
    elif state[1]:
        return _fail(st, E.DESC_ORDER, idx)
    else:
        state[2] += 1
    state[0] += ln
    if state[0] > MAX_CHAIN_BYTES:
        return _fail(st, E.CHAIN_TOO_BIG, state[3])
    if len(batch.addr) >= batch.desc_cap:
        raise _NoRoom
    batch.addr.append(addr)
    batch.len.append(ln)
    batch.flags.append(VIRTQ_DESC_F_WRITE if writable else 0)
    return 0


def _begin_chain(batch: ChainBatch) -> int:
    return len(batch.addr)


def _end_chain(batch: ChainBatch, head: int, slots: int, start: int, state: list[int]) -> None:
    batch.head.append(head)
    batch.slots.append(slots)
    batch.desc_start.append(start)
    nd = len(batch.addr) - start
    batch.ndesc.append(nd)
    batch.nread.append(state[2])
    rb = sum(batch.len[start : start + state[2]])
    batch.read_bytes.append(rb)
    batch.write_bytes.append(state[0] - rb)


def _rollback(batch: ChainBatch, start: int) -> None:
    del batch.addr[start:], batch.len[start:], batch.flags[start:]


def _indirect_table(st: QueueState, mem: GuestMemory, addr: int, ln: int) -> tuple[int, memoryview | None]:
    """Checks shared by both layouts for an indirect descriptor (after NESTED/CHAINED)."""
    if ln == 0 or ln % DESC_SIZE:
        return _fail(st, E.INDIRECT_LENGTH, ln), None
    entries = ln // DESC_SIZE
    if entries > st.size:
        return _fail(st, E.INDIRECT_SIZE, entries, st.size), None
    view = _region_view(mem, addr, ln)
    if view is None:
        return _fail(st, E.INDIRECT_ADDRESS, addr, ln), None
    return entries, view


def _pop_split(st: QueueState, mem: GuestMemory, max_chains: int, batch: ChainBatch) -> int:
    # _emit / _begin_chain / _end_chain inlined: this loop is the Python core's
    # hottest (same checks, same order, same errors)
    size = st.size
    avail = st.driver_mv
    desc = st.desc_mv
    assert avail is not None and desc is not None
    avail_idx = _U16.unpack_from(avail, 2)[0]  # acquire: the C core loads it with acquire ordering
    pending = (avail_idx - st.next_avail) & 0xFFFF
    if pending > size:
        return _fail(st, E.AVAIL_INDEX, avail_idx, st.next_avail)
    na = st.next_avail
    inflight = st.inflight
    n = 0
    unpack = _DESC.unpack_from
    head_at = _U16.unpack_from
    b_addr, b_len, b_flags = batch.addr, batch.len, batch.flags
    cap = batch.desc_cap
    starts, ends = mem._starts, mem._ends
    bisect_right = bisect.bisect_right
    while n < max_chains and pending:
        if inflight + 1 > size:
            return _fail(st, E.INFLIGHT, inflight + 1, size)
        head = head_at(avail, 4 + 2 * (na % size))[0]
        if head >= size:
            return _fail(st, E.HEAD_INDEX, head, size)
        start = len(b_addr)
        total = seen_write = nread = rbytes = 0
        table, entries, in_indirect = desc, size, False
        idx, count = head, 0
        full = False
        while True:
            addr, ln, flags, nxt = unpack(table, idx * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    return _fail(st, E.INDIRECT_NESTED, idx)
                if count or flags & VIRTQ_DESC_F_NEXT:
                    return _fail(st, E.INDIRECT_CHAINED, idx)
                entries, view = _indirect_table(st, mem, addr, ln)
                if view is None:
                    return entries
                table, in_indirect, idx = view, True, 0
                continue
            count += 1
            if count > entries:
                return _fail(st, E.CHAIN_TOO_LONG, head, entries)
            if ln == 0:
                return _fail(st, E.DESC_ZERO_LEN, addr)
            i = bisect_right(starts, addr) - 1
            if addr + ln > 1 << 64 or not (i >= 0 and addr + ln <= ends[i] or mem.check_range(addr, ln)):
                return _fail(st, E.DESC_ADDRESS, addr, ln)
            writable = flags & VIRTQ_DESC_F_WRITE
            if writable:
                seen_write = 1
            elif seen_write:
                return _fail(st, E.DESC_ORDER, idx)
            else:
                nread += 1
                rbytes += ln
            total += ln
            if total > MAX_CHAIN_BYTES:
                return _fail(st, E.CHAIN_TOO_BIG, head)
            if len(b_addr) >= cap:
                full = True
                break
            b_addr.append(addr)
            b_len.append(ln)
            b_flags.append(VIRTQ_DESC_F_WRITE if writable else 0)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            idx = nxt
            if idx >= entries:
                return _fail(st, E.DESC_INDEX, idx, entries)
        if full:
            _rollback(batch, start)
            break
        batch.head.append(head)
        batch.slots.append(1)
        batch.desc_start.append(start)
        batch.ndesc.append(len(b_addr) - start)
        batch.nread.append(nread)
        batch.read_bytes.append(rbytes)
        batch.write_bytes.append(total - rbytes)
        na = (na + 1) & 0xFFFF
        pending -= 1
        inflight += 1
        n += 1
    st.next_avail = na
    st.inflight = inflight
    return n


def _packed_available(st: QueueState, pos: int, wrap: int) -> bool:
    assert st.desc_mv is not None
    flags = _U16.unpack_from(st.desc_mv, pos * DESC_SIZE + 14)[0]
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(wrap) and bool(flags & VIRTQ_DESC_F_USED) != bool(wrap)


def _pop_packed(st: QueueState, mem: GuestMemory, max_chains: int, batch: ChainBatch) -> int:
    size = st.size
    desc = st.desc_mv
    assert desc is not None
    pos, wrap = st.next_avail, st.avail_wrap
    inflight = st.inflight
    n = 0
    unpack = _DESC.unpack_from
    while n < max_chains and _packed_available(st, pos, wrap):
        # acquire: descriptor contents are read after the head's flags
        start = _begin_chain(batch)
        state = [0, 0, 0, pos]
        i, slots = pos, 0
        try:
            while True:
                addr, ln, bid, flags = unpack(desc, i * DESC_SIZE)
                slots += 1
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if slots > 1 or flags & VIRTQ_DESC_F_NEXT:
                        return _fail(st, E.INDIRECT_CHAINED, i)
                    entries, view = _indirect_table(st, mem, addr, ln)
                    if view is None:
                        return entries
                    for k in range(entries):
                        a, l, _id, f = unpack(view, k * DESC_SIZE)  # only WRITE is meaningful here
                        rc = _emit(st, mem, batch, state, a, l, f & VIRTQ_DESC_F_WRITE, k)
                        if rc:
                            return rc
                    break
                if slots > size:
                    return _fail(st, E.CHAIN_TOO_LONG, pos, size)
                rc = _emit(st, mem, batch, state, addr, ln, flags & VIRTQ_DESC_F_WRITE, i)
                if rc:
                    return rc
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                i += 1
                if i == size:
                    i = 0
        except _NoRoom:
            _rollback(batch, start)
            break
        if inflight + slots > size:
            return _fail(st, E.INFLIGHT, inflight + slots, size)
        _end_chain(batch, bid, slots, start, state)  # buffer id: from the last ring descriptor
        inflight += slots
        pos += slots
        if pos >= size:
            pos -= size
            wrap ^= 1
        n += 1
    st.next_avail, st.avail_wrap = pos, wrap
    st.inflight = inflight
    return n


def avail_pending(st: QueueState, mem: GuestMemory) -> int:
    """Split: number of chains the driver made available and we have not popped
    (may exceed the size on a hostile ring); packed: 1 if the next descriptor is
    available, else 0.  ``-NOT_READY`` if not ready."""
    if not st.ready:
        return _fail(st, E.NOT_READY)
    if st.layout == _PACKED:
        return int(_packed_available(st, st.next_avail, st.avail_wrap))
    assert st.driver_mv is not None
    return (_U16.unpack_from(st.driver_mv, 2)[0] - st.next_avail) & 0xFFFF


# ------------------------------------------------------------------------ used
def add_used_batch(st: QueueState, mem: GuestMemory, ids: list[int], lens: list[int], slots: list[int], n: int) -> int:
    """Publish ``n`` used entries (``ids[k]``, ``lens[k]``, ring ``slots[k]``) with ONE
    release of the used index (split) / of the first used descriptor's flags (packed).

    All entries are validated before anything is written; on error nothing is
    written and the queue is not broken.  Works on a broken queue.
    """
    if not st.ready:
        return _fail(st, E.NOT_READY)
    if n == 0:
        return 0
    size = st.size
    if st.layout == _PACKED:
        total = 0
        for k in range(n):
            s = slots[k]
            if s < 1 or s > size:
                return _fail(st, E.USED_SLOTS, s, size)
            total += s
        if total > st.inflight:
            return _fail(st, E.USED_OVERFLOW, total, st.inflight)
        desc = st.desc_mv
        assert desc is not None
        pos, wrap = st.next_used, st.used_wrap
        first_off = first_flags = 0
        for k in range(n):
            ln = lens[k]
            flags = (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0) | (VIRTQ_DESC_F_WRITE if ln else 0)
            off = pos * DESC_SIZE
            _U32.pack_into(desc, off + 8, ln)
            _U16.pack_into(desc, off + 12, ids[k])
            if k == 0:
                first_off, first_flags = off, flags
            else:
                _U16.pack_into(desc, off + 14, flags)
            _log(st, st.desc_gpa + off, DESC_SIZE)
            pos += slots[k]
            if pos >= size:
                pos -= size
                wrap ^= 1
        fence()  # release: everything above before the first descriptor's flags
        _U16.pack_into(desc, first_off + 14, first_flags)
        st.next_used, st.used_wrap = pos, wrap
        st.num_added += total
        st.inflight -= total
        return 0
    for k in range(n):
        if ids[k] >= size:
            return _fail(st, E.USED_ID, ids[k], size)
    if n > st.inflight:
        return _fail(st, E.USED_OVERFLOW, n, st.inflight)
    used = st.device_mv
    assert used is not None
    nu = st.next_used
    for k in range(n):
        off = 4 + 8 * ((nu + k) % size)
        _USED_ELEM.pack_into(used, off, ids[k], lens[k])
        _log(st, st.log_guest_addr + off, 8)
    nu = (nu + n) & 0xFFFF
    fence()  # release: used elements before the index
    _U16.pack_into(used, 2, nu)
    _log(st, st.log_guest_addr + 2, 2)
    st.next_used = nu
    st.num_added += n
    st.inflight -= n
    return 0


def _need_event(event: int, new: int, old: int) -> bool:
    """``vring_need_event`` of the spec: u16 arithmetic."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def needs_notification(st: QueueState, mem: GuestMemory) -> int:
    """1 if the driver must be notified of the used entries added since the last
    call, else 0 (``-NOT_READY``).  Resets the added count."""
    if not st.ready:
        return _fail(st, E.NOT_READY)
    fence()  # used writes before reading the driver's suppression state
    added = st.num_added
    st.num_added = 0
    if added == 0:
        return 0
    size = st.size
    if st.layout == _PACKED:
        assert st.driver_mv is not None
        off_wrap, flags = struct.unpack_from("<HH", st.driver_mv, 0)
        flags &= 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return 0
        if flags != RING_EVENT_FLAGS_DESC or not st.event_idx or added >= size:
            return 1
        event = off_wrap & 0x7FFF
        if (off_wrap >> 15) != st.used_wrap:
            event -= size
        new = st.next_used
        return int(_need_event(event & 0xFFFF, new, (new - added) & 0xFFFF))
    assert st.driver_mv is not None
    if not st.event_idx:
        return int(not _U16.unpack_from(st.driver_mv, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)
    if added >= size:
        return 1
    used_event = _U16.unpack_from(st.driver_mv, 4 + 2 * size)[0]
    new = st.next_used
    return int(_need_event(used_event, new, (new - added) & 0xFFFF))


def _write_avail_event(st: QueueState) -> None:
    if st.layout == _PACKED:
        assert st.device_mv is not None
        _U16.pack_into(st.device_mv, 0, st.next_avail | (st.avail_wrap << 15))
        _log(st, st.device_gpa, 2)
    else:
        assert st.device_mv is not None
        off = 4 + 8 * st.size
        _U16.pack_into(st.device_mv, off, st.next_avail)
        _log(st, st.log_guest_addr + off, 2)


def set_notification(st: QueueState, mem: GuestMemory, enable: int) -> int:
    """Enable or disable available-buffer notifications (kicks) from the driver.

    Enable returns 1 if buffers are already available (re-check after enabling,
    so none is missed), else 0; disable returns 0.  ``-NOT_READY`` if not ready.
    """
    if not st.ready:
        return _fail(st, E.NOT_READY)
    st.notify_enabled = bool(enable)
    assert st.device_mv is not None
    if st.layout == _PACKED:
        if enable:
            if st.event_idx:
                _write_avail_event(st)
                flags = RING_EVENT_FLAGS_DESC
            else:
                flags = RING_EVENT_FLAGS_ENABLE
        else:
            flags = RING_EVENT_FLAGS_DISABLE
        _U16.pack_into(st.device_mv, 2, flags)
        _log(st, st.device_gpa + 2, 2)
    elif st.event_idx:
        if enable:
            _write_avail_event(st)
        # disable with EVENT_IDX: nothing to write (the driver kicks at most once more)
    else:
        _U16.pack_into(st.device_mv, 0, 0 if enable else VIRTQ_USED_F_NO_NOTIFY)
        _log(st, st.log_guest_addr, 2)
    if not enable:
        return 0
    fence()  # the enable store before re-reading the driver's state
    if st.layout == _PACKED:
        return int(_packed_available(st, st.next_avail, st.avail_wrap))
    assert st.driver_mv is not None
    return int(_U16.unpack_from(st.driver_mv, 2)[0] != st.next_avail)


# ------------------------------------------------------------------ copy helpers
def log_written(log: Any, batch: ChainBatch, first: int, count: int, lens: Any) -> None:
    """Dirty-log what ``add_used`` reports written: for chains ``first`` ..
    ``first + count - 1`` of ``batch``, the first ``lens[k]`` bytes of chain
    ``first + k``'s device-writable buffers are marked in ``log`` (a DirtyLog)."""
    addrs, blens, starts, nread, ndesc = batch.addr, batch.len, batch.desc_start, batch.nread, batch.ndesc
    for k in range(count):
        i = first + k
        left = lens[k]
        s = starts[i]
        for j in range(s + nread[i], s + ndesc[i]):
            if left <= 0:
                break
            n = blens[j] if blens[j] < left else left
            log.mark(addrs[j], n)
            left -= n


def gather(mem: GuestMemory, addrs: Any, lens: Any, start: int, count: int, skip: int, n: int) -> bytes:
    """Copy ``n`` bytes out of the buffers ``addrs[start:start+count]`` /
    ``lens[...]``, after skipping ``skip`` bytes of them.  Short if they end."""
    out = []
    for j in range(start, start + count):
        ln = lens[j]
        if skip >= ln:
            skip -= ln
            continue
        take = min(ln - skip, n)
        out.append(mem.read(addrs[j] + skip, take))
        n -= take
        skip = 0
        if n == 0:
            break
    return b"".join(out)


def gather_into(mem: GuestMemory, addrs: Any, lens: Any, start: int, count: int, skip: int, dst: Any, n: int) -> int:
    """:func:`gather` of ``n`` bytes into ``dst``, a writable bytearray or byte
    memoryview of at least ``n`` bytes; returns the count copied (short if the
    buffers end)."""
    data = gather(mem, addrs, lens, start, count, skip, n)
    dst[: len(data)] = data
    return len(data)


def scatter(mem: GuestMemory, addrs: Any, lens: Any, start: int, count: int, skip: int, data: Any) -> int:
    """Copy ``data`` into the buffers (as :func:`gather`); returns bytes written
    (less than ``len(data)`` only if the buffers end)."""
    src = memoryview(data).cast("B")
    pos = 0
    total = src.nbytes
    for j in range(start, start + count):
        if pos >= total:
            break
        ln = lens[j]
        if skip >= ln:
            skip -= ln
            continue
        take = min(ln - skip, total - pos)
        mem.write(addrs[j] + skip, src[pos : pos + take])
        pos += take
        skip = 0
    return pos


# ------------------------------------------------------------------- batch I/O
#: chain_io operations (``ops[k]``)
IO_NONE = 0
IO_READ = 1  # file -> the chain's writable bytes [0, write_bytes - tail)
IO_WRITE = 2  # the chain's readable bytes [skip, read_bytes) -> file
#: most pieces one chain's transfer may have (IOV_MAX on Linux)
MAX_IOV = 1024
_SIGNAL = struct.pack("=Q", 1)


def check_io_args(batch: Any, first: int, n: int, *arrays: Any) -> None:
    """Raise ValueError unless chains ``first..first+n-1`` are in ``batch`` and
    every per-chain array has at least ``n`` entries (the C core trusts both)."""
    if first < 0 or n < 0 or first + n > batch.count:
        raise ValueError(f"chains [{first}, +{n}) are not in a batch of {batch.count}")
    for a in arrays:
        if len(a) < n:
            raise ValueError(f"a per-chain array has {len(a)} entries, {n} needed")


def _iov(mem: GuestMemory, batch: Any, d0: int, d1: int, skip: int, want: int) -> list[memoryview] | None:
    """The views of ``want`` bytes of descriptors [d0, d1) after ``skip``, or None."""
    out: list[memoryview] = []
    addrs, lens = batch.addr, batch.len
    for j in range(d0, d1):
        if not want:
            break
        ln = lens[j]
        if skip >= ln:
            skip -= ln
            continue
        take = min(ln - skip, want)
        view = _region_view(mem, addrs[j] + skip, take)  # the common case: one region
        if view is not None:
            out.append(view)
        else:
            try:
                out += mem.get_slices(addrs[j] + skip, take)
            except GuestMemoryError:
                return None
        if len(out) > MAX_IOV:
            return None
        skip = 0
        want -= take
    return None if want else out


def _transfer(fd: int, write: bool, views: list[memoryview], off: int) -> int:
    """pwritev/preadv all of ``views`` at ``off`` (short transfers retried): 0 or errno."""
    while views:
        try:
            got = os.pwritev(fd, views, off) if write else os.preadv(fd, views, off)
        except OSError as exc:
            return exc.errno or errno.EIO
        if got == 0:
            return errno.EIO if write else errno.ENODATA
        off += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views = views[1:]
        if views and got:
            views[0] = views[0][got:]
    return 0


def _one_chain(mem: GuestMemory, b: Any, i: int, fd: int, op: int, off: int, skip: int, tail: int,
               ok: int, err: int, lens: Any, k: int) -> int:
    d0 = b.desc_start[i]
    dw, d1 = d0 + b.nread[i], d0 + b.ndesc[i]
    wbytes, rbytes = b.write_bytes[i], b.read_bytes[i]
    status = None
    for j in range(d1 - 1, dw - 1, -1):
        if b.len[j]:
            status = _region_view(mem, b.addr[j] + b.len[j] - 1, 1)
            break
    if wbytes < tail or wbytes > 0xFFFFFFFF or (tail and status is None):
        lens[k] = 0
        return errno.EINVAL
    lens[k] = wbytes
    if op == IO_READ:
        views = _iov(mem, b, dw, d1, 0, wbytes - tail)
    else:
        views = None if rbytes < skip else _iov(mem, b, d0, dw, skip, rbytes - skip)
    rc = errno.EFAULT if views is None else _transfer(fd, op == IO_WRITE, views, off)
    if tail:
        assert status is not None
        status[0] = err if rc else ok
    if rc:
        lens[k] = tail  # a failed request reports its status byte only
    return rc


def _publish(st: QueueState, mem: GuestMemory, b: Any, start: int, n: int, lens: Any, k0: int, call_fd: int) -> int:
    """Log, add_used and maybe notify chains start..start+n-1 (lens from lens[k0]):
    -code, or 1 if notified, else 0."""
    ln = [lens[k0 + k] for k in range(n)]
    dlog = st.log
    if dlog is not None:
        for k in range(n):
            i = start + k
            d0 = b.desc_start[i]
            left = ln[k]
            for j in range(d0 + b.nread[i], d0 + b.ndesc[i]):
                if not left:
                    break
                take = min(b.len[j], left)
                dlog.mark(b.addr[j], take)
                left -= take
    rc = add_used_batch(st, mem, list(b.head[start:start + n]), ln, list(b.slots[start:start + n]), n)
    if rc < 0:
        return rc
    if call_fd >= 0 and needs_notification(st, mem) == 1:
        try:
            os.write(call_fd, _SIGNAL)
        except BlockingIOError:
            pass  # a signal is pending already
        return 1
    return 0


def chain_io(st: QueueState | None, mem: GuestMemory, batch: ChainBatch, first: int, n: int, fd: int, ops: Any,
             offsets: Any, skip: int, tail: int, ok: int, err: int, lens: Any, errs: Any, every: int,
             call_fd: int) -> int:
    """Vectored file I/O for chains ``first..first+n-1`` of ``batch``, their status
    bytes, and (with ``st``) their dirty-log marks and used entries, published
    every ``every`` chains with a notification when needed (contract: ring.h
    ``vu_chain_io``).  Returns the notifications sent, or -ErrorCode."""
    check_io_args(batch, first, n, ops, offsets, lens, errs)
    notified = done = 0
    if every <= 0:
        every = n if n else 1
    for k in range(n):
        op = ops[k]
        errs[k] = 0
        if op == IO_READ or op == IO_WRITE:
            errs[k] = _one_chain(mem, batch, first + k, fd, op, offsets[k], skip, tail, ok, err, lens, k)
        elif op != IO_NONE:
            errs[k] = errno.EINVAL
        if st is not None and k + 1 - done >= every:
            rc = _publish(st, mem, batch, first + done, k + 1 - done, lens, done, call_fd)
            if rc < 0:
                return rc
            notified += rc
            done = k + 1
    if st is not None and done < n:
        rc = _publish(st, mem, batch, first + done, n - done, lens, done, call_fd)
        if rc < 0:
            return rc
        notified += rc
    return notified


def chain_heads(mem: GuestMemory, batch: ChainBatch, first: int, n: int, hlen: int) -> tuple[bytes, list[int], list[int]]:
    """The first ``hlen`` readable bytes of chains ``first..first+n-1`` as one flat
    buffer (each zero-filled when shorter), with their readable and writable byte
    counts."""
    check_io_args(batch, first, n)
    out = bytearray(n * hlen)
    rb = batch.read_bytes
    addrs, lens = batch.addr, batch.len
    for k in range(n):
        i = first + k
        want = min(rb[i], hlen)
        d0 = batch.desc_start[i]
        if want and batch.nread[i] and lens[d0] >= want:  # the common case: one descriptor, one region
            view = _region_view(mem, addrs[d0], want)
            if view is not None:
                out[k * hlen : k * hlen + want] = view
                continue
        try:
            data = gather(mem, addrs, lens, d0, batch.nread[i], 0, want)
        except GuestMemoryError:
            continue
        out[k * hlen : k * hlen + len(data)] = data
    return bytes(out), list(rb[first:first + n]), list(batch.write_bytes[first:first + n])


def poll(st: QueueState, mem: GuestMemory, ns: int) -> int:
    """Busy-poll :func:`avail_pending` for up to ``ns`` nanoseconds: 1 as soon
    as buffers are available, 0 when the window ended, or -ErrorCode.  (Here
    the GIL is let go between checks; the C core spins without it.)"""
    end = time.perf_counter_ns() + ns
    while True:
        rc = avail_pending(st, mem)
        if rc:
            return 1 if rc > 0 else rc
        if time.perf_counter_ns() >= end:
            return 0
        time.sleep(0)
