"""THE table: what each vhost-user request carries and how it is answered.

One :class:`RequestSpec` per request says: the request payload type, how many fds
come with it, whether a reply is always due (and its payload types and fds) or only
a REPLY_ACK when the sender set NEED_REPLY, and which protocol feature gates it.
The codec validates against this table, the back-end dispatcher and the front-end
client are driven by it, and ``docs/protocol.md`` documents it.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LocalProtocolError
from .message import MAX_BACKEND_FDS, MAX_MEM_TABLE_REGIONS, VRING_NOFD_MASK, BackendReq, FrontendReq
from .message import VhostUserProtocolFeatures as PF
from .payloads import (
    U64,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemoryTable,
    Opaque,
    Payload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
)

__all__ = [
    "Reply",
    "FdRule",
    "NO_FDS",
    "ONE_FD",
    "OPTIONAL_FD",
    "ONE_PER_REGION",
    "UNLESS_NOFD",
    "UNLESS_INVALID_FD_REPLY",
    "RequestSpec",
    "FRONTEND_REQUESTS",
    "BACKEND_REQUESTS",
    "spec_for",
]


class Reply(enum.Enum):
    """When a request is answered."""

    #: no reply, except a u64 REPLY_ACK (0 = success) if the sender set NEED_REPLY
    #: and REPLY_ACK is negotiated
    ACK = "ack"
    #: always answered with one of ``RequestSpec.reply_payloads`` (NEED_REPLY changes nothing)
    ALWAYS = "always"


@dataclass(frozen=True)
class FdRule:
    """How many fds a message must carry, possibly depending on its payload."""

    name: str
    _count: Callable[[Payload], tuple[int, int]]

    def allowed(self, payload: Payload) -> tuple[int, int]:
        """(minimum, maximum) number of fds for a message with this payload."""
        return self._count(payload)

    def check(self, payload: Payload, nfds: int) -> str | None:
        """None if ``nfds`` is right, else a description of what was expected."""
        lo, hi = self.allowed(payload)
        if lo <= nfds <= hi:
            return None
        want = f"{lo}" if lo == hi else f"{lo}..{hi}"
        return f"{want} fd(s) ({self.name}), got {nfds}"

    def __repr__(self) -> str:
        return f"FdRule({self.name})"


def _nofd_bit(payload: Payload) -> tuple[int, int]:
    value: int | None = getattr(payload, "value", None)
    if value is None:
        value = int(getattr(payload, "u64", 0))
    n = 0 if value & VRING_NOFD_MASK else 1
    return n, n


NO_FDS = FdRule("none", lambda p: (0, 0))
ONE_FD = FdRule("exactly one", lambda p: (1, 1))
OPTIONAL_FD = FdRule("zero or one", lambda p: (0, 1))
ONE_PER_REGION = FdRule("one per region", lambda p: (len(getattr(p, "regions", ())),) * 2)
#: SET_VRING_KICK/CALL/ERR and VRING_HOST_NOTIFIER_MSG: one fd unless bit 8 (NOFD) of the u64 is set
UNLESS_NOFD = FdRule("one unless the NOFD bit 8 is set", _nofd_bit)
#: the SET_DEVICE_STATE_FD reply: one fd unless bit 8 (invalid fd) is set
UNLESS_INVALID_FD_REPLY = FdRule("one unless bit 8 (invalid fd) is set", _nofd_bit)
#: up to 8 fds (back-end messages with BACKEND_SEND_FD)
UP_TO_BACKEND_FDS = FdRule(f"0..{MAX_BACKEND_FDS}", lambda p: (0, MAX_BACKEND_FDS))


@dataclass(frozen=True)
class RequestSpec:
    """Everything the protocol says about one request."""

    request: FrontendReq | BackendReq
    #: payload type of the request
    payload: type[Payload] = Empty
    #: fds that come with the request
    fds: FdRule = NO_FDS
    #: when the request is answered
    reply: Reply = Reply.ACK
    #: accepted reply payload types (picked by size); ``(U64,)`` for REPLY_ACK
    reply_payloads: tuple[type[Payload], ...] = (U64,)
    #: fds that come with the reply
    reply_fds: FdRule = NO_FDS
    #: protocol feature that must be negotiated first (None: none)
    feature: PF | None = None
    #: needs ``VHOST_USER_F_PROTOCOL_FEATURES`` to have been offered by the back-end
    needs_protocol_features: bool = False
    #: only valid after SET_OWNER (query and negotiation requests are not)
    needs_owner: bool = True
    #: ``Reply.ALWAYS`` only: the reply that reports a failure; None means a failure
    #: cannot be reported, so the connection is dropped instead
    failure_reply: Payload | None = None

    @property
    def name(self) -> str:
        """The spec name (``GET_FEATURES``)."""
        return self.request.name

    @property
    def method(self) -> str:
        """Handler / client method name: the spec name in lower case."""
        return self.request.name.lower()

    def reply_type_for_size(self, size: int) -> type[Payload] | None:
        """The reply payload type a reply of ``size`` bytes is, or None."""
        for t in self.reply_payloads:
            if t.fits(size):
                return t
        return None


def _f(request: FrontendReq, payload: type[Payload] = Empty, **kw: object) -> RequestSpec:
    return RequestSpec(request, payload, **kw)  # type: ignore[arg-type]


_A = Reply.ALWAYS
_FR = FrontendReq
_BR = BackendReq

#: Front-end -> back-end requests, 1..44.
FRONTEND_REQUESTS: dict[FrontendReq, RequestSpec] = {s.request: s for s in (  # type: ignore[misc]
    _f(_FR.GET_FEATURES, reply=_A, needs_owner=False),
    _f(_FR.SET_FEATURES, U64),
    _f(_FR.SET_OWNER, needs_owner=False),
    _f(_FR.RESET_OWNER, needs_owner=False),
    _f(_FR.SET_MEM_TABLE, MemoryTable, fds=ONE_PER_REGION),
    _f(_FR.SET_LOG_BASE, Log, fds=ONE_FD, reply=_A, reply_payloads=(U64, Log), feature=PF.LOG_SHMFD,
       failure_reply=U64(1)),
    _f(_FR.SET_LOG_FD, fds=ONE_FD),
    _f(_FR.SET_VRING_NUM, VringState),
    _f(_FR.SET_VRING_ADDR, VringAddr),
    _f(_FR.SET_VRING_BASE, VringState),
    _f(_FR.GET_VRING_BASE, VringState, reply=_A, reply_payloads=(VringState,)),
    _f(_FR.SET_VRING_KICK, U64, fds=UNLESS_NOFD),
    _f(_FR.SET_VRING_CALL, U64, fds=UNLESS_NOFD),
    _f(_FR.SET_VRING_ERR, U64, fds=UNLESS_NOFD),
    _f(_FR.GET_PROTOCOL_FEATURES, reply=_A, needs_protocol_features=True, needs_owner=False),
    _f(_FR.SET_PROTOCOL_FEATURES, U64, needs_protocol_features=True, needs_owner=False),
    _f(_FR.GET_QUEUE_NUM, reply=_A, feature=PF.MQ, needs_owner=False),
    _f(_FR.SET_VRING_ENABLE, VringState, needs_protocol_features=True),
    _f(_FR.SEND_RARP, U64, feature=PF.RARP),
    _f(_FR.NET_SET_MTU, U64, feature=PF.MTU),
    _f(_FR.SET_BACKEND_REQ_FD, fds=ONE_FD, feature=PF.BACKEND_REQ, needs_owner=False),
    _f(_FR.IOTLB_MSG, IotlbMsg, reply=_A, failure_reply=U64(1)),
    _f(_FR.SET_VRING_ENDIAN, VringState, feature=PF.CROSS_ENDIAN),
    _f(_FR.GET_CONFIG, Config, reply=_A, reply_payloads=(Config, Empty), feature=PF.CONFIG, needs_owner=False,
       failure_reply=Empty()),
    _f(_FR.SET_CONFIG, Config, feature=PF.CONFIG),
    _f(_FR.CREATE_CRYPTO_SESSION, Opaque, reply=_A, reply_payloads=(Opaque,), feature=PF.CRYPTO_SESSION),
    _f(_FR.CLOSE_CRYPTO_SESSION, U64, feature=PF.CRYPTO_SESSION),
    _f(_FR.POSTCOPY_ADVISE, reply=_A, reply_payloads=(Empty, U64), reply_fds=OPTIONAL_FD, feature=PF.PAGEFAULT,
       failure_reply=Empty()),
    _f(_FR.POSTCOPY_LISTEN, feature=PF.PAGEFAULT),
    _f(_FR.POSTCOPY_END, reply=_A, feature=PF.PAGEFAULT, failure_reply=U64(1)),
    _f(_FR.GET_INFLIGHT_FD, Inflight, reply=_A, reply_payloads=(Inflight,), reply_fds=ONE_FD,
       feature=PF.INFLIGHT_SHMFD),
    _f(_FR.SET_INFLIGHT_FD, Inflight, fds=ONE_FD, feature=PF.INFLIGHT_SHMFD),
    _f(_FR.GPU_SET_SOCKET, fds=ONE_FD),
    _f(_FR.RESET_DEVICE, feature=PF.RESET_DEVICE),
    _f(_FR.VRING_KICK, VringState, feature=PF.INBAND_NOTIFICATIONS),
    _f(_FR.GET_MAX_MEM_SLOTS, reply=_A, feature=PF.CONFIGURE_MEM_SLOTS, needs_owner=False),
    _f(_FR.ADD_MEM_REG, SingleMemoryRegion, fds=ONE_FD, feature=PF.CONFIGURE_MEM_SLOTS),
    _f(_FR.REM_MEM_REG, SingleMemoryRegion, fds=OPTIONAL_FD, feature=PF.CONFIGURE_MEM_SLOTS),
    _f(_FR.SET_STATUS, U64, feature=PF.STATUS),
    _f(_FR.GET_STATUS, reply=_A, feature=PF.STATUS, needs_owner=False),
    _f(_FR.GET_SHARED_OBJECT, SharedObject, reply=_A, reply_payloads=(Empty, U64), reply_fds=OPTIONAL_FD,
       feature=PF.SHARED_OBJECT, failure_reply=Empty()),
    _f(_FR.SET_DEVICE_STATE_FD, DeviceStateTransfer, fds=ONE_FD, reply=_A, reply_fds=UNLESS_INVALID_FD_REPLY,
       feature=PF.DEVICE_STATE, failure_reply=U64(0x101)),
    _f(_FR.CHECK_DEVICE_STATE, reply=_A, feature=PF.DEVICE_STATE, failure_reply=U64(1)),
    _f(_FR.GET_SHMEM_CONFIG, reply=_A, reply_payloads=(ShmemConfig,), feature=PF.SHMEM, needs_owner=False),
)}


def _b(request: BackendReq, payload: type[Payload] = Empty, **kw: object) -> RequestSpec:
    return RequestSpec(request, payload, needs_owner=False, **kw)  # type: ignore[arg-type]


#: Back-end -> front-end requests, 1..10 (all need BACKEND_REQ for the channel to exist).
BACKEND_REQUESTS: dict[BackendReq, RequestSpec] = {s.request: s for s in (  # type: ignore[misc]
    _b(_BR.IOTLB_MSG, IotlbMsg),
    _b(_BR.CONFIG_CHANGE_MSG, feature=PF.CONFIG),
    _b(_BR.VRING_HOST_NOTIFIER_MSG, VringArea, fds=UNLESS_NOFD, feature=PF.HOST_NOTIFIER),
    _b(_BR.VRING_CALL, VringState, feature=PF.INBAND_NOTIFICATIONS),
    _b(_BR.VRING_ERR, VringState, feature=PF.INBAND_NOTIFICATIONS),
    _b(_BR.SHARED_OBJECT_ADD, SharedObject, feature=PF.SHARED_OBJECT),
    _b(_BR.SHARED_OBJECT_REMOVE, SharedObject, feature=PF.SHARED_OBJECT),
    _b(_BR.SHARED_OBJECT_LOOKUP, SharedObject, reply=_A, reply_fds=OPTIONAL_FD, feature=PF.SHARED_OBJECT,
       failure_reply=U64(1)),
    _b(_BR.SHMEM_MAP, ShmemMap, fds=ONE_FD, feature=PF.SHMEM),
    _b(_BR.SHMEM_UNMAP, ShmemMap, feature=PF.SHMEM),
)}

assert len(FRONTEND_REQUESTS) == 44 and len(BACKEND_REQUESTS) == 10
assert MAX_MEM_TABLE_REGIONS == 8


def spec_for(request: FrontendReq | BackendReq) -> RequestSpec:
    """The table entry of ``request``."""
    try:
        if isinstance(request, BackendReq):
            return BACKEND_REQUESTS[request]
        return FRONTEND_REQUESTS[request]
    except KeyError:
        raise LocalProtocolError(f"{request!r} is not a vhost-user request") from None
