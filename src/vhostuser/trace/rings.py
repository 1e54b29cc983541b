"""The ring view of ``vhostuser trace --rings``: what the rings carry, per kick and call.

The proxy interposes each vring's kick and call fds (SET_VRING_KICK /
SET_VRING_CALL): the back-end gets a notifier pair of the proxy's, the proxy
keeps the front-end's fds.  On a kick it reads the available ring from the guest
memory it maps (the memory table's fds), reports the new requests and passes the
kick on; on a call it reads the used ring, reports the completions and passes the
call on.  For device types it knows, each request is decoded (blk: type, sector,
length, status; net: frame summary; vsock: op, ports, length; rng/console:
lengths); other devices get the buffer layout.

Split rings are decoded; packed rings are reported as kicks and calls only.
Reading the rings never fails the relay: a ring the proxy cannot read is
reported as such and the notification still passes.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GuestMemoryError
from ..memory import GuestMemory
from ..protocol.message import VirtioFeatures as VF
from ..sys_util.event import EventConsumer, EventNotifier, new_event_consumer_and_notifier
from .events import TraceEvent
from .session import RingInfo, SessionState

__all__ = ["RingView", "Segment", "walk_chain", "describe_request", "describe_completion"]

log = logging.getLogger(__name__)

_DESC = struct.Struct("<QIHH")
_F_NEXT, _F_WRITE, _F_INDIRECT = 1, 2, 4
#: requests and completions decoded per notification (the rest are counted)
MAX_DECODED = 32


@dataclass(frozen=True)
class Segment:
    """One buffer of a descriptor chain."""

    gpa: int
    length: int
    write: bool


def walk_chain(memory: GuestMemory, desc_gpa: int, num: int, head: int) -> list[Segment]:
    """The buffers of the split-ring chain starting at ``head`` (one level of
    indirection; bounded by the ring size, so a loop ends)."""
    segs: list[Segment] = []
    table, size, index = desc_gpa, num, head
    indirect = False
    for _ in range(num + 1):
        if not 0 <= index < size:
            raise ValueError(f"descriptor index {index} out of range")
        addr, length, flags, nxt = _DESC.unpack(memory.read(table + 16 * index, 16))
        if flags & _F_INDIRECT and not indirect:
            table, size, index, indirect = addr, length // 16, 0, True
            continue
        segs.append(Segment(addr, length, bool(flags & _F_WRITE)))
        if not flags & _F_NEXT:
            return segs
        index = nxt
    raise ValueError("descriptor chain loops")


def _gather(memory: GuestMemory, segs: list[Segment], n: int, write: bool) -> bytes:
    out = bytearray()
    for s in segs:
        if s.write != write or len(out) >= n:
            continue
        out += memory.read(s.gpa, min(s.length, n - len(out)))
    return bytes(out)


def _lengths(segs: list[Segment]) -> tuple[int, int]:
    return sum(s.length for s in segs if not s.write), sum(s.length for s in segs if s.write)


_BLK_TYPES = {0: "IN", 1: "OUT", 4: "FLUSH", 8: "GET_ID", 10: "GET_LIFETIME", 11: "DISCARD",
              13: "WRITE_ZEROES", 14: "SECURE_ERASE"}
_BLK_STATUS = {0: "OK", 1: "IOERR", 2: "UNSUPP"}
_VSOCK_OPS = {1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW", 6: "CREDIT_UPDATE",
              7: "CREDIT_REQUEST"}
_VSOCK_HDR = struct.Struct("<QQIIIHHIII")
_NET_HDR = 12


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _frame(data: bytes) -> dict[str, Any]:
    if len(data) < 14:
        return {"frame_len": len(data)}
    return {"dst": _mac(data[:6]), "src": _mac(data[6:12]), "ethertype": f"{int.from_bytes(data[12:14], 'big'):#06x}"}


def describe_request(device: str | None, vring: int, memory: GuestMemory, segs: list[Segment]) -> dict[str, Any]:
    """What a newly available chain asks for, decoded for ``device``."""
    out_len, in_len = _lengths(segs)
    d: dict[str, Any] = {"out": out_len, "in": in_len, "segs": len(segs)}
    if device == "blk" and out_len >= 16:
        typ, _prio, sector = struct.unpack("<IIQ", _gather(memory, segs, 16, False))
        d.update(type=_BLK_TYPES.get(typ, f"type{typ}"), sector=sector,
                 len=out_len - 16 if typ == 1 else max(in_len - 1, 0))
    elif device == "net" and vring % 2 == 1 and out_len > _NET_HDR:  # TX: a frame
        data = _gather(memory, segs, _NET_HDR + 14, False)
        d.update(frame_len=out_len - _NET_HDR, **_frame(data[_NET_HDR:]))
    elif device == "vsock" and vring == 1 and out_len >= _VSOCK_HDR.size:  # TX
        d.update(_vsock(_gather(memory, segs, _VSOCK_HDR.size, False)))
    return d


def describe_completion(device: str | None, vring: int, memory: GuestMemory, segs: list[Segment],
                        written: int) -> dict[str, Any]:
    """What a used chain carries back, decoded for ``device`` (``written``: the used length)."""
    d: dict[str, Any] = {"written": written}
    writable = [s for s in segs if s.write]
    if device == "blk" and writable:
        last = writable[-1]
        if last.length:
            status = memory.read(last.gpa + last.length - 1, 1)[0]
            d["status"] = _BLK_STATUS.get(status, f"status{status}")
    elif device == "net" and vring % 2 == 0 and written > _NET_HDR:  # RX: a frame
        data = _gather(memory, segs, min(written, _NET_HDR + 14), True)
        d.update(frame_len=written - _NET_HDR, **_frame(data[_NET_HDR:]))
    elif device == "vsock" and vring == 0 and written >= _VSOCK_HDR.size:  # RX
        d.update(_vsock(_gather(memory, segs, _VSOCK_HDR.size, True)))
    return d


def _vsock(hdr: bytes) -> dict[str, Any]:
    src_cid, dst_cid, src_port, dst_port, length, _type, op, _flags, _alloc, _fwd = _VSOCK_HDR.unpack(hdr)
    return {"op": _VSOCK_OPS.get(op, f"op{op}"), "src": f"{src_cid}:{src_port}", "dst": f"{dst_cid}:{dst_port}",
            "len": length}


class _Tap:
    """One interposed notifier: the front-end's fd and the proxy's pair."""

    def __init__(self, front: EventConsumer | EventNotifier, ours: EventConsumer | EventNotifier) -> None:
        self.front = front
        self.ours = ours  # the end the proxy keeps

    def close(self) -> None:
        self.front.close()
        self.ours.close()


class RingView:
    """The interposed kick/call fds of one session and the ring reports (see module docs).

    ``register(obj, handler)`` / ``unregister(obj)`` watch an fd in the proxy's
    poller; ``emit`` reports an event.
    """

    def __init__(self, state: SessionState, emit: Callable[[TraceEvent], object],
                 register: Callable[[Any, Callable[[], None]], None], unregister: Callable[[Any], None]) -> None:
        self.state = state
        self.emit = emit
        self._register = register
        self._unregister = unregister
        self._kicks: dict[int, _Tap] = {}
        self._calls: dict[int, _Tap] = {}
        self._last_avail: dict[int, int] = {}
        self._last_used: dict[int, int] = {}
        #: notifications relayed, per kind
        self.kicks = 0
        self.calls = 0
        #: seconds the proxy spent reading rings and relaying notifications
        self.busy = 0.0

    # ----------------------------------------------------------- interposing
    def interpose_kick(self, index: int, front_fd: int) -> EventConsumer:
        """Take the front-end's kick fd (a dup of ``front_fd``); return the consumer
        to send to the back-end instead (close it after sending)."""
        self._drop(self._kicks, index)
        consumer, notifier = new_event_consumer_and_notifier()
        front = EventConsumer.from_fd(os.dup(front_fd))
        tap = _Tap(front, notifier)
        self._kicks[index] = tap
        self._register(front, lambda: self._on_kick(index, tap))
        ring = self.state.ring(index)
        self._last_avail[index] = ring.base or 0
        self._last_used[index] = ring.base or 0
        return consumer

    def interpose_call(self, index: int, front_fd: int) -> EventNotifier:
        """Take the front-end's call fd; return the notifier to send to the back-end."""
        self._drop(self._calls, index)
        consumer, notifier = new_event_consumer_and_notifier()
        front = EventNotifier.from_fd(os.dup(front_fd))
        tap = _Tap(front, consumer)
        self._calls[index] = tap
        self._register(consumer, lambda: self._on_call(index, tap))
        return notifier

    def _drop(self, taps: dict[int, _Tap], index: int) -> None:
        old = taps.pop(index, None)
        if old is not None:
            self._unregister(old.front if taps is self._kicks else old.ours)
            old.close()

    def stats(self) -> dict[str, float]:
        """Kicks and calls relayed, and the proxy's time per notification (µs)."""
        n = self.kicks + self.calls
        return {"kicks": self.kicks, "calls": self.calls, "us_per_notification": round(1e6 * self.busy / n, 1) if n else 0.0}

    def close(self) -> None:
        """Stop watching and close every interposed fd (the session ended)."""
        for taps in (self._kicks, self._calls):
            for index in list(taps):
                self._drop(taps, index)

    # ------------------------------------------------------------ relaying
    def _on_kick(self, index: int, tap: _Tap) -> None:
        assert isinstance(tap.front, EventConsumer) and isinstance(tap.ours, EventNotifier)
        t0 = time.perf_counter()
        if not tap.front.consume():
            return
        self.kicks += 1
        try:
            ev = self._report(index, "kick")
        finally:
            tap.ours.notify()
            self.busy += time.perf_counter() - t0
        self.emit(ev)

    def _on_call(self, index: int, tap: _Tap) -> None:
        assert isinstance(tap.ours, EventConsumer) and isinstance(tap.front, EventNotifier)
        t0 = time.perf_counter()
        if not tap.ours.consume():
            return
        self.calls += 1
        try:
            ev = self._report(index, "call")
        finally:
            tap.front.notify()
            self.busy += time.perf_counter() - t0
        self.emit(ev)

    def _report(self, index: int, what: str) -> TraceEvent:
        st = self.state
        ring = st.ring(index)
        direction = "F->B" if what == "kick" else "B->F"
        data: dict[str, Any] = {"vring": index, "event": what}
        ev = TraceEvent("ring", dir=direction, data=data)
        if st.memory is None or ring.addr is None or ring.num is None:
            ev.text = f"{what} vring {index} (ring memory unknown)"
            return ev
        if (st.acked_features or 0) & VF.RING_PACKED:
            ev.text = f"{what} vring {index} (packed ring: not decoded)"
            return ev
        try:
            if what == "kick":
                self._avail(ring, data, ev)
            else:
                # with EVENT_IDX a driver may publish without kicking (the back-end was
                # still polling): report those requests with the call that shows them used
                text = ""
                if self._avail_moved(ring):
                    self._avail(ring, data, ev)
                    text = f"; {ev.text}"
                self._used(ring, data, ev)
                ev.text = (ev.text or "") + text
        except (GuestMemoryError, ValueError, struct.error) as exc:
            ev.text = f"{what} vring {index}: cannot read the ring: {exc}"
            ev.error = str(exc)
        return ev

    def _avail_moved(self, ring: RingInfo) -> bool:
        mem = self.state.memory
        assert mem is not None and ring.addr is not None
        return mem.read_u16(mem.uva_to_gpa(ring.addr.available + 2, 2)) != self._last_avail.get(ring.index, 0)

    def _avail(self, ring: RingInfo, data: dict[str, Any], ev: TraceEvent) -> None:
        mem = self.state.memory
        assert mem is not None and ring.addr is not None and ring.num is not None
        avail = mem.uva_to_gpa(ring.addr.available, 4 + 2 * ring.num)
        desc = mem.uva_to_gpa(ring.addr.descriptor, 16 * ring.num)
        idx = mem.read_u16(avail + 2)
        last = self._last_avail.get(ring.index, 0)
        new = (idx - last) % 65536
        data.update(avail_idx=idx, new=new)
        reqs = []
        for i in range(min(new, MAX_DECODED, ring.num)):
            head = mem.read_u16(avail + 4 + 2 * ((last + i) % ring.num))
            try:
                segs = walk_chain(mem, desc, ring.num, head)
                reqs.append({"head": head, **describe_request(self.state.device, ring.index, mem, segs)})
            except (GuestMemoryError, ValueError, struct.error) as exc:
                reqs.append({"head": head, "error": str(exc)})
        if reqs:
            data["requests"] = reqs
        self._last_avail[ring.index] = idx
        ev.text = f"{data['event']} vring {ring.index}: avail idx {idx} (+{new})" + _brief(reqs)

    def _used(self, ring: RingInfo, data: dict[str, Any], ev: TraceEvent) -> None:
        mem = self.state.memory
        assert mem is not None and ring.addr is not None and ring.num is not None
        used = mem.uva_to_gpa(ring.addr.used, 4 + 8 * ring.num)
        desc = mem.uva_to_gpa(ring.addr.descriptor, 16 * ring.num)
        idx = mem.read_u16(used + 2)
        last = self._last_used.get(ring.index, 0)
        new = (idx - last) % 65536
        data.update(used_idx=idx, new=new)
        done = []
        for i in range(min(new, MAX_DECODED, ring.num)):
            head, written = struct.unpack("<II", mem.read(used + 4 + 8 * ((last + i) % ring.num), 8))
            try:
                segs = walk_chain(mem, desc, ring.num, head)
                done.append({"head": head, **describe_completion(self.state.device, ring.index, mem, segs, written)})
            except (GuestMemoryError, ValueError, struct.error) as exc:
                done.append({"head": head, "written": written, "error": str(exc)})
        if done:
            data["completions"] = done
        self._last_used[ring.index] = idx
        ev.text = f"call vring {ring.index}: used idx {idx} (+{new})" + _brief(done)


def _brief(items: list[dict[str, Any]]) -> str:
    if not items:
        return ""
    first = items[0]
    keys = [k for k in ("type", "op", "sector", "len", "status", "src", "dst", "frame_len", "written", "out", "in")
            if k in first]
    text = " ".join(f"{k}={first[k]}" for k in keys[:5])
    return f": {text}" + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")

