"""The DRIVER side of a virtqueue (what a guest's virtio driver does), for tests,
differential C-vs-Python runs and the mock front-end.  No pytest dependency.

A driver lays its rings out in a :class:`~vhostuser.memory.GuestMemory`, places
buffers (chains of device-readable and device-writable buffers, optionally
through an indirect table), publishes them (batched), decides whether to kick
(EVENT_IDX aware), and collects used entries.  ``write_desc`` & co. write raw,
possibly hostile, ring contents.

>>> drv = RingDriver.create(mem, 256, packed=False, event_idx=True)
>>> q = drv.make_queue()
>>> token = drv.add([b"request"], [512]); drv.publish()
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ..errors import QueueUsageError
from ..memory import GuestMemory
from .defs import (
    DESC_SIZE,
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
    packed_ring_sizes,
    split_ring_sizes,
)
from .queue import Queue

__all__ = ["RingDriver", "SplitDriver", "PackedDriver", "Buffer"]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")

#: A buffer to place: (gpa, len, device_writable).
Buffer = tuple[int, int, bool]


def _need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class RingDriver:
    """Common part of :class:`SplitDriver` and :class:`PackedDriver`."""

    layout: Layout

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        driver_gpa: int,
        device_gpa: int,
        data_gpa: int,
        data_size: int,
        *,
        event_idx: bool = False,
    ) -> None:
        self.mem = mem
        self.size = size
        self.desc_gpa = desc_gpa
        self.driver_gpa = driver_gpa
        self.device_gpa = device_gpa
        self.data_gpa = data_gpa
        self.data_size = data_size
        self.event_idx = event_idx
        self._data_pos = data_gpa
        #: token -> (readable data, writable buffers [(gpa, len)]) of buffers placed by add()
        self.placed: dict[int, list[tuple[int, int]]] = {}

    # --------------------------------------------------------------- factory
    @staticmethod
    def create(
        mem: GuestMemory,
        size: int,
        *,
        packed: bool = False,
        ring_gpa: int | None = None,
        data_gpa: int | None = None,
        data_size: int | None = None,
        event_idx: bool = False,
    ) -> RingDriver:
        """Lay out a ring of ``size`` at ``ring_gpa`` (default: start of the first
        region) and a data area after it (default: the rest of that region)."""
        if ring_gpa is None:
            ring_gpa = mem.regions[0].guest_phys_addr
        if packed:
            d, drv, dev = packed_ring_sizes(size)
        else:
            d, drv, dev = split_ring_sizes(size, True)
        desc = _align(ring_gpa, 16)
        driver = _align(desc + d, 16)
        device = _align(driver + drv, 16)
        end = _align(device + dev, 4096)
        if data_gpa is None:
            data_gpa = end
        if data_size is None:
            region = mem.find_region(ring_gpa)
            assert region is not None, "ring_gpa is not in guest memory"
            data_size = region.end - data_gpa
        cls: type[RingDriver] = PackedDriver if packed else SplitDriver
        return cls(mem, size, desc, driver, device, data_gpa, data_size, event_idx=event_idx)

    def make_queue(self, mem: GuestMemory | None = None, *, max_size: int | None = None) -> Queue:
        """A ready device-side :class:`Queue` configured for this ring."""
        q = Queue(mem or self.mem, max_size or self.size, layout=self.layout)
        q.set_size(self.size)
        q.set_event_idx(self.event_idx)
        q.set_addresses(self.desc_gpa, self.driver_gpa, self.device_gpa)
        q.set_ready(True)
        return q

    # ------------------------------------------------------------ buffers
    def alloc(self, n: int, align: int = 16) -> int:
        """A gpa of ``n`` bytes in the data area (a circular bump allocator: old
        buffers are reused once it wraps)."""
        if n > self.data_size:
            raise QueueUsageError(f"{n} bytes do not fit the driver's data area")
        pos = _align(self._data_pos, align)
        if pos + n > self.data_gpa + self.data_size:
            pos = self.data_gpa
        self._data_pos = pos + max(n, 1)
        return pos

    def add(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
    ) -> int:
        """Allocate and fill buffers (``readable`` contents, ``writable`` sizes),
        place them as one chain; returns its token (split head / packed id).
        Not visible to the device until :meth:`publish`."""
        bufs: list[Buffer] = []
        for data in readable:
            gpa = self.alloc(len(data))
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), False))
        wbufs = []
        for n in writable:
            gpa = self.alloc(n)
            self.mem.fill(gpa, n, 0)
            bufs.append((gpa, n, True))
            wbufs.append((gpa, n))
        token = self.add_buffers(bufs, indirect=indirect)
        self.placed[token] = wbufs
        return token

    def read_written(self, token: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into the writable buffers of
        the chain placed by :meth:`add` as ``token``."""
        out = []
        for gpa, n in self.placed.get(token, []):
            take = min(n, length)
            out.append(self.mem.read(gpa, take))
            length -= take
            if length <= 0:
                break
        return b"".join(out)

    def _write_indirect(self, bufs: Sequence[Buffer], *, packed: bool) -> tuple[int, int]:
        table = self.alloc(DESC_SIZE * len(bufs))
        for k, (gpa, ln, w) in enumerate(bufs):
            flags = VIRTQ_DESC_F_WRITE if w else 0
            if packed:
                self.mem.write(table + k * DESC_SIZE, _DESC.pack(gpa, ln, 0, flags))
            else:
                nxt = k + 1 if k + 1 < len(bufs) else 0
                if k + 1 < len(bufs):
                    flags |= VIRTQ_DESC_F_NEXT
                self.mem.write(table + k * DESC_SIZE, _DESC.pack(gpa, ln, flags, nxt))
        return table, DESC_SIZE * len(bufs)

    # to be provided by subclasses
    def add_buffers(self, bufs: Sequence[Buffer], *, indirect: bool = False) -> int:  # pragma: no cover
        """Place a chain of explicit buffers; returns its token."""
        raise NotImplementedError

    def publish(self) -> None:  # pragma: no cover
        """Make every placed chain visible to the device (one release)."""
        raise NotImplementedError

    def kick_needed(self) -> bool:  # pragma: no cover
        """After :meth:`publish`: must the driver notify the device?"""
        raise NotImplementedError

    def get_used(self) -> list[tuple[int, int]]:  # pragma: no cover
        """Collect new used entries as ``[(token, len), ...]`` and free their slots."""
        raise NotImplementedError

    @property
    def num_free(self) -> int:  # pragma: no cover
        """Descriptors (ring slots) free for new chains."""
        raise NotImplementedError


class SplitDriver(RingDriver):
    """Driver side of a split ring (VIRTIO 1.3 §2.7)."""

    layout = Layout.SPLIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        m = self.mem
        d, a, u = split_ring_sizes(self.size, True)
        m.fill(self.desc_gpa, d)
        m.fill(self.driver_gpa, a)
        m.fill(self.device_gpa, u)
        self._free = list(range(self.size - 1, -1, -1))  # stack of free descriptor indices
        self._chain_descs: dict[int, list[int]] = {}
        self.avail_idx = 0  # shadow (not yet published) avail index
        self.published_idx = 0
        self._kick_old = 0
        self.last_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    # raw access --------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:  # noqa: A002
        """Write descriptor ``index`` of the table verbatim (hostile tests)."""
        self.mem.write(self.desc_gpa + index * DESC_SIZE, _DESC.pack(addr, length, flags, next))

    def push_avail(self, head: int) -> None:
        """Put ``head`` (anything) in the next avail slot; visible after :meth:`publish`."""
        self.mem.write_u16(self.driver_gpa + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Write avail.idx verbatim (and the shadow)."""
        self.avail_idx = idx & 0xFFFF
        self.publish()

    def set_avail_flags(self, flags: int) -> None:
        """Write avail.flags (e.g. VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        self.mem.write_u16(self.driver_gpa, flags)

    def set_used_event(self, idx: int) -> None:
        """Write used_event (the trailing field of the avail ring)."""
        self.mem.write_u16(self.driver_gpa + 4 + 2 * self.size, idx & 0xFFFF)

    def used_idx(self) -> int:
        """The device's published used.idx."""
        return self.mem.read_u16(self.device_gpa + 2)

    def used_flags(self) -> int:
        """used.flags (VIRTQ_USED_F_NO_NOTIFY)."""
        return self.mem.read_u16(self.device_gpa)

    def avail_event(self) -> int:
        """avail_event (the trailing field of the used ring)."""
        return self.mem.read_u16(self.device_gpa + 4 + 8 * self.size)

    # normal operation ---------------------------------------------------
    def add_buffers(self, bufs: Sequence[Buffer], *, indirect: bool = False) -> int:
        if not bufs:
            raise QueueUsageError("a chain needs at least one buffer")
        if indirect:
            table, tlen = self._write_indirect(bufs, packed=False)
            descs = [(table, tlen, VIRTQ_DESC_F_INDIRECT)]
        else:
            descs = [(g, n, VIRTQ_DESC_F_WRITE if w else 0) for g, n, w in bufs]
        if len(descs) > len(self._free):
            raise QueueUsageError(f"split ring full: {len(descs)} descriptors needed, {len(self._free)} free")
        idxs = [self._free.pop() for _ in descs]
        for k, (g, n, f) in enumerate(descs):
            nxt = idxs[k + 1] if k + 1 < len(idxs) else 0
            self.write_desc(idxs[k], g, n, f | (VIRTQ_DESC_F_NEXT if k + 1 < len(idxs) else 0), nxt)
        head = idxs[0]
        self._chain_descs[head] = idxs
        self.push_avail(head)
        return head

    def publish(self) -> None:
        self.mem.write_u16(self.driver_gpa + 2, self.avail_idx)
        self.published_idx = self.avail_idx

    def kick_needed(self) -> bool:
        new, old = self.published_idx, self._kick_old
        self._kick_old = new
        if self.event_idx:
            return _need_event(self.avail_event(), new, old)
        return not self.used_flags() & VIRTQ_USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        used_idx = self.used_idx()
        while self.last_used != used_idx:
            head, ln = _USED.unpack(self.mem.read(self.device_gpa + 4 + 8 * (self.last_used % self.size), 8))
            idxs = self._chain_descs.pop(head, None)
            if idxs is not None:
                self._free.extend(reversed(idxs))
            out.append((head, ln))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out

    def disable_interrupts(self) -> None:
        """Ask the device not to notify (avail.flags NO_INTERRUPT; no-op with EVENT_IDX)."""
        if not self.event_idx:
            self.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> None:
        """Ask for notifications again (EVENT_IDX: used_event = last_used)."""
        if self.event_idx:
            self.set_used_event(self.last_used)
        else:
            self.set_avail_flags(0)


class PackedDriver(RingDriver):
    """Driver side of a packed ring (VIRTIO 1.3 §2.8)."""

    layout = Layout.PACKED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        m = self.mem
        m.fill(self.desc_gpa, DESC_SIZE * self.size)
        m.fill(self.driver_gpa, 4)
        m.fill(self.device_gpa, 4)
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self._free_ids = list(range(self.size - 1, -1, -1))
        self._id_slots: dict[int, int] = {}
        self._free_slots = self.size
        self._pending_heads: list[tuple[int, int]] = []  # (position, flags) written at publish
        self._added_since_kick = 0

    @property
    def num_free(self) -> int:
        return self._free_slots

    def avail_flags(self, wrap: int | None = None) -> int:
        """AVAIL/USED bits that make a descriptor available for driver wrap ``wrap``."""
        w = self.avail_wrap if wrap is None else wrap
        return VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED

    # raw access --------------------------------------------------------
    def write_desc(self, pos: int, addr: int, length: int, id: int = 0, flags: int = 0) -> None:  # noqa: A002
        """Write ring descriptor ``pos`` verbatim (hostile tests)."""
        self.mem.write(self.desc_gpa + pos * DESC_SIZE, _DESC.pack(addr, length, id, flags))

    def read_desc(self, pos: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring descriptor ``pos``."""
        return _DESC.unpack(self.mem.read(self.desc_gpa + pos * DESC_SIZE, DESC_SIZE))

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        """Write the driver event suppression area (read by the device)."""
        self.mem.write(self.driver_gpa, struct.pack("<HH", off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device event suppression area."""
        return struct.unpack("<HH", self.mem.read(self.device_gpa, 4))  # type: ignore[return-value]

    # normal operation ---------------------------------------------------
    def add_buffers(self, bufs: Sequence[Buffer], *, indirect: bool = False, id: int | None = None) -> int:  # noqa: A002
        if not bufs:
            raise QueueUsageError("a chain needs at least one buffer")
        if indirect:
            table, tlen = self._write_indirect(bufs, packed=True)
            descs = [(table, tlen, VIRTQ_DESC_F_INDIRECT)]
        else:
            descs = [(g, n, VIRTQ_DESC_F_WRITE if w else 0) for g, n, w in bufs]
        if len(descs) > self._free_slots or not self._free_ids:
            raise QueueUsageError(f"packed ring full: {len(descs)} slots needed, {self._free_slots} free")
        bid = self._free_ids.pop() if id is None else id
        if id is not None and id in self._free_ids:
            self._free_ids.remove(id)
        head_pos, head_flags = self.next_avail, 0
        for k, (g, n, f) in enumerate(descs):
            flags = f | self.avail_flags() | (VIRTQ_DESC_F_NEXT if k + 1 < len(descs) else 0)
            pos = self.next_avail
            if k == 0:
                # keep the slot's old flags (a descriptor of the previous lap: neither
                # available to the device nor "used" for us); the head goes live at publish()
                self.mem.write(self.desc_gpa + pos * DESC_SIZE, struct.pack("<QIH", g, n, bid))
                head_flags = flags
            else:
                self.write_desc(pos, g, n, bid, flags)
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self._pending_heads.append((head_pos, head_flags))
        self._id_slots[bid] = len(descs)
        self._free_slots -= len(descs)
        self._added_since_kick += len(descs)
        return bid

    def publish(self) -> None:
        for pos, flags in self._pending_heads:
            self.mem.write_u16(self.desc_gpa + pos * DESC_SIZE + 14, flags)
        self._pending_heads.clear()

    def kick_needed(self) -> bool:
        added, self._added_since_kick = self._added_since_kick, 0
        off_wrap, flags = self.device_event()
        flags &= 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        if added >= self.size:
            return True
        event = off_wrap & 0x7FFF
        if (off_wrap >> 15) != self.avail_wrap:
            event -= self.size
        new = self.next_avail
        return _need_event(event & 0xFFFF, new, (new - added) & 0xFFFF)

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        while True:
            _, ln, bid, flags = self.read_desc(self.next_used)
            used = bool(flags & VIRTQ_DESC_F_USED)
            avail = bool(flags & VIRTQ_DESC_F_AVAIL)
            if used != bool(self.used_wrap) or avail != bool(self.used_wrap):
                break
            n = self._id_slots.pop(bid, 1)
            self._free_ids.append(bid)
            self._free_slots += n
            out.append((bid, ln if flags & VIRTQ_DESC_F_WRITE else 0))
            self.next_used += n
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
        if self.event_idx:
            self.set_driver_event(RING_EVENT_FLAGS_DESC, self.next_used | self.used_wrap << 15)
        return out

    def disable_interrupts(self) -> None:
        """Driver event flags = DISABLE."""
        self.set_driver_event(RING_EVENT_FLAGS_DISABLE)

    def enable_interrupts(self) -> None:
        """ENABLE, or (EVENT_IDX) DESC at the next used position."""
        if self.event_idx:
            self.set_driver_event(RING_EVENT_FLAGS_DESC, self.next_used | self.used_wrap << 15)
        else:
            self.set_driver_event(RING_EVENT_FLAGS_ENABLE)
