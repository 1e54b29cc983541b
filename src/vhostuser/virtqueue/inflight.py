"""Inflight I/O tracking (vhost-user ``INFLIGHT_SHMFD``): crash recovery.

The back-end records, in a shared-memory area the front-end keeps for it
(GET_INFLIGHT_FD / SET_INFLIGHT_FD), which requests it has taken from a ring
and not yet completed.  When a back-end crashes and a new one connects, the
front-end hands it the same area; the new back-end resubmits what was in flight,
in the order it was taken, so no request is lost even when requests complete out
of order (which re-reading the ring from the used index cannot recover).

The area holds one region per queue, in the layouts the vhost-user spec gives
("Inflight I/O tracking"): ``QueueRegionSplit`` / ``DescStateSplit`` for split
rings and ``QueueRegionPacked`` / ``DescStatePacked`` (with its free list and
"old" copies for rolling back a half-written batch) for packed rings.  Updates
follow the spec's order, so a crash at any instant leaves a region that
:meth:`recover` makes consistent.

Only the back-end reads these regions (the front-end treats them as opaque), so
recording happens once per request in Python, outside the ring cores.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..memory import GuestMemory

log = logging.getLogger(__name__)

INFLIGHT_VERSION = 1
_ALIGN = 64

# split: QueueRegionSplit header, then DescStateSplit[desc_num]
_SPLIT_HDR = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
_SPLIT_DESC = struct.Struct("<B5xHQ")  # inflight, padding[5], next, counter
# packed: QueueRegionPacked header, then DescStatePacked[desc_num]
_PACKED_HDR = struct.Struct("<QHHHHHHBB10x")  # features version desc_num free_head old_free_head
#   used_idx old_used_idx used_wrap old_used_wrap padding[7] (+3: C aligns desc[] to 8, as in the spec's struct)
_PACKED_DESC = struct.Struct("<BxHHHQHHIQ")  # inflight pad next last num counter id flags len addr

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def queue_region_size(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's region (64-byte aligned)."""
    if packed:
        return _align(_PACKED_HDR.size + _PACKED_DESC.size * queue_size)
    return _align(_SPLIT_HDR.size + _SPLIT_DESC.size * queue_size)


@dataclass(frozen=True)
class RingDescriptor:
    """A packed-ring descriptor as the driver wrote it (saved for resubmission)."""

    addr: int
    len: int
    id: int
    flags: int


@dataclass(frozen=True)
class Resubmit:
    """A request to process again after a back-end restart.

    Split rings: ``head`` is the chain's head index in the descriptor table (still
    valid: the driver reuses it only after it is used).  Packed rings: ``head`` is
    the buffer id and ``descriptors`` are the ring descriptors of the chain.
    """

    counter: int
    head: int
    descriptors: tuple[RingDescriptor, ...] = ()
    #: packed: the region entry holding the chain (-1 for split rings)
    entry: int = -1


class SplitInflight:
    """The inflight region of one split virtqueue."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < queue_region_size(queue_size, False):
            raise ValueError(f"inflight region of {len(view)} bytes is too small for {queue_size} entries")
        self.view = view
        self.size = queue_size
        _, version, desc_num, _, _ = _SPLIT_HDR.unpack_from(view, 0)
        if version == 0:  # a new area: initialise it
            view[: queue_region_size(queue_size, False)] = bytes(queue_region_size(queue_size, False))
            _SPLIT_HDR.pack_into(view, 0, 0, INFLIGHT_VERSION, queue_size, 0, 0)
        elif version != INFLIGHT_VERSION or desc_num != queue_size:
            raise ValueError(f"inflight region has version {version} for {desc_num} entries; "
                             f"expected version {INFLIGHT_VERSION} for {queue_size}")
        self.counter = 1 + max((self._desc(i)[2] for i in range(queue_size)), default=0)

    def _desc(self, i: int) -> tuple[int, int, int]:
        return _SPLIT_DESC.unpack_from(self.view, _SPLIT_HDR.size + i * _SPLIT_DESC.size)

    def _set_desc(self, i: int, inflight: int, nxt: int, counter: int) -> None:
        _SPLIT_DESC.pack_into(self.view, _SPLIT_HDR.size + i * _SPLIT_DESC.size, inflight, nxt, counter)

    def _header(self) -> tuple[int, int, int, int, int]:
        return _SPLIT_HDR.unpack_from(self.view, 0)

    def popped(self, heads: Sequence[int]) -> None:
        """The device took these chains from the ring (in this order)."""
        for head in heads:
            _, nxt, _ = self._desc(head)
            self._set_desc(head, 1, nxt, self.counter)
            self.counter += 1

    def before_used(self, heads: Sequence[int]) -> None:
        """About to publish these completions: link them as the last batch."""
        features, version, desc_num, last, used_idx = self._header()
        for head in heads:
            inflight, _, counter = self._desc(head)
            self._set_desc(head, inflight, last, counter)
            last = head
        _SPLIT_HDR.pack_into(self.view, 0, features, version, desc_num, last, used_idx)

    def after_used(self, heads: Sequence[int], used_idx: int) -> None:
        """The used index (now ``used_idx``) was published: clear the batch."""
        for head in heads:
            _, nxt, counter = self._desc(head)
            self._set_desc(head, 0, nxt, counter)
        features, version, desc_num, last, _ = self._header()
        _SPLIT_HDR.pack_into(self.view, 0, features, version, desc_num, last, used_idx & 0xFFFF)

    def recover(self, used_ring_idx: int) -> list[Resubmit]:
        """After a restart: finish a half-recorded batch, then return the requests
        still in flight, oldest first.  ``used_ring_idx`` is the used ring's idx."""
        features, version, desc_num, last, used_idx = self._header()
        if used_idx != used_ring_idx & 0xFFFF:
            # the last batch was published but not cleared: clear it now
            batch = (used_ring_idx - used_idx) & 0xFFFF
            head = last
            for _ in range(min(batch, self.size)):
                _, nxt, counter = self._desc(head)
                self._set_desc(head, 0, nxt, counter)
                head = nxt
            _SPLIT_HDR.pack_into(self.view, 0, features, version, desc_num, last, used_ring_idx & 0xFFFF)
        pending = [Resubmit(counter, i) for i in range(self.size)
                   for inflight, _, counter in (self._desc(i),) if inflight]
        pending.sort(key=lambda r: r.counter)
        return pending


class PackedInflight:
    """The inflight region of one packed virtqueue (free list of saved descriptors)."""

    #: bytes of the region header (``QueueRegionPacked`` before ``desc[]``)
    HEADER_SIZE = _PACKED_HDR.size

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < queue_region_size(queue_size, True):
            raise ValueError(f"inflight region of {len(view)} bytes is too small for {queue_size} entries")
        self.view = view
        self.size = queue_size
        hdr = _PACKED_HDR.unpack_from(view, 0)
        version, desc_num = hdr[1], hdr[2]
        #: a new area (version 0): it knows nothing of the ring, whose position
        #: comes from SET_VRING_BASE (see :meth:`start_at`)
        self.fresh = version == 0
        if version == 0:
            view[: queue_region_size(queue_size, True)] = bytes(queue_region_size(queue_size, True))
            _PACKED_HDR.pack_into(view, 0, 0, INFLIGHT_VERSION, queue_size, 0, 0, 0, 0, 1, 1)
            for i in range(queue_size):
                self._set(i, next=i + 1)
        elif version != INFLIGHT_VERSION or desc_num != queue_size:
            raise ValueError(f"inflight region has version {version} for {desc_num} entries; "
                             f"expected version {INFLIGHT_VERSION} for {queue_size}")
        self.counter = 1 + max((self._get(i)[5] for i in range(queue_size)), default=0)

    # entry fields: inflight next last num counter id flags len addr
    def _get(self, i: int) -> list[int]:
        return list(_PACKED_DESC.unpack_from(self.view, _PACKED_HDR.size + i * _PACKED_DESC.size))

    def _set(self, i: int, **fields: int) -> None:
        names = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")
        values = self._get(i)
        for name, value in fields.items():
            values[names.index(name)] = value
        _PACKED_DESC.pack_into(self.view, _PACKED_HDR.size + i * _PACKED_DESC.size, *values)

    def _header(self) -> list[int]:
        return list(_PACKED_HDR.unpack_from(self.view, 0))

    def start_at(self, used_idx: int, used_wrap: int) -> None:
        """A new area for a ring that does not start at 0: record the used
        position SET_VRING_BASE gave (a live-migration destination, where the
        front-end's area is new but the ring is not)."""
        h = self._header()
        h[5] = h[6] = used_idx
        h[7] = h[8] = used_wrap
        self._put_header(h)

    def _put_header(self, h: list[int]) -> None:
        _PACKED_HDR.pack_into(self.view, 0, *h)

    def popped(self, chains: Sequence[Sequence[RingDescriptor]]) -> list[int]:
        """The device took these chains (each: its ring descriptors, in order).
        Returns each chain's entry index (pass it back to :meth:`before_used`)."""
        h = self._header()
        free_head, old_free_head = h[3], h[4]
        entries = []
        for descs in chains:
            head = old_free_head
            for k, d in enumerate(descs):
                if k == 0:
                    self._set(head, num=0, counter=self.counter, inflight=1)
                    self.counter += 1
                if k == len(descs) - 1:
                    self._set(head, last=free_head)
                self._set(head, num=self._get(head)[3] + 1)
                self._set(free_head, addr=d.addr, len=d.len, flags=d.flags, id=d.id)
                free_head = self._get(free_head)[1]
                if k == len(descs) - 1:
                    old_free_head = free_head
            entries.append(head)
        h[3], h[4] = free_head, old_free_head
        self._put_header(h)
        return entries

    def before_used(self, entries: Sequence[int], slots: Sequence[int], used_idx: int, used_wrap: int) -> None:
        """About to publish these completions; the ring's used position becomes
        ``used_idx``/``used_wrap`` when they are."""
        h = self._header()
        free_head = h[3]
        for e in entries:
            last = self._get(e)[2]
            self._set(last, next=free_head)
            free_head = e
        h[3] = free_head
        h[5], h[7] = used_idx, used_wrap
        self._put_header(h)

    def rollback(self) -> None:
        """Forget a batch prepared by :meth:`before_used` that was not published."""
        h = self._header()
        h[3], h[5], h[7] = h[4], h[6], h[8]
        self._put_header(h)

    def after_used(self, entries: Sequence[int]) -> None:
        """The used descriptors were published: commit."""
        for e in entries:
            self._set(e, inflight=0)
        h = self._header()
        h[4], h[6], h[8] = h[3], h[5], h[7]
        self._put_header(h)

    def recover(self, ring_flags_at: Callable[[int], int]) -> list[Resubmit]:
        """After a restart: roll back (or commit) a half-written batch, then return
        the requests in flight, oldest first.  ``ring_flags_at(i)`` reads the flags
        of ring descriptor ``i`` (to see whether the batch reached the ring)."""
        h = self._header()
        if h[5] != h[6]:
            old_used, old_wrap = h[6], h[8]
            avail_flags = (VIRTQ_DESC_F_AVAIL if old_wrap else 0) | (0 if old_wrap else VIRTQ_DESC_F_USED)
            if ring_flags_at(old_used) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) != avail_flags:
                h[4], h[6], h[8] = h[3], h[5], h[7]  # the batch reached the ring: commit it
        h[3], h[5], h[7] = h[4], h[6], h[8]  # roll back anything in progress
        self._put_header(h)
        free = set()
        i = h[3]
        for _ in range(self.size):  # bounded walk of the free list
            if i >= self.size or i in free:
                break
            free.add(i)
            i = self._get(i)[1]
        for i in free:
            self._set(i, inflight=0)
        pending = []
        for i in range(self.size):
            inflight, _nxt, _last, num, counter, *_ = self._get(i)
            if not inflight:
                continue
            descs, j = [], i
            for _ in range(min(num, self.size)):
                e = self._get(j)
                descs.append(RingDescriptor(addr=e[8], len=e[7], id=e[5], flags=e[6]))
                j = e[1]
            pending.append(Resubmit(counter, descs[-1].id if descs else 0, tuple(descs), i))
        pending.sort(key=lambda r: r.counter)
        return pending

    @property
    def used_position(self) -> tuple[int, int]:
        """(used index, used wrap counter) as last committed."""
        h = self._header()
        return h[5], h[7]


# ------------------------------------------------------------ resubmission
_FAKE_SPLIT_AVAIL = struct.Struct("<HHH")  # flags, idx=1, ring[0]=head
_RING_DESC = struct.Struct("<QIHH")  # packed: addr, len, id, flags


def rebuild_chain(mem: GuestMemory, *, packed: bool, size: int, desc_gpa: int, item: Resubmit) -> Any:
    """The chain of a request to resubmit, walked by the pure-Python core with
    every check a pop does (bounds, loops, indirect tables).

    Split: the walk starts at ``item.head`` in the ring's descriptor table.
    Packed: it walks the saved ring descriptors (indirect tables are read from
    guest memory again).  Returns a core ``ChainBatch`` holding one chain, or
    raises the ring error the walk found.
    """
    from . import _pycore  # noqa: PLC0415 - the reference walker, whatever core is live
    from .defs import DESC_SIZE, Layout  # noqa: PLC0415
    from .errcodes import make_error  # noqa: PLC0415

    st = _pycore.QueueState()
    st.layout = Layout.PACKED if packed else Layout.SPLIT
    st.size = size
    st.desc_gpa = desc_gpa
    st.ready = True
    batch = _pycore.ChainBatch(size)
    if packed:
        ring = bytearray(size * DESC_SIZE)
        for k, d in enumerate(item.descriptors[:size]):
            flags = (d.flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | VIRTQ_DESC_F_AVAIL
            _RING_DESC.pack_into(ring, k * DESC_SIZE, d.addr, d.len, d.id, flags)
        st.desc_mv = memoryview(ring)
        st.next_avail, st.avail_wrap = 0, 1
        rc = _pycore._pop_packed(st, mem, 1, batch)  # noqa: SLF001
    else:
        view = _pycore._region_view(mem, desc_gpa, size * DESC_SIZE)  # noqa: SLF001
        if view is None:
            raise make_error(_pycore.E.RING_ADDRESS, desc_gpa, size * DESC_SIZE)
        st.desc_mv = view
        st.driver_mv = memoryview(bytearray(_FAKE_SPLIT_AVAIL.pack(0, 1, item.head) + bytes(2 * size)))
        rc = _pycore._pop_split(st, mem, 1, batch)  # noqa: SLF001
    if rc < 0:
        raise make_error(-rc, st.err_a, st.err_b)
    if rc != 1:
        raise make_error(_pycore.E.DESC_INDEX, item.head, size)
    batch.count = 1
    return batch
