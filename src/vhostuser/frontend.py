"""Front-end client: drive any vhost-user back-end (ours, QEMU's, rust-vmm's...).

:class:`Frontend` has one method per front-end request.  When REPLY_ACK is
negotiated it sets NEED_REPLY on requests without a reply of their own and
waits for the ack (a non-zero ack raises :class:`RequestFailed`).  Requests
gated by a protocol feature raise :class:`LocalProtocolError` until the
feature is negotiated (use :meth:`Frontend.request` with ``check=False`` to send
one anyway, e.g. to test a back-end).

:class:`FrontendReqHandler` + :class:`BackendChannelServer` service the
back-end's requests (the SET_BACKEND_REQ_FD channel), from a thread or a poll loop.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid as _uuid
from collections.abc import Callable, Sequence

from .connection import Endpoint
from .errors import (
    Disconnected,
    InvalidMessage,
    LocalProtocolError,
    RemoteProtocolError,
    RequestFailed,
    RequestNotSupported,
)
from .protocol.codec import Message, close_fds
from .protocol.message import VERSION, BackendReq, FrontendReq, VhostUserHeaderFlag
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
    vring_fd_u64,
)
from .protocol.requests import BACKEND_REQUESTS, FRONTEND_REQUESTS, Reply

__all__ = ["Frontend", "FrontendReqHandler", "BackendChannelServer"]

log = logging.getLogger(__name__)


class Frontend:
    """A vhost-user front-end talking to one back-end over ``endpoint``
    (an :class:`Endpoint` that receives :class:`FrontendReq` replies).

    Not thread-safe: one request is on the wire at a time (use one thread).
    """

    def __init__(self, endpoint: Endpoint, *, reply_timeout: float | None = 30.0) -> None:
        self.endpoint = endpoint
        self.reply_timeout = reply_timeout
        #: virtio features the back-end offered (None until :meth:`get_features`)
        self.backend_features: int | None = None
        #: protocol features negotiated with :meth:`set_protocol_features`
        self.protocol_features = PF(0)
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, path: str | os.PathLike[str], **kw: object) -> Frontend:
        """Connect to a back-end listening at ``path``."""
        return cls(Endpoint.connect(path, FrontendReq, replies=True), **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the connection."""
        self.endpoint.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK is negotiated."""
        return bool(self.protocol_features & PF.REPLY_ACK)

    # ------------------------------------------------------------- generic
    def request(self, request: FrontendReq, payload: Payload | None = None, fds: Sequence[int] = (), *,
                need_reply: bool | None = None, check: bool = True) -> Message | None:
        """Send ``request`` and return its reply (requests that always have one;
        the caller owns the reply's fds) or None.

        ``need_reply`` defaults to "if REPLY_ACK is negotiated"; an ack is only
        awaited when REPLY_ACK is negotiated.  ``check=False`` skips the
        feature-gate check (to test how a back-end rejects a request).
        """
        spec = FRONTEND_REQUESTS[request]
        payload = Empty() if payload is None else payload
        if check and spec.feature is not None and not self.protocol_features & spec.feature:
            raise LocalProtocolError(f"{request.name} needs protocol feature {spec.feature.name}, not negotiated",
                                     request=request)
        always = spec.reply is Reply.ALWAYS
        if need_reply is None:
            need_reply = self.reply_ack
        wait_ack = not always and need_reply and self.reply_ack
        flags = VERSION | (VhostUserHeaderFlag.NEED_REPLY if need_reply and not always else 0)
        with self._lock:
            self.endpoint.send(Message(request, payload, flags, tuple(fds)))
            if not (always or wait_ack):
                return None
            reply = self.endpoint.recv(self.reply_timeout)
        if reply.request != request:
            reply.close_fds()
            raise InvalidMessage(f"back-end answered {request.name} with {reply.request.name}", request=request)
        if wait_ack and reply.payload.value:  # type: ignore[attr-defined]
            raise RequestFailed(f"back-end failed {request.name} (ack {reply.payload.value})",  # type: ignore[attr-defined]
                                request=request, code=reply.payload.value)  # type: ignore[attr-defined]
        return reply

    def _u64(self, request: FrontendReq, payload: Payload | None = None) -> int:
        reply = self.request(request, payload)
        assert reply is not None
        return reply.payload.value  # type: ignore[attr-defined]

    def _status(self, request: FrontendReq, reply: Message | None) -> None:
        assert reply is not None
        value = reply.payload.value if isinstance(reply.payload, U64) else 0
        if value:
            reply.close_fds()
            raise RequestFailed(f"back-end failed {request.name} ({value:#x})", request=request, code=value)

    # --------------------------------------------------------- negotiation
    def get_features(self) -> int:
        """GET_FEATURES."""
        self.backend_features = self._u64(FrontendReq.GET_FEATURES)
        return self.backend_features

    def set_features(self, features: int) -> None:
        """SET_FEATURES."""
        self.request(FrontendReq.SET_FEATURES, U64(int(features)))

    def get_protocol_features(self) -> PF:
        """GET_PROTOCOL_FEATURES (the back-end must offer ``VHOST_USER_F_PROTOCOL_FEATURES``)."""
        if self.backend_features is not None and not self.backend_features & VirtioFeatures.PROTOCOL_FEATURES:
            raise LocalProtocolError("the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        return PF(self._u64(FrontendReq.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES; REPLY_ACK applies from this request on."""
        self.protocol_features = PF(int(features))
        self.request(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(features)))

    def set_owner(self) -> None:
        """SET_OWNER."""
        self.request(FrontendReq.SET_OWNER)

    def reset_owner(self) -> None:
        """RESET_OWNER (deprecated)."""
        self.request(FrontendReq.RESET_OWNER)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM (MQ)."""
        return self._u64(FrontendReq.GET_QUEUE_NUM)

    # --------------------------------------------------------------- memory
    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
        """SET_MEM_TABLE: ``fds[i]`` backs ``regions[i]`` (at most 8 regions)."""
        self.request(FrontendReq.SET_MEM_TABLE, MemoryTable(tuple(regions)), fds)

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS)."""
        return self._u64(FrontendReq.GET_MAX_MEM_SLOTS)

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS)."""
        self.request(FrontendReq.ADD_MEM_REG, SingleMemoryRegion(region), (fd,))

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """REM_MEM_REG (CONFIGURE_MEM_SLOTS)."""
        self.request(FrontendReq.REM_MEM_REG, SingleMemoryRegion(region))

    def set_log_base(self, log: Log, fd: int) -> None:
        """SET_LOG_BASE (LOG_SHMFD): waits for the back-end's reply."""
        reply = self.request(FrontendReq.SET_LOG_BASE, log, (fd,))
        if reply is not None and isinstance(reply.payload, U64):
            self._status(FrontendReq.SET_LOG_BASE, reply)

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD."""
        self.request(FrontendReq.SET_LOG_FD, fds=(fd,))

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """IOTLB_MSG: the back-end answers 0 for success."""
        self._status(FrontendReq.IOTLB_MSG, self.request(FrontendReq.IOTLB_MSG, msg))

    # --------------------------------------------------------------- vrings
    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM."""
        self.request(FrontendReq.SET_VRING_NUM, VringState(index, num))

    def set_vring_addr(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR."""
        self.request(FrontendReq.SET_VRING_ADDR, addr)

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE."""
        self.request(FrontendReq.SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index: int, num: int = 0) -> int:
        """GET_VRING_BASE: stops the ring, returns its base."""
        reply = self.request(FrontendReq.GET_VRING_BASE, VringState(index, num))
        assert reply is not None
        return reply.payload.num  # type: ignore[attr-defined]

    def _vring_fd(self, request: FrontendReq, index: int, fd: int | None) -> None:
        self.request(request, vring_fd_u64(index, fd is not None), () if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK (``fd=None``: poll)."""
        self._vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL."""
        self._vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR."""
        self._vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE."""
        self.request(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enable)))

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """SET_VRING_ENDIAN (CROSS_ENDIAN)."""
        self.request(FrontendReq.SET_VRING_ENDIAN, VringState(index, int(big_endian)))

    def vring_kick(self, index: int) -> None:
        """VRING_KICK (INBAND_NOTIFICATIONS)."""
        self.request(FrontendReq.VRING_KICK, VringState(index, 0))

    # --------------------------------------------------------------- device
    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG (CONFIG): ``size`` bytes at ``offset``; an empty reply raises RequestFailed."""
        reply = self.request(FrontendReq.GET_CONFIG, Config(offset, bytes(size), flags))
        assert reply is not None
        if not isinstance(reply.payload, Config):
            raise RequestFailed("back-end failed GET_CONFIG (empty reply)", request=FrontendReq.GET_CONFIG)
        if reply.payload.size != size or reply.payload.offset != offset:
            raise InvalidMessage(f"GET_CONFIG reply for [{reply.payload.offset}, +{reply.payload.size}), "
                                 f"asked [{offset}, +{size})", request=FrontendReq.GET_CONFIG)
        return reply.payload.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG (CONFIG)."""
        self.request(FrontendReq.SET_CONFIG, Config(offset, data, flags))

    def set_backend_req_fd(self, fd: int) -> None:
        """SET_BACKEND_REQ_FD (BACKEND_REQ): ``fd`` is the back-end's end of a
        socketpair (see :meth:`open_backend_channel`); the caller still owns it."""
        self.request(FrontendReq.SET_BACKEND_REQ_FD, fds=(fd,))

    def open_backend_channel(self, handler: FrontendReqHandler) -> BackendChannelServer:
        """Create a socketpair, send one end with SET_BACKEND_REQ_FD, and return a
        server for the other end that dispatches to ``handler``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.set_backend_req_fd(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return BackendChannelServer(Endpoint(ours, BackendReq, replies=False), handler, self.protocol_features)

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (RARP)."""
        if len(mac) != 6:
            raise LocalProtocolError("a MAC address has 6 bytes")
        self.request(FrontendReq.SEND_RARP, U64.unpack(bytes(mac) + bytes(2)))

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (MTU)."""
        self.request(FrontendReq.NET_SET_MTU, U64(mtu))

    def create_crypto_session(self, session: bytes) -> bytes:
        """CREATE_CRYPTO_SESSION (CRYPTO_SESSION): the session description is passed
        through uninterpreted (vhost-user-crypto's layout is not modelled)."""
        reply = self.request(FrontendReq.CREATE_CRYPTO_SESSION, Opaque(session))
        assert reply is not None
        return reply.payload.data  # type: ignore[attr-defined]

    def close_crypto_session(self, session_id: int) -> None:
        """CLOSE_CRYPTO_SESSION (CRYPTO_SESSION)."""
        self.request(FrontendReq.CLOSE_CRYPTO_SESSION, U64(session_id))

    def destroy_crypto_session(self, session_id: int) -> None:
        """Alias of :meth:`close_crypto_session`."""
        self.close_crypto_session(session_id)

    def postcopy_advise(self) -> int:
        """POSTCOPY_ADVISE (PAGEFAULT): the back-end's userfaultfd (caller owns it)."""
        reply = self.request(FrontendReq.POSTCOPY_ADVISE)
        assert reply is not None
        if not reply.fds:
            raise RequestFailed("back-end sent no userfaultfd", request=FrontendReq.POSTCOPY_ADVISE)
        return reply.fds[0]

    def postcopy_listen(self) -> None:
        """POSTCOPY_LISTEN (PAGEFAULT)."""
        self.request(FrontendReq.POSTCOPY_LISTEN)

    def postcopy_end(self) -> None:
        """POSTCOPY_END (PAGEFAULT)."""
        self._status(FrontendReq.POSTCOPY_END, self.request(FrontendReq.POSTCOPY_END))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int]:
        """GET_INFLIGHT_FD (INFLIGHT_SHMFD): area description and fd (caller owns it)."""
        reply = self.request(FrontendReq.GET_INFLIGHT_FD, Inflight(num_queues=num_queues, queue_size=queue_size))
        assert reply is not None
        return reply.payload, reply.fds[0]  # type: ignore[return-value]

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD (INFLIGHT_SHMFD)."""
        self.request(FrontendReq.SET_INFLIGHT_FD, inflight, (fd,))

    def gpu_set_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET."""
        self.request(FrontendReq.GPU_SET_SOCKET, fds=(fd,))

    def reset_device(self) -> None:
        """RESET_DEVICE (RESET_DEVICE)."""
        self.request(FrontendReq.RESET_DEVICE)

    def set_status(self, status: int) -> None:
        """SET_STATUS (STATUS)."""
        self.request(FrontendReq.SET_STATUS, U64(status))

    def get_status(self) -> int:
        """GET_STATUS (STATUS)."""
        return self._u64(FrontendReq.GET_STATUS)

    def get_shared_object(self, uuid: _uuid.UUID) -> int:
        """GET_SHARED_OBJECT (SHARED_OBJECT): the dma-buf fd (caller owns it)."""
        reply = self.request(FrontendReq.GET_SHARED_OBJECT, SharedObject(uuid))
        assert reply is not None
        if not reply.fds:
            raise RequestFailed(f"back-end has no shared object {uuid}", request=FrontendReq.GET_SHARED_OBJECT)
        return reply.fds[0]

    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        """SET_DEVICE_STATE_FD (DEVICE_STATE): None, or the back-end's own channel fd."""
        reply = self.request(FrontendReq.SET_DEVICE_STATE_FD, DeviceStateTransfer(direction, phase), (fd,))
        assert reply is not None
        value = reply.payload.value  # type: ignore[attr-defined]
        if value & 0xFF:
            reply.close_fds()
            raise RequestFailed(f"back-end failed SET_DEVICE_STATE_FD ({value:#x})",
                                request=FrontendReq.SET_DEVICE_STATE_FD, code=value)
        return reply.fds[0] if reply.fds else None

    def check_device_state(self) -> None:
        """CHECK_DEVICE_STATE (DEVICE_STATE): raises RequestFailed on a non-zero answer."""
        self._status(FrontendReq.CHECK_DEVICE_STATE, self.request(FrontendReq.CHECK_DEVICE_STATE))

    def get_shmem_config(self) -> tuple[int, ...]:
        """GET_SHMEM_CONFIG (SHMEM): region sizes indexed by shmid."""
        reply = self.request(FrontendReq.GET_SHMEM_CONFIG)
        assert reply is not None and isinstance(reply.payload, ShmemConfig)
        return reply.payload.sizes


class FrontendReqHandler:
    """What a front-end does for each back-end request.  Override what you
    support; the defaults answer "not supported" (a non-zero ack if one is due).
    A method given an fd owns it."""

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """IOTLB_MSG (miss / access failure)."""
        raise RequestNotSupported("IOTLB_MSG")

    def config_change_msg(self) -> None:
        """CONFIG_CHANGE_MSG."""
        raise RequestNotSupported("CONFIG_CHANGE_MSG")

    def vring_host_notifier_msg(self, area: VringArea, fd: int | None) -> None:
        """VRING_HOST_NOTIFIER_MSG."""
        raise RequestNotSupported("VRING_HOST_NOTIFIER_MSG")

    def vring_call(self, index: int) -> None:
        """VRING_CALL (in-band)."""
        raise RequestNotSupported("VRING_CALL")

    def vring_err(self, index: int) -> None:
        """VRING_ERR (in-band)."""
        raise RequestNotSupported("VRING_ERR")

    def shared_object_add(self, uuid: _uuid.UUID) -> None:
        """SHARED_OBJECT_ADD."""
        raise RequestNotSupported("SHARED_OBJECT_ADD")

    def shared_object_remove(self, uuid: _uuid.UUID) -> None:
        """SHARED_OBJECT_REMOVE."""
        raise RequestNotSupported("SHARED_OBJECT_REMOVE")

    def shared_object_lookup(self, uuid: _uuid.UUID) -> int:
        """SHARED_OBJECT_LOOKUP: return a dma-buf fd (sent, then closed)."""
        raise RequestNotSupported("SHARED_OBJECT_LOOKUP")

    def shmem_map(self, mapping: ShmemMap, fd: int) -> None:
        """SHMEM_MAP."""
        raise RequestNotSupported("SHMEM_MAP")

    def shmem_unmap(self, mapping: ShmemMap) -> None:
        """SHMEM_UNMAP."""
        raise RequestNotSupported("SHMEM_UNMAP")


class BackendChannelServer:
    """Services back-end requests arriving on the front-end's end of the
    SET_BACKEND_REQ_FD channel: call :meth:`handle_one` when :meth:`fileno` is
    readable, or :meth:`start` a thread."""

    def __init__(self, endpoint: Endpoint, handler: FrontendReqHandler, protocol_features: int = 0) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.protocol_features = PF(protocol_features)
        self._thread: threading.Thread | None = None
        self._calls: dict[BackendReq, Callable[[Message], tuple[Payload, Sequence[int]] | None]] = {
            BackendReq.IOTLB_MSG: lambda m: handler.iotlb_msg(m.payload),  # type: ignore[arg-type,func-returns-value]
            BackendReq.CONFIG_CHANGE_MSG: lambda m: handler.config_change_msg(),  # type: ignore[func-returns-value]
            BackendReq.VRING_HOST_NOTIFIER_MSG: lambda m: handler.vring_host_notifier_msg(  # type: ignore[func-returns-value]
                m.payload, self._fds.pop(0) if self._fds else None),  # type: ignore[arg-type]
            BackendReq.VRING_CALL: lambda m: handler.vring_call(m.payload.index),  # type: ignore[attr-defined,func-returns-value]
            BackendReq.VRING_ERR: lambda m: handler.vring_err(m.payload.index),  # type: ignore[attr-defined,func-returns-value]
            BackendReq.SHARED_OBJECT_ADD: lambda m: handler.shared_object_add(m.payload.uuid),  # type: ignore[attr-defined,func-returns-value]
            BackendReq.SHARED_OBJECT_REMOVE: lambda m: handler.shared_object_remove(m.payload.uuid),  # type: ignore[attr-defined,func-returns-value]
            BackendReq.SHARED_OBJECT_LOOKUP: lambda m: (U64(0), (handler.shared_object_lookup(m.payload.uuid),)),  # type: ignore[attr-defined]
            BackendReq.SHMEM_MAP: lambda m: handler.shmem_map(m.payload, self._fds.pop(0)),  # type: ignore[arg-type,func-returns-value]
            BackendReq.SHMEM_UNMAP: lambda m: handler.shmem_unmap(m.payload),  # type: ignore[arg-type,func-returns-value]
        }
        self._fds: list[int] = []

    def fileno(self) -> int:
        """The channel's fd (for a poller)."""
        return self.endpoint.fileno()

    def handle_one(self, timeout: float | None = None) -> BackendReq | None:
        """Handle one back-end request; None if it was rejected.  Raises
        :class:`Disconnected` when the back-end closed the channel."""
        try:
            msg = self.endpoint.recv(timeout)
        except RemoteProtocolError as exc:
            log.warning("rejected back-end request: %s", exc)
            if getattr(exc, "fatal", True):
                self.close()
                raise
            return None
        spec = BACKEND_REQUESTS[msg.request]  # type: ignore[index]
        self._fds = list(msg.fds)
        result: tuple[Payload | None, Sequence[int]] | None
        try:
            result = self._calls[msg.request](msg)  # type: ignore[index]
        except Exception as exc:  # noqa: BLE001 - a failing request must not kill the channel
            log.warning("front-end failed %s: %s", spec.name, exc)
            result = (spec.failure_reply, ()) if spec.reply is Reply.ALWAYS else None
            ok = False
        else:
            ok = True
        finally:
            close_fds(self._fds)
            self._fds = []
        flags = VERSION | VhostUserHeaderFlag.REPLY
        if spec.reply is Reply.ALWAYS:
            assert result is not None
            payload, out = result
            try:
                self.endpoint.send(Message(msg.request, payload, flags, tuple(out)))  # type: ignore[arg-type]
            finally:
                close_fds(out)
        elif msg.need_reply and self.protocol_features & PF.REPLY_ACK:
            self.endpoint.send(Message(msg.request, U64(0 if ok else 1), flags))
        return msg.request if ok else None  # type: ignore[return-value]

    def serve_forever(self) -> None:
        """Handle requests until the back-end closes the channel."""
        try:
            while True:
                self.handle_one()
        except Disconnected:
            pass
        finally:
            self.close()

    def start(self) -> threading.Thread:
        """Serve from a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="vhost-user-backend-channel", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """Close the channel (the thread, if any, ends)."""
        try:
            self.endpoint.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.endpoint.close()
