"""What the tracer knows about one front-end connection: the negotiated features,
memory table, rings, outstanding requests and counters, built up from the
decoded messages (:meth:`SessionState.apply`), and the summary made of them."""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import VhostUserError
from ..memory import GuestMemory
from ..memory import MemoryRegion as MappedGuestRegion
from ..protocol.codec import Message
from ..protocol.message import VRING_INDEX_MASK, VRING_NOFD_MASK, BackendReq, FrontendReq
from ..protocol.message import VhostUserProtocolFeatures as PF
from ..protocol.message import VirtioFeatures as VF
from ..protocol.payloads import U64, MemoryRegion, MemoryTable, SingleMemoryRegion, VringAddr, VringState
from ..protocol.requests import Reply
from ..sys_util import FdInfo
from .events import feature_names, protocol_feature_names

__all__ = ["RingInfo", "Pending", "SessionState"]

log = logging.getLogger(__name__)

_FR = FrontendReq


@dataclass
class RingInfo:
    """One vring as set up by the front-end."""

    index: int
    num: int | None = None
    addr: VringAddr | None = None
    base: int | None = None
    kick: bool = False
    call: bool = False
    enabled: bool | None = None
    #: started: a kick fd arrived (or the first SET_VRING_ENABLE 1) and no GET_VRING_BASE since
    started: bool = False
    #: the base the back-end returned in the last GET_VRING_BASE reply
    stopped_base: int | None = None
    #: used->idx read when the back-end answered GET_VRING_BASE (split rings, memory mapped)
    used_at_stop: int | None = None
    #: when the back-end answered GET_VRING_BASE (time.monotonic())
    stop_t: float = 0.0
    starts: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready description."""
        d: dict[str, Any] = {"index": self.index, "num": self.num, "starts": self.starts,
                             "enabled": self.enabled, "last_base": self.stopped_base}
        if self.addr is not None:
            d.update(desc=hex(self.addr.descriptor), avail=hex(self.addr.available), used=hex(self.addr.used))
        return d


@dataclass
class Pending:
    """A request waiting for its reply."""

    seq: int
    request: FrontendReq | BackendReq
    t: float
    #: the reply is due (Reply.ALWAYS, or NEED_REPLY with REPLY_ACK); else it may come
    required: bool
    payload: Any = None


@dataclass
class SessionState:
    """Everything known about one session (one front-end connection)."""

    number: int
    t_connect: float
    device: str | None = None
    map_memory: bool = False
    offered_features: int | None = None
    acked_features: int | None = None
    offered_protocol: int | None = None
    acked_protocol: int | None = None
    owner: bool = False
    queue_num: int | None = None
    regions: list[tuple[MemoryRegion, FdInfo | None]] = field(default_factory=list)
    memory: GuestMemory | None = None
    rings: dict[int, RingInfo] = field(default_factory=dict)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    nacks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    findings: int = 0
    first_ring_start: float | None = None
    pending: dict[str, list[Pending]] = field(default_factory=lambda: {"main": [], "backend": []})
    backend_channel: bool = False
    ended: float | None = None
    #: ``--rings``: kicks and calls relayed
    ring_notifications: dict[str, float] | None = None

    # ---------------------------------------------------------- negotiation
    def protocol_acked(self, bit: PF) -> bool:
        """The protocol feature was acked with SET_PROTOCOL_FEATURES."""
        return bool((self.acked_protocol or 0) & bit)

    @property
    def protocol_features_negotiated(self) -> bool:
        """SET_FEATURES acked VHOST_USER_F_PROTOCOL_FEATURES."""
        return bool((self.acked_features or 0) & VF.PROTOCOL_FEATURES)

    def ring(self, index: int) -> RingInfo:
        """The ring ``index`` (created on first use)."""
        r = self.rings.get(index)
        if r is None:
            r = self.rings[index] = RingInfo(index)
        return r

    def expects_reply(self, msg: Message) -> tuple[bool, bool]:
        """(a reply may come, it must come) for a request."""
        if msg.spec.reply is Reply.ALWAYS:
            return True, True
        if msg.need_reply:
            return True, self.protocol_acked(PF.REPLY_ACK)
        return False, False

    # -------------------------------------------------------------- memory
    def used_idx(self, ring: RingInfo) -> int | None:
        """used->idx of a split ring, read from the mapped guest memory (None if unknown)."""
        if self.memory is None or ring.addr is None or (self.acked_features or 0) & VF.RING_PACKED:
            return None
        try:
            gpa = self.memory.uva_to_gpa(ring.addr.used + 2, 2)
            return self.memory.read_u16(gpa)
        except (VhostUserError, ValueError):
            return None

    def _map(self, descs: list[MemoryRegion], fds: tuple[int, ...], add: bool) -> None:
        if not self.map_memory or len(descs) != len(fds):
            return
        try:
            if add and self.memory is not None:
                region = MappedGuestRegion.from_description(descs[0], os.dup(fds[0]))
                new = self.memory.with_region(region)
            else:
                new = GuestMemory.from_table(descs, [os.dup(fd) for fd in fds])
        except (VhostUserError, OSError, ValueError) as exc:
            log.info("session %d: cannot map the memory table: %s", self.number, exc)
            return
        self.close_memory()
        self.memory = new

    def close_memory(self) -> None:
        """Unmap the guest memory (the session ended, or the table changed)."""
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # --------------------------------------------------------------- apply
    def apply_request(self, msg: Message, t: float, fdinfo: list[FdInfo]) -> None:
        """Update the state with a front-end request that was relayed."""
        req, p = msg.request, msg.payload
        self.counts[req.name] += 1
        if not isinstance(req, FrontendReq):
            return
        if req is _FR.SET_OWNER:
            self.owner = True
        elif req is _FR.RESET_OWNER:
            self.owner = False
        elif req is _FR.SET_FEATURES and isinstance(p, U64):
            self.acked_features = p.value
        elif req is _FR.SET_PROTOCOL_FEATURES and isinstance(p, U64):
            self.acked_protocol = p.value
        elif req is _FR.SET_MEM_TABLE and isinstance(p, MemoryTable):
            self.regions = [(r, fdinfo[i] if i < len(fdinfo) else None) for i, r in enumerate(p.regions)]
            self._map(list(p.regions), msg.fds, add=False)
        elif req is _FR.ADD_MEM_REG and isinstance(p, SingleMemoryRegion):
            self.regions.append((p.region, fdinfo[0] if fdinfo else None))
            self._map([p.region], msg.fds, add=True)
        elif req is _FR.REM_MEM_REG and isinstance(p, SingleMemoryRegion):
            self.regions = [(r, i) for r, i in self.regions
                            if (r.guest_phys_addr, r.memory_size) != (p.region.guest_phys_addr, p.region.memory_size)]
            if self.memory is not None:
                try:
                    new = self.memory.without_region(p.region.guest_phys_addr, p.region.memory_size)
                except VhostUserError:
                    new = None
                if new is not None:
                    self.close_memory()
                    self.memory = new
        elif req is _FR.SET_VRING_NUM and isinstance(p, VringState):
            self.ring(p.index).num = p.num
        elif req is _FR.SET_VRING_ADDR and isinstance(p, VringAddr):
            self.ring(p.index).addr = p
        elif req is _FR.SET_VRING_BASE and isinstance(p, VringState):
            self.ring(p.index).base = p.num
        elif req is _FR.SET_VRING_CALL and isinstance(p, U64):
            self.ring(p.value & VRING_INDEX_MASK).call = not p.value & VRING_NOFD_MASK
        elif req is _FR.SET_VRING_KICK and isinstance(p, U64):
            ring = self.ring(p.value & VRING_INDEX_MASK)
            ring.kick = not p.value & VRING_NOFD_MASK
            self._start(ring, t)
        elif req is _FR.SET_VRING_ENABLE and isinstance(p, VringState):
            ring = self.ring(p.index)
            ring.enabled = bool(p.num)
        elif req is _FR.SET_BACKEND_REQ_FD:
            self.backend_channel = True

    def _start(self, ring: RingInfo, t: float) -> None:
        ring.started = True
        ring.used_at_stop = None
        ring.starts += 1
        if self.first_ring_start is None:
            self.first_ring_start = t

    def apply_reply(self, msg: Message, pending: Pending | None) -> None:
        """Update the state with a reply the back-end (or front-end, on the channel) sent."""
        req, p = msg.request, msg.payload
        if pending is not None and pending.request is not req:
            return
        if isinstance(req, FrontendReq):
            if req is _FR.GET_FEATURES and isinstance(p, U64):
                self.offered_features = p.value
            elif req is _FR.GET_PROTOCOL_FEATURES and isinstance(p, U64):
                self.offered_protocol = p.value
            elif req is _FR.GET_QUEUE_NUM and isinstance(p, U64):
                self.queue_num = p.value
            elif req is _FR.GET_VRING_BASE and isinstance(p, VringState):
                ring = self.ring(p.index)
                ring.started = False
                ring.stopped_base = p.num
                ring.used_at_stop = self.used_idx(ring)
                ring.stop_t = time.monotonic()
                return
        if msg.spec.reply is Reply.ACK and isinstance(p, U64) and p.value != 0:
            self.nacks.append(f"{req.name}={p.value:#x}")

    # ------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """The end-of-session summary (JSON-ready)."""
        d: dict[str, Any] = {"session": self.number}
        if self.offered_features is not None:
            d["features_offered"] = hex(self.offered_features)
            d["features_offered_names"] = feature_names(self.offered_features, self.device)
        if self.acked_features is not None:
            d["features_acked"] = hex(self.acked_features)
            d["features_acked_names"] = feature_names(self.acked_features, self.device)
        if self.offered_protocol is not None:
            d["protocol_offered"] = protocol_feature_names(self.offered_protocol)
        if self.acked_protocol is not None:
            d["protocol_acked"] = protocol_feature_names(self.acked_protocol)
        if self.queue_num is not None:
            d["queue_num"] = self.queue_num
        d["regions"] = [{"gpa": hex(r.guest_phys_addr), "size": hex(r.memory_size), "uva": hex(r.userspace_addr),
                         "offset": hex(r.mmap_offset), "fd": str(info) if info else None} for r, info in self.regions]
        d["rings"] = [r.summary() for _, r in sorted(self.rings.items())]
        d["counts"] = dict(sorted(self.counts.items()))
        d["nacks"] = list(self.nacks)
        d["errors"] = list(self.errors)
        d["findings"] = self.findings
        d["backend_channel"] = self.backend_channel
        if self.first_ring_start is not None:
            d["first_ring_start_s"] = round(self.first_ring_start - self.t_connect, 6)
        if self.ended is not None:
            d["duration_s"] = round(self.ended - self.t_connect, 6)
        if self.ring_notifications is not None:
            d["ring_notifications"] = dict(self.ring_notifications)
        return d
