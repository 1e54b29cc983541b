"""Back-end side of the protocol: a request handler interface, the negotiation
rules, and the driver that reads requests and answers them.

* :class:`BackendReqHandler` - one method per front-end request, named after the
  spec in lower case.  Every default raises :class:`RequestNotSupported` (except
  ``set_owner``/``reset_owner``, which do nothing).  The daemon subclasses it.
* :class:`NegotiationState` - what was offered, acknowledged and negotiated, and
  the rules that follow (SET_OWNER first, protocol features only after
  ``VHOST_USER_F_PROTOCOL_FEATURES`` was offered, per-request feature gates).
* :class:`BackendConnection` - ``handle_one()`` / ``serve_forever()`` over an
  :class:`~vhostuser.connection.Endpoint`, dispatching through a table.

fd ownership: a handler method owns the fds passed to it (also when it raises).
fds it is not given (a REM_MEM_REG fd, the fds of a rejected request) are
closed by the dispatcher.  fds a handler *returns* (GET_INFLIGHT_FD,
GET_SHARED_OBJECT, SET_DEVICE_STATE_FD, POSTCOPY_ADVISE) are sent to the
front-end and then closed by the dispatcher; return a duplicate to keep one.

Errors: a handler method that raises fails just that request: the error is
logged with the request name and a non-zero REPLY_ACK is sent if one is due
(or the request's failure reply, e.g. an empty GET_CONFIG).  Requests whose
reply cannot express a failure (GET_VRING_BASE, GET_FEATURES, ...) drop the
connection instead, as does a :class:`MessageFramingError`.
"""
from __future__ import annotations

import logging
import socket
import uuid as _uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backend_channel import BackendChannel
from .connection import Endpoint, ack_bytes
from .errors import (
    Disconnected,
    InvalidMessage,
    RemoteProtocolError,
    RequestNotAllowed,
    RequestNotSupported,
)
from .protocol.codec import Header, Message, close_fds
from .protocol.message import VRING_INDEX_MASK, VRING_NOFD_MASK, BackendReq, FrontendReq, VhostUserHeaderFlag
from .protocol.message import VhostUserProtocolFeatures as PF
from .protocol.message import VirtioFeatures
from .protocol.payloads import (
    U64,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    Opaque,
    Payload,
    ShmemConfig,
    VringAddr,
    VringState,
)
from .protocol.requests import FRONTEND_REQUESTS, Reply, RequestSpec

__all__ = ["BackendReqHandler", "NegotiationState", "BackendConnection"]

log = logging.getLogger(__name__)


def _unsupported(name: str) -> RequestNotSupported:
    return RequestNotSupported(f"{name} is not supported by this back-end")


class BackendReqHandler:
    """What a back-end does for each front-end request.

    Override the methods your back-end supports; the others answer "not
    supported" (a non-zero REPLY_ACK).  Methods are called from the connection's
    thread, one at a time.  Feature masks are plain ints
    (:class:`VirtioFeatures` / :class:`VhostUserProtocolFeatures` flags).
    """

    # --- negotiation
    def get_features(self) -> int:
        """GET_FEATURES: virtio features offered (include ``VirtioFeatures.PROTOCOL_FEATURES``
        to enable protocol feature negotiation)."""
        raise _unsupported("GET_FEATURES")

    def set_features(self, features: int) -> None:
        """SET_FEATURES: the features the front-end acknowledged (may repeat)."""
        raise _unsupported("SET_FEATURES")

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES: protocol features offered.  REPLY_ACK is added by
        the dispatcher, which implements it."""
        raise _unsupported("GET_PROTOCOL_FEATURES")

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES: the negotiated protocol features."""

    def set_owner(self) -> None:
        """SET_OWNER: a front-end took the session (the dispatcher records it)."""

    def reset_owner(self) -> None:
        """RESET_OWNER (deprecated): ignored by default."""

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM (MQ): the maximum number of queues."""
        raise _unsupported("GET_QUEUE_NUM")

    # --- memory
    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
        """SET_MEM_TABLE: the whole memory table; ``fds[i]`` backs ``regions[i]``."""
        raise _unsupported("SET_MEM_TABLE")

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS)."""
        raise _unsupported("GET_MAX_MEM_SLOTS")

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS): add one region backed by ``fd``."""
        raise _unsupported("ADD_MEM_REG")

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """REM_MEM_REG (CONFIGURE_MEM_SLOTS): remove the region with this guest
        address, user address and size."""
        raise _unsupported("REM_MEM_REG")

    def set_log_base(self, log: Log, fd: int) -> None:
        """SET_LOG_BASE (LOG_SHMFD): the dirty log lives in ``fd`` at ``log.mmap_offset``."""
        raise _unsupported("SET_LOG_BASE")

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: an eventfd to signal log changes."""
        raise _unsupported("SET_LOG_FD")

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """IOTLB_MSG: update/invalidate a device IOTLB entry."""
        raise _unsupported("IOTLB_MSG")

    # --- vrings
    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: queue size."""
        raise _unsupported("SET_VRING_NUM")

    def set_vring_addr(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR: ring addresses (front-end user addresses)."""
        raise _unsupported("SET_VRING_ADDR")

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: next avail index (packed: avail/used idx + wrap counters)."""
        raise _unsupported("SET_VRING_BASE")

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring and return its base (same encoding as SET)."""
        raise _unsupported("GET_VRING_BASE")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK: the kick eventfd, or None to poll."""
        raise _unsupported("SET_VRING_KICK")

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL: the call eventfd, or None."""
        raise _unsupported("SET_VRING_CALL")

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR: the error eventfd, or None."""
        raise _unsupported("SET_VRING_ERR")

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE."""
        raise _unsupported("SET_VRING_ENABLE")

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """SET_VRING_ENDIAN (CROSS_ENDIAN), legacy devices."""
        raise _unsupported("SET_VRING_ENDIAN")

    def vring_kick(self, index: int) -> None:
        """VRING_KICK (INBAND_NOTIFICATIONS): an in-band kick."""
        raise _unsupported("VRING_KICK")

    # --- device
    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        """GET_CONFIG (CONFIG): exactly ``size`` bytes of config space at ``offset``."""
        raise _unsupported("GET_CONFIG")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """SET_CONFIG (CONFIG)."""
        raise _unsupported("SET_CONFIG")

    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        """SET_BACKEND_REQ_FD (BACKEND_REQ): the channel for back-end requests
        (the handler owns it and closes it)."""
        raise _unsupported("SET_BACKEND_REQ_FD")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (RARP): broadcast a RARP for this 6-byte MAC."""
        raise _unsupported("SEND_RARP")

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (MTU)."""
        raise _unsupported("NET_SET_MTU")

    def create_crypto_session(self, data: bytes) -> bytes:
        """CREATE_CRYPTO_SESSION (CRYPTO_SESSION): raw session description in and out."""
        raise _unsupported("CREATE_CRYPTO_SESSION")

    def close_crypto_session(self, session_id: int) -> None:
        """CLOSE_CRYPTO_SESSION (CRYPTO_SESSION)."""
        raise _unsupported("CLOSE_CRYPTO_SESSION")

    def postcopy_advise(self) -> int:
        """POSTCOPY_ADVISE (PAGEFAULT): return a userfaultfd."""
        raise _unsupported("POSTCOPY_ADVISE")

    def postcopy_listen(self) -> None:
        """POSTCOPY_LISTEN (PAGEFAULT)."""
        raise _unsupported("POSTCOPY_LISTEN")

    def postcopy_end(self) -> None:
        """POSTCOPY_END (PAGEFAULT)."""
        raise _unsupported("POSTCOPY_END")

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int]:
        """GET_INFLIGHT_FD (INFLIGHT_SHMFD): the inflight area description and its fd."""
        raise _unsupported("GET_INFLIGHT_FD")

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD (INFLIGHT_SHMFD)."""
        raise _unsupported("SET_INFLIGHT_FD")

    def gpu_set_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET: the vhost-user-gpu protocol socket."""
        raise _unsupported("GPU_SET_SOCKET")

    def reset_device(self) -> None:
        """RESET_DEVICE (RESET_DEVICE): back to the initial state, keeping ownership."""
        raise _unsupported("RESET_DEVICE")

    def set_status(self, status: int) -> None:
        """SET_STATUS (STATUS): virtio device status byte."""
        raise _unsupported("SET_STATUS")

    def get_status(self) -> int:
        """GET_STATUS (STATUS)."""
        raise _unsupported("GET_STATUS")

    def get_shared_object(self, uuid: _uuid.UUID) -> int:
        """GET_SHARED_OBJECT (SHARED_OBJECT): a dma-buf fd for ``uuid``."""
        raise _unsupported("GET_SHARED_OBJECT")

    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        """SET_DEVICE_STATE_FD (DEVICE_STATE): return None to use ``fd``, or an fd of
        the back-end's own channel."""
        raise _unsupported("SET_DEVICE_STATE_FD")

    def check_device_state(self) -> None:
        """CHECK_DEVICE_STATE (DEVICE_STATE): raise if the transfer failed."""
        raise _unsupported("CHECK_DEVICE_STATE")

    def get_shmem_config(self) -> Sequence[int]:
        """GET_SHMEM_CONFIG (SHMEM): shared memory region sizes indexed by shmid."""
        raise _unsupported("GET_SHMEM_CONFIG")


@dataclass
class NegotiationState:
    """Negotiation of one connection, and the rules that follow from it."""

    owner: bool = False
    #: virtio features the back-end offered in GET_FEATURES (None: not asked yet)
    features_offered: int | None = None
    features_acked: int = 0
    protocol_offered: int = 0
    protocol_acked: int = 0

    @property
    def protocol_features_offered(self) -> bool:
        """``VHOST_USER_F_PROTOCOL_FEATURES`` was offered in GET_FEATURES."""
        return bool((self.features_offered or 0) & VirtioFeatures.PROTOCOL_FEATURES)

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK is negotiated."""
        return self.protocol_features_offered and bool(self.protocol_acked & PF.REPLY_ACK)

    def has(self, feature: int) -> bool:
        """Protocol ``feature`` is negotiated."""
        return self.protocol_features_offered and self.protocol_acked & feature == feature

    def check(self, spec: RequestSpec) -> None:
        """Raise :class:`RequestNotAllowed` if ``spec.request`` is not allowed now."""
        name = spec.name
        if spec.needs_owner and not self.owner:
            raise RequestNotAllowed(f"{name} before SET_OWNER", request=spec.request)
        if (spec.needs_protocol_features or spec.feature is not None) and not self.protocol_features_offered:
            raise RequestNotAllowed(f"{name} needs VHOST_USER_F_PROTOCOL_FEATURES, which was not offered",
                                    request=spec.request)
        if spec.feature is not None and not self.has(spec.feature):
            raise RequestNotAllowed(f"{name} needs protocol feature {spec.feature.name}, which is not negotiated",
                                    request=spec.request)

    def ack_due(self, msg: Message | Header) -> bool:
        """Whether a REPLY_ACK must be sent for ``msg`` (an ACK-type request)."""
        return bool(msg.flags & VhostUserHeaderFlag.NEED_REPLY) and self.reply_ack


def _vring_fd(value: int, fds: list[int]) -> tuple[int, int | None]:
    index = value & VRING_INDEX_MASK
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        raise InvalidMessage(f"reserved bits set in vring fd request {value:#x}")
    return index, (None if value & VRING_NOFD_MASK else fds.pop(0))


def _bool_num(msg: Message) -> tuple[int, bool]:
    assert isinstance(msg.payload, VringState)
    if msg.payload.num not in (0, 1):
        raise InvalidMessage(f"{msg.request.name}: num must be 0 or 1, not {msg.payload.num}", request=msg.request)
    return msg.payload.index, bool(msg.payload.num)


#: What an adapter returns: nothing (ACK-type), or a reply payload and fds to send.
_Result = tuple[Payload, Sequence[int]] | None


class BackendConnection:
    """Serves one front-end connection: reads requests, applies the negotiation
    rules, calls the handler, sends replies.

    Drive it with :meth:`handle_one` (one request) from your own loop or poller,
    or with :meth:`serve_forever` (until the front-end disconnects).
    """

    def __init__(self, endpoint: Endpoint, handler: BackendReqHandler) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.state = NegotiationState()
        self._fds: list[int] = []
        self._dispatch: dict[FrontendReq, Callable[[Message], _Result]] = {
            req: getattr(self, f"_do_{spec.method}") for req, spec in FRONTEND_REQUESTS.items()
        }

    def fileno(self) -> int:
        """The connection's fd (for a poller)."""
        return self.endpoint.fileno()

    def close(self) -> None:
        """Close the connection."""
        self.endpoint.close()

    def serve_forever(self) -> None:
        """Handle requests until the front-end disconnects (returns), or the
        connection has to be dropped (closes it and raises the error)."""
        try:
            while True:
                self.handle_one()
        except Disconnected:
            log.info("front-end disconnected")
        finally:
            self.close()

    def handle_one(self, timeout: float | None = None) -> FrontendReq | None:
        """Read and handle one request; returns it, or None if it was rejected.

        Raises :class:`Disconnected` when the front-end went away, and a fatal
        error (after closing the connection) when the connection must be dropped.
        """
        try:
            msg = self.endpoint.recv(timeout)
        except RemoteProtocolError as exc:
            header: Header | None = getattr(exc, "header", None)
            if getattr(exc, "fatal", True) or header is None:
                log.error("dropping the connection: %s", exc)
                self.close()
                raise
            self._reject_undecodable(header, exc)
            return None
        self._handle(msg)
        return msg.request  # type: ignore[return-value]

    # ------------------------------------------------------------- internals
    def _reject_undecodable(self, header: Header, exc: RemoteProtocolError) -> None:
        """A well-framed message that did not decode (fds already closed)."""
        request = getattr(exc, "request", None)
        spec = FRONTEND_REQUESTS.get(request) if isinstance(request, FrontendReq) else None
        log.warning("rejected %s: %s", request.name if request is not None else f"request {header.request}", exc)
        if spec is not None and spec.reply is Reply.ALWAYS:
            self._fail_always(spec, exc)
        elif self.state.ack_due(header) and not header.is_reply:
            self.endpoint.send_bytes(ack_bytes(header.request, 1))

    def _fail_always(self, spec: RequestSpec, exc: BaseException) -> None:
        """A request that is always answered failed."""
        if spec.failure_reply is None:
            log.error("%s failed and its reply cannot say so: dropping the connection", spec.name)
            self.close()
            if isinstance(exc, RemoteProtocolError):
                exc.fatal = True  # type: ignore[attr-defined]
            raise exc
        self._send_reply(spec.request, spec.failure_reply)  # type: ignore[arg-type]

    def _send_reply(self, request: FrontendReq, payload: Payload, fds: Sequence[int] = ()) -> None:
        self.endpoint.send(Message(request, payload, 0x1 | VhostUserHeaderFlag.REPLY, tuple(fds)))

    def _handle(self, msg: Message) -> None:
        spec = FRONTEND_REQUESTS[msg.request]  # type: ignore[index]
        log.debug("request %s flags=%#x fds=%d", spec.name, msg.flags, len(msg.fds))
        self._fds = list(msg.fds)
        try:
            self.state.check(spec)
            result = self._dispatch[msg.request](msg)  # type: ignore[index]
        except Exception as exc:  # noqa: BLE001 - a failing request must not kill the server
            close_fds(self._fds)
            self._fds = []
            log.warning("rejected %s: %s: %s", spec.name, type(exc).__name__, exc)
            if spec.reply is Reply.ALWAYS:
                self._fail_always(spec, exc)
            elif self._ack_due(msg):
                self._send_reply(msg.request, U64(1))  # type: ignore[arg-type]
            if getattr(exc, "fatal", False):
                log.error("dropping the connection after %s", spec.name)
                self.close()
                raise
            return
        close_fds(self._fds)  # fds the handler was not given
        self._fds = []
        if spec.reply is Reply.ALWAYS:
            assert result is not None, spec.name
            payload, out_fds = result
            try:
                self._send_reply(msg.request, payload, out_fds)  # type: ignore[arg-type]
            finally:
                close_fds(out_fds)
        elif self._ack_due(msg):
            self._send_reply(msg.request, U64(0))  # type: ignore[arg-type]

    def _ack_due(self, msg: Message) -> bool:
        if self.state.ack_due(msg):
            return True
        # a SET_PROTOCOL_FEATURES that turns REPLY_ACK on is acked even if it fails
        return (msg.request is FrontendReq.SET_PROTOCOL_FEATURES and msg.need_reply
                and bool(msg.payload.value & self.state.protocol_offered & PF.REPLY_ACK))  # type: ignore[attr-defined]

    def _take(self) -> int:
        return self._fds.pop(0)

    # ---------------------------------------------------- one adapter per request
    # Each takes the decoded message, calls the handler, and returns the reply
    # (Reply.ALWAYS requests) or None.

    def _do_get_features(self, msg: Message) -> _Result:
        features = int(self.handler.get_features())
        self.state.features_offered = features
        return U64(features), ()

    def _do_set_features(self, msg: Message) -> _Result:
        value = msg.payload.value  # type: ignore[attr-defined]
        self.handler.set_features(value)
        self.state.features_acked = value
        return None

    def _do_set_owner(self, msg: Message) -> _Result:
        self.handler.set_owner()
        self.state.owner = True
        return None

    def _do_reset_owner(self, msg: Message) -> _Result:
        self.handler.reset_owner()
        self.state.features_acked = 0  # the device forgot them: so does the negotiation state
        return None

    def _do_get_protocol_features(self, msg: Message) -> _Result:
        features = int(self.handler.get_protocol_features()) | int(PF.REPLY_ACK)
        self.state.protocol_offered = features
        return U64(features), ()

    def _do_set_protocol_features(self, msg: Message) -> _Result:
        value = int(msg.payload.value)  # type: ignore[attr-defined]
        extra = value & ~self.state.protocol_offered
        if extra:
            raise RequestNotAllowed(f"SET_PROTOCOL_FEATURES acknowledges {PF(extra)!r}, which was not offered",
                                    request=msg.request)
        if value & PF.INBAND_NOTIFICATIONS and value & (PF.BACKEND_REQ | PF.REPLY_ACK) != PF.BACKEND_REQ | PF.REPLY_ACK:
            # the spec: "the back-end should close the connection"
            raise RequestNotAllowed("INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK",
                                    request=msg.request, fatal=True)
        self.handler.set_protocol_features(value)
        self.state.protocol_acked = value
        return None

    def _do_get_queue_num(self, msg: Message) -> _Result:
        return U64(int(self.handler.get_queue_num())), ()

    def _do_set_mem_table(self, msg: Message) -> _Result:
        fds, self._fds = self._fds, []
        self.handler.set_mem_table(msg.payload.regions, fds)  # type: ignore[attr-defined]
        return None

    def _do_get_max_mem_slots(self, msg: Message) -> _Result:
        return U64(int(self.handler.get_max_mem_slots())), ()

    def _do_add_mem_reg(self, msg: Message) -> _Result:
        self.handler.add_mem_reg(msg.payload.region, self._take())  # type: ignore[attr-defined]
        return None

    def _do_rem_mem_reg(self, msg: Message) -> _Result:
        self.handler.rem_mem_reg(msg.payload.region)  # type: ignore[attr-defined]
        return None  # a stray fd (allowed by the spec) is closed by the dispatcher

    def _do_set_log_base(self, msg: Message) -> _Result:
        self.handler.set_log_base(msg.payload, self._take())  # type: ignore[arg-type]
        return U64(0), ()

    def _do_set_log_fd(self, msg: Message) -> _Result:
        self.handler.set_log_fd(self._take())
        return None

    def _do_iotlb_msg(self, msg: Message) -> _Result:
        self.handler.iotlb_msg(msg.payload)  # type: ignore[arg-type]
        return U64(0), ()

    def _do_set_vring_num(self, msg: Message) -> _Result:
        p: VringState = msg.payload  # type: ignore[assignment]
        self.handler.set_vring_num(p.index, p.num)
        return None

    def _do_set_vring_addr(self, msg: Message) -> _Result:
        self.handler.set_vring_addr(msg.payload)  # type: ignore[arg-type]
        return None

    def _do_set_vring_base(self, msg: Message) -> _Result:
        p: VringState = msg.payload  # type: ignore[assignment]
        self.handler.set_vring_base(p.index, p.num)
        return None

    def _do_get_vring_base(self, msg: Message) -> _Result:
        index = msg.payload.index  # type: ignore[attr-defined]
        return VringState(index, int(self.handler.get_vring_base(index))), ()

    def _vring_fd_request(self, msg: Message, method: Callable[[int, int | None], None]) -> _Result:
        index, fd = _vring_fd(msg.payload.value, self._fds)  # type: ignore[attr-defined]
        method(index, fd)
        return None

    def _do_set_vring_kick(self, msg: Message) -> _Result:
        return self._vring_fd_request(msg, self.handler.set_vring_kick)

    def _do_set_vring_call(self, msg: Message) -> _Result:
        return self._vring_fd_request(msg, self.handler.set_vring_call)

    def _do_set_vring_err(self, msg: Message) -> _Result:
        return self._vring_fd_request(msg, self.handler.set_vring_err)

    def _do_set_vring_enable(self, msg: Message) -> _Result:
        self.handler.set_vring_enable(*_bool_num(msg))
        return None

    def _do_set_vring_endian(self, msg: Message) -> _Result:
        self.handler.set_vring_endian(*_bool_num(msg))
        return None

    def _do_vring_kick(self, msg: Message) -> _Result:
        self.handler.vring_kick(msg.payload.index)  # type: ignore[attr-defined]
        return None

    def _do_send_rarp(self, msg: Message) -> _Result:
        self.handler.send_rarp(msg.payload.pack()[:6])
        return None

    def _do_net_set_mtu(self, msg: Message) -> _Result:
        self.handler.net_set_mtu(msg.payload.value)  # type: ignore[attr-defined]
        return None

    def _do_set_backend_req_fd(self, msg: Message) -> _Result:
        fd = self._take()
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            close_fds([fd])
            raise
        channel = BackendChannel(Endpoint(sock, BackendReq, replies=True), self.state.protocol_acked)
        try:
            self.handler.set_backend_req_fd(channel)
        except BaseException:
            channel.close()
            raise
        return None

    def _do_get_config(self, msg: Message) -> _Result:
        p: Config = msg.payload  # type: ignore[assignment]
        data = bytes(self.handler.get_config(p.offset, p.size, p.flags))
        if len(data) != p.size:
            raise RequestNotSupported(f"GET_CONFIG handler returned {len(data)} bytes, not {p.size}")
        return Config(p.offset, data, p.flags), ()

    def _do_set_config(self, msg: Message) -> _Result:
        p: Config = msg.payload  # type: ignore[assignment]
        self.handler.set_config(p.offset, p.data, p.flags)
        return None

    def _do_create_crypto_session(self, msg: Message) -> _Result:
        return Opaque(self.handler.create_crypto_session(msg.payload.data)), ()  # type: ignore[attr-defined]

    def _do_close_crypto_session(self, msg: Message) -> _Result:
        self.handler.close_crypto_session(msg.payload.value)  # type: ignore[attr-defined]
        return None

    def _do_postcopy_advise(self, msg: Message) -> _Result:
        return Empty(), (self.handler.postcopy_advise(),)

    def _do_postcopy_listen(self, msg: Message) -> _Result:
        self.handler.postcopy_listen()
        return None

    def _do_postcopy_end(self, msg: Message) -> _Result:
        self.handler.postcopy_end()
        return U64(0), ()

    def _do_get_inflight_fd(self, msg: Message) -> _Result:
        p: Inflight = msg.payload  # type: ignore[assignment]
        inflight, fd = self.handler.get_inflight_fd(p.num_queues, p.queue_size)
        return inflight, (fd,)

    def _do_set_inflight_fd(self, msg: Message) -> _Result:
        self.handler.set_inflight_fd(msg.payload, self._take())  # type: ignore[arg-type]
        return None

    def _do_gpu_set_socket(self, msg: Message) -> _Result:
        self.handler.gpu_set_socket(self._take())
        return None

    def _do_reset_device(self, msg: Message) -> _Result:
        self.handler.reset_device()
        # One truth: the device is back to "features not acked" (ownership and the
        # protocol features, which belong to the connection, are kept).
        self.state.features_acked = 0
        return None

    def _do_set_status(self, msg: Message) -> _Result:
        self.handler.set_status(msg.payload.value)  # type: ignore[attr-defined]
        return None

    def _do_get_status(self, msg: Message) -> _Result:
        return U64(int(self.handler.get_status())), ()

    def _do_get_shared_object(self, msg: Message) -> _Result:
        return Empty(), (self.handler.get_shared_object(msg.payload.uuid),)  # type: ignore[attr-defined]

    def _do_set_device_state_fd(self, msg: Message) -> _Result:
        p: DeviceStateTransfer = msg.payload  # type: ignore[assignment]
        fd = self.handler.set_device_state_fd(p.direction, p.phase, self._take())
        if fd is None:
            return U64(VRING_NOFD_MASK), ()
        return U64(0), (fd,)

    def _do_check_device_state(self, msg: Message) -> _Result:
        self.handler.check_device_state()
        return U64(0), ()

    def _do_get_shmem_config(self, msg: Message) -> _Result:
        return ShmemConfig(tuple(self.handler.get_shmem_config())), ()

