"""Spec checks made while relaying (``vhostuser trace --check``).

Each :class:`Rule` names who it judges (the front-end or the back-end), where the
vhost-user specification (QEMU ``docs/interop/vhost-user.rst``) or the virtio
specification says so, and how bad a breach is: ``error`` for a MUST, ``warning``
for what the spec leaves open but a peer is likely to trip on.  :class:`SpecChecker`
is fed the decoded messages and the :class:`~.session.SessionState` *before* the
message is applied, and reports :class:`Finding` s.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol.codec import Message
from ..protocol.message import VRING_INDEX_MASK, FrontendReq
from ..protocol.message import VhostUserProtocolFeatures as PF
from ..protocol.message import VirtioFeatures as VF
from ..protocol.payloads import U64, MemoryRegion, MemoryTable, SingleMemoryRegion, VringAddr, VringState
from ..sys_util import FdInfo
from .session import Pending, SessionState

__all__ = ["Rule", "RULES", "Finding", "SpecChecker"]

_FR = FrontendReq
_SPEC = "vhost-user.rst"
#: seconds after a GET_VRING_BASE reply during which a moving used index is the back-end's doing
_USED_WINDOW = 0.5


@dataclass(frozen=True)
class Rule:
    """A protocol rule the tracer checks."""

    id: str
    who: str  # frontend | backend | sender
    severity: str  # error | warning
    section: str
    text: str


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("decode", "sender", "error", f"{_SPEC} §Message specification",
         "every message decodes: known request code, header flags, payload size, number of fds"),
    Rule("owner-first", "frontend", "error", f"{_SPEC} §Front-end message types (SET_OWNER)",
         "SET_OWNER comes before any request that configures the device"),
    Rule("protocol-features-bit", "frontend", "error", f"{_SPEC} §Protocol features",
         "GET/SET_PROTOCOL_FEATURES and SET_VRING_ENABLE only when the back-end offers "
         "VHOST_USER_F_PROTOCOL_FEATURES"),
    Rule("feature-gated", "frontend", "error", f"{_SPEC} §Protocol features",
         "a request gated by a protocol feature is sent only once that feature was acked"),
    Rule("features-offered", "frontend", "error", "virtio §2.2 Feature Bits; " + f"{_SPEC} §Protocol features",
         "SET_FEATURES / SET_PROTOCOL_FEATURES ack only bits the back-end offered"),
    Rule("rings-before-memory", "frontend", "error", f"{_SPEC} §Starting and stopping rings",
         "a ring is not given addresses or started (kick) before a memory table exists"),
    Rule("ring-outside-memory", "frontend", "error", f"{_SPEC} §Front-end message types (SET_VRING_ADDR)",
         "descriptor, available and used ring addresses lie inside the memory table when the ring starts"),
    Rule("ring-size", "frontend", "error", "virtio §2.7 Split Virtqueues (Queue Size)",
         "SET_VRING_NUM is 1..32768 and, for split rings, a power of 2"),
    Rule("vring-index", "frontend", "error", f"{_SPEC} §Multiple queue support",
         "vring indices are below the back-end's GET_QUEUE_NUM"),
    Rule("reuse-before-get-base", "frontend", "error", f"{_SPEC} §Starting and stopping rings",
         "a started ring is stopped with GET_VRING_BASE before its size, base or addresses change"),
    Rule("vring-enable-without-protocol-features", "frontend", "error", f"{_SPEC} §Ring states",
         "SET_VRING_ENABLE only after VHOST_USER_F_PROTOCOL_FEATURES was acked with SET_FEATURES"),
    Rule("memory-table", "frontend", "error", f"{_SPEC} §Memory region description",
         "regions are non-empty, do not overlap (guest or user addresses) and fit in their fd"),
    Rule("need-reply-without-reply-ack", "frontend", "warning", f"{_SPEC} §REPLY_ACK",
         "NEED_REPLY is set only when REPLY_ACK was negotiated"),
    Rule("request-while-waiting", "frontend", "warning", f"{_SPEC} §Communication",
         "the front-end waits for a due reply before its next request"),
    Rule("missing-reply", "backend", "error", f"{_SPEC} §Communication; §REPLY_ACK",
         "every request that needs a reply (GET_*, or NEED_REPLY with REPLY_ACK) is answered"),
    Rule("unsolicited-reply", "backend", "error", f"{_SPEC} §Communication",
         "a reply answers an outstanding request of the same code"),
    Rule("ring-used-after-get-base", "backend", "warning", f"{_SPEC} §Starting and stopping rings",
         "after answering GET_VRING_BASE the back-end no longer completes buffers (the used index does not "
         "move on within 0.5 s; split rings, heuristic: the guest may reuse the memory)"),
)}


@dataclass(frozen=True)
class Finding:
    """One breach of a rule."""

    rule: Rule
    who: str
    message: str
    about: int | None = None  # seq of the message

    @property
    def severity(self) -> str:
        """The rule's severity."""
        return self.rule.severity


_CONFIGURES = {_FR.SET_FEATURES, _FR.SET_MEM_TABLE, _FR.SET_VRING_NUM, _FR.SET_VRING_ADDR, _FR.SET_VRING_BASE,
               _FR.GET_VRING_BASE, _FR.SET_VRING_KICK, _FR.ADD_MEM_REG, _FR.SET_LOG_BASE}
_RING_INDEX_U64 = {_FR.SET_VRING_KICK, _FR.SET_VRING_CALL, _FR.SET_VRING_ERR}
_RING_STATE = {_FR.SET_VRING_NUM, _FR.SET_VRING_BASE, _FR.GET_VRING_BASE, _FR.SET_VRING_ENABLE}


def _overlap(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class SpecChecker:
    """Judges a session message by message; ``emit`` receives the findings."""

    def __init__(self, emit: Callable[[Finding, SessionState], None]) -> None:
        self._emit = emit

    def _find(self, st: SessionState, rule: str, message: str, about: int | None, who: str | None = None) -> None:
        r = RULES[rule]
        st.findings += 1
        self._emit(Finding(r, who or r.who, message, about), st)

    # ------------------------------------------------------------ events
    def decode_error(self, st: SessionState, who: str, text: str, about: int) -> None:
        """A message the codec refused."""
        self._find(st, "decode", text, about, who)

    def request(self, st: SessionState, msg: Message, seq: int, fdinfo: list[FdInfo]) -> None:
        """A front-end request on the main channel, before it is applied."""
        req = msg.request
        if not isinstance(req, FrontendReq):
            return
        spec = msg.spec
        name = req.name
        due = [p for p in st.pending["main"] if p.required]
        if due:
            self._find(st, "request-while-waiting", f"{name} sent while {due[0].request.name} (#{due[0].seq}) "
                       "is still unanswered", seq)
        if spec.needs_owner and not st.owner and req in _CONFIGURES:
            self._find(st, "owner-first", f"{name} before SET_OWNER", seq)
        offered = st.offered_features
        if spec.needs_protocol_features and offered is not None and not offered & VF.PROTOCOL_FEATURES:
            self._find(st, "protocol-features-bit", f"{name} but the back-end did not offer PROTOCOL_FEATURES", seq)
        if spec.feature is not None and not st.protocol_acked(spec.feature):
            self._find(st, "feature-gated", f"{name} needs protocol feature {spec.feature.name}, "
                       "which was not acked", seq)
        acks_reply_ack = req is _FR.SET_PROTOCOL_FEATURES and isinstance(msg.payload, U64) and bool(
            msg.payload.value & PF.REPLY_ACK)  # negotiates REPLY_ACK in this very message
        if msg.need_reply and not st.protocol_acked(PF.REPLY_ACK) and not acks_reply_ack:
            self._find(st, "need-reply-without-reply-ack", f"{name} has NEED_REPLY without REPLY_ACK", seq)
        p = msg.payload
        if req is _FR.SET_FEATURES and isinstance(p, U64) and offered is not None and p.value & ~offered:
            self._find(st, "features-offered", f"SET_FEATURES acks {p.value & ~offered:#x}, not offered "
                       f"({offered:#x})", seq)
        if (req is _FR.SET_PROTOCOL_FEATURES and isinstance(p, U64) and st.offered_protocol is not None
                and p.value & ~st.offered_protocol):
            self._find(st, "features-offered", f"SET_PROTOCOL_FEATURES acks {p.value & ~st.offered_protocol:#x}, "
                       f"not offered ({st.offered_protocol:#x})", seq)
        if req is _FR.SET_VRING_ENABLE and not st.protocol_features_negotiated:
            self._find(st, "vring-enable-without-protocol-features",
                       "SET_VRING_ENABLE but SET_FEATURES did not ack PROTOCOL_FEATURES", seq)
        index = self._ring_index(msg)
        if index is not None and st.queue_num is not None and st.protocol_acked(PF.MQ) and index >= st.queue_num:
            self._find(st, "vring-index", f"{name} for vring {index}, but GET_QUEUE_NUM said {st.queue_num}", seq)
        if req in (_FR.SET_VRING_ADDR, _FR.SET_VRING_KICK) and not st.regions:
            self._find(st, "rings-before-memory", f"{name} for vring {index} before any memory table", seq)
        if req is _FR.SET_VRING_NUM and isinstance(p, VringState):
            self._ring_size(st, p, seq)
        if index is not None and req in (_FR.SET_VRING_NUM, _FR.SET_VRING_BASE, _FR.SET_VRING_ADDR):
            ring = st.rings.get(index)
            changed = not (req is _FR.SET_VRING_ADDR and isinstance(p, VringAddr) and ring is not None
                           and ring.addr is not None and _same_rings(ring.addr, p))
            if ring is not None and ring.started and changed:
                self._find(st, "reuse-before-get-base", f"{name} on started vring {index} without GET_VRING_BASE",
                           seq)
        if req is _FR.SET_VRING_KICK and index is not None and st.regions:
            self._ring_inside(st, index, seq)
        if req is _FR.SET_MEM_TABLE and isinstance(p, MemoryTable):
            self._memory_table(st, list(p.regions), fdinfo, [], seq)
        if req is _FR.ADD_MEM_REG and isinstance(p, SingleMemoryRegion):
            self._memory_table(st, [p.region], fdinfo, [r for r, _ in st.regions], seq)
        self._used_after_stop(st, seq)

    def reply(self, st: SessionState, msg: Message, seq: int, pending: Pending | None) -> None:
        """A reply on the main channel; ``pending`` is the request it matched (None: none)."""
        if pending is None:
            self._find(st, "unsolicited-reply", f"{msg.request.name} reply without an outstanding request", seq)
            return
        skipped = [p for p in st.pending["main"] if p.seq < pending.seq and p.required]
        for p in skipped:
            self._find(st, "missing-reply", f"{p.request.name} (#{p.seq}) was not answered before "
                       f"the reply to #{pending.seq}", p.seq)

    def end(self, st: SessionState) -> None:
        """The session ended: due replies never came; the rings stay untouched after stop."""
        self._used_after_stop(st, None)
        for chan in ("main", "backend"):
            for p in st.pending[chan]:
                if p.required and chan == "main":
                    self._find(st, "missing-reply", f"{p.request.name} (#{p.seq}) was never answered", p.seq)

    # ----------------------------------------------------------- helpers
    @staticmethod
    def _ring_index(msg: Message) -> int | None:
        p = msg.payload
        if msg.request in _RING_INDEX_U64 and isinstance(p, U64):
            return p.value & VRING_INDEX_MASK
        if msg.request in _RING_STATE and isinstance(p, VringState):
            return p.index
        if msg.request is _FR.SET_VRING_ADDR and isinstance(p, VringAddr):
            return p.index
        return None

    def _ring_size(self, st: SessionState, p: VringState, seq: int) -> None:
        packed = bool((st.acked_features or 0) & VF.RING_PACKED)
        if not 1 <= p.num <= 32768 or (not packed and p.num & (p.num - 1)):
            self._find(st, "ring-size", f"SET_VRING_NUM {p.num} for vring {p.index}"
                       f"{'' if packed else ' (split ring: a power of 2 is required)'}", seq)

    def _ring_inside(self, st: SessionState, index: int, seq: int) -> None:
        ring = st.rings.get(index)
        if ring is None or ring.addr is None or (st.acked_features or 0) & VF.ACCESS_PLATFORM:
            return  # with an IOMMU the addresses are IOVAs
        num = ring.num or 1
        packed = bool((st.acked_features or 0) & VF.RING_PACKED)
        parts = {"descriptor": (ring.addr.descriptor, 16 * num),
                 "available": (ring.addr.available, 4 if packed else 4 + 2 * num),
                 "used": (ring.addr.used, 4 if packed else 4 + 8 * num)}
        for what, (addr, length) in parts.items():
            if not any(r.userspace_addr <= addr and addr + length <= r.userspace_addr + r.memory_size
                       for r, _ in st.regions):
                self._find(st, "ring-outside-memory", f"vring {index} {what} ring {addr:#x}+{length:#x} is "
                           "outside the memory table", seq)

    def _memory_table(self, st: SessionState, regions: list[MemoryRegion], fdinfo: list[FdInfo],
                      existing: list[MemoryRegion], seq: int) -> None:
        for i, r in enumerate(regions):
            if r.memory_size == 0:
                self._find(st, "memory-table", f"region {i} has size 0", seq)
            info = fdinfo[i] if i < len(fdinfo) else None
            if info is not None and info.size is not None and r.mmap_offset + r.memory_size > info.size:
                self._find(st, "memory-table", f"region {i} (offset {r.mmap_offset:#x} + size {r.memory_size:#x}) "
                           f"is larger than its fd ({info.size:#x} bytes)", seq)
        everything = existing + regions
        for i, a in enumerate(everything):
            for b in everything[i + 1:]:
                if b not in regions:
                    continue
                if _overlap(a.guest_phys_addr, a.guest_phys_addr + a.memory_size,
                            b.guest_phys_addr, b.guest_phys_addr + b.memory_size):
                    self._find(st, "memory-table", f"regions at gpa {a.guest_phys_addr:#x} and "
                               f"{b.guest_phys_addr:#x} overlap", seq)
                elif _overlap(a.userspace_addr, a.userspace_addr + a.memory_size,
                              b.userspace_addr, b.userspace_addr + b.memory_size):
                    self._find(st, "memory-table", f"regions at uva {a.userspace_addr:#x} and "
                               f"{b.userspace_addr:#x} overlap", seq)

    def _used_after_stop(self, st: SessionState, seq: int | None) -> None:
        for ring in st.rings.values():
            if ring.started or ring.used_at_stop is None:
                continue
            if time.monotonic() - ring.stop_t > _USED_WINDOW:
                ring.used_at_stop = None  # the guest owns the ring memory again: stop watching
                continue
            now = st.used_idx(ring)
            # a back-end still completing buffers moves the index forward by at most the ring
            # size; other changes are the guest reusing the memory after the stop
            if now is not None and 0 < (now - ring.used_at_stop) % 65536 <= (ring.num or 65535):
                self._find(st, "ring-used-after-get-base", f"vring {ring.index} used index moved from "
                           f"{ring.used_at_stop} to {now} after the back-end answered GET_VRING_BASE", seq)
                ring.used_at_stop = None  # report once


def _same_rings(a: VringAddr, b: VringAddr) -> bool:
    return (a.descriptor, a.available, a.used) == (b.descriptor, b.available, b.used)
