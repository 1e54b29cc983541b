"""Back-end -> front-end requests over the channel set up by SET_BACKEND_REQ_FD.

:class:`BackendChannel` is thread-safe: device worker threads may call it
concurrently; one request (and its reply) is on the wire at a time.

Notifications (in-band VRING_CALL / VRING_ERR) are *posted*: sent with
NEED_REPLY, but their acks are not waited for; they are collected (in order)
when they have arrived, at the next request.  So a worker never waits for the
front-end while it holds its vring lock, and an ack that arrives after a
request timed out is recognised as late, never taken as the reply to the next
request (the channel stays in step).
"""
from __future__ import annotations

import logging
import threading
import uuid as _uuid
from collections import deque
from collections.abc import Sequence

from .connection import Endpoint
from .errors import InvalidMessage, LocalProtocolError, RequestFailed
from .protocol.codec import Message
from .protocol.message import MAX_BACKEND_FDS, VERSION, VRING_NOFD_MASK, BackendReq, VhostUserHeaderFlag
from .protocol.message import VhostUserProtocolFeatures as PF
from .protocol.payloads import (
    U64,
    Empty,
    IotlbMsg,
    IotlbType,
    Payload,
    SharedObject,
    ShmemMap,
    ShmemMapFlags,
    VringArea,
    VringState,
)
from .protocol.requests import BACKEND_REQUESTS, Reply

__all__ = ["BackendChannel"]

log = logging.getLogger(__name__)

#: posted requests the front-end may leave unacknowledged before posting fails
MAX_UNACKED = 1024


class BackendChannel:
    """Sends ``VHOST_USER_BACKEND_*`` requests to the front-end.

    ``protocol_features`` are the negotiated protocol features: they gate each
    request (a request whose feature is not negotiated raises
    :class:`LocalProtocolError`), decide whether fds may be sent
    (BACKEND_SEND_FD) and whether replies are awaited (REPLY_ACK: NEED_REPLY is
    set by default and the front-end's ack is waited for; a non-zero ack raises
    :class:`RequestFailed`).
    """

    def __init__(self, endpoint: Endpoint, protocol_features: int = 0, *, reply_timeout: float | None = 30.0) -> None:
        self.endpoint = endpoint
        self.protocol_features = PF(protocol_features)
        self.reply_timeout = reply_timeout
        self._lock = threading.Lock()
        #: requests sent with NEED_REPLY whose ack has not been read yet, oldest first
        self._unacked: deque[BackendReq] = deque()

    def close(self) -> None:
        """Close the channel."""
        self.endpoint.close()

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK is negotiated (requests wait for the front-end's ack)."""
        return bool(self.protocol_features & PF.REPLY_ACK)

    # ----------------------------------------------------------------- generic
    def request(self, request: BackendReq, payload: Payload | None = None, fds: Sequence[int] = (), *,
                need_reply: bool | None = None, post: bool = False) -> Message | None:
        """Send ``request``; return the reply (for requests that have one, or when
        an ack was awaited), else None.  ``fds`` stay owned by the caller; the
        fds of a returned reply are owned by the caller.  ``post=True`` (an
        ack-type request) does not wait for the ack: it is collected later."""
        spec = BACKEND_REQUESTS[request]
        payload = Empty() if payload is None else payload
        if spec.feature is not None and not self.protocol_features & spec.feature:
            raise LocalProtocolError(f"{request.name} needs protocol feature {spec.feature.name}", request=request)
        if fds and not self.protocol_features & PF.BACKEND_SEND_FD:
            raise LocalProtocolError(f"{request.name}: sending fds needs BACKEND_SEND_FD", request=request)
        if len(fds) > MAX_BACKEND_FDS:
            raise LocalProtocolError(f"{request.name}: at most {MAX_BACKEND_FDS} fds", request=request)
        always = spec.reply is Reply.ALWAYS
        wait = always or (self.reply_ack if need_reply is None else need_reply and self.reply_ack)
        flags = VERSION | (VhostUserHeaderFlag.NEED_REPLY if wait and not always else 0)
        msg = Message(request, payload, flags, tuple(fds))
        with self._lock:
            self._collect_acks()
            if post and wait and not always and len(self._unacked) >= MAX_UNACKED:
                raise RequestFailed(f"{request.name}: the front-end left {len(self._unacked)} "
                                    "requests unacknowledged", request=request, code=-1)
            self.endpoint.send(msg)
            if not wait:
                return None
            if post and not always:
                self._unacked.append(request)
                return None
            reply = self._await_reply(request)
        if reply.request != request:
            reply.close_fds()
            raise InvalidMessage(f"front-end answered {request.name} with {reply.request.name}", request=request)
        if not always and reply.payload.value:  # type: ignore[attr-defined]
            raise RequestFailed(f"front-end failed {request.name} (ack {reply.payload.value})",  # type: ignore[attr-defined]
                                request=request, code=reply.payload.value)  # type: ignore[attr-defined]
        return reply

    def _await_reply(self, request: BackendReq) -> Message:
        """The reply to ``request``, skipping (in order) the acks of posted and
        timed-out requests; on a timeout ``request`` joins those."""
        while True:
            try:
                reply = self.endpoint.recv(self.reply_timeout)
            except TimeoutError:
                self._unacked.append(request)  # its ack may still come: it will be skipped
                raise
            if not self._unacked:
                return reply
            self._check_late_ack(self._unacked.popleft(), reply)

    def _collect_acks(self) -> None:
        """Read the acks of posted requests that have arrived (without waiting)."""
        while self._unacked:
            try:
                reply = self.endpoint.recv(0)
            except TimeoutError:
                return
            self._check_late_ack(self._unacked.popleft(), reply)

    @staticmethod
    def _check_late_ack(expected: BackendReq, reply: Message) -> None:
        reply.close_fds()
        value = getattr(reply.payload, "value", 0)
        if reply.request != expected:
            log.warning("front-end answered %s with %s", expected.name, reply.request.name)
        elif value:
            log.warning("front-end failed %s (ack %d)", expected.name, value)

    # ---------------------------------------------------------------- requests
    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """IOTLB_MSG: report an IOTLB miss or access failure."""
        self.request(BackendReq.IOTLB_MSG, msg)

    def iotlb_miss(self, iova: int, perm: int) -> None:
        """IOTLB_MSG of type MISS for ``iova``."""
        self.iotlb_msg(IotlbMsg(iova=iova, perm=perm, type=IotlbType.MISS))

    def config_change(self) -> None:
        """CONFIG_CHANGE_MSG (CONFIG): the device config space changed."""
        self.request(BackendReq.CONFIG_CHANGE_MSG)

    def vring_host_notifier(self, index: int, fd: int | None, size: int = 0, offset: int = 0) -> None:
        """VRING_HOST_NOTIFIER_MSG (HOST_NOTIFIER): map ``fd`` as queue ``index``'s
        notify area, or (``fd=None``) remove the notifier."""
        u64 = index | (VRING_NOFD_MASK if fd is None else 0)
        self.request(BackendReq.VRING_HOST_NOTIFIER_MSG, VringArea(u64, size, offset), () if fd is None else (fd,))

    def vring_call(self, index: int) -> None:
        """VRING_CALL (INBAND_NOTIFICATIONS): in-band used-buffer notification."""
        self.request(BackendReq.VRING_CALL, VringState(index, 0), post=True)

    def vring_err(self, index: int) -> None:
        """VRING_ERR (INBAND_NOTIFICATIONS): in-band error notification."""
        self.request(BackendReq.VRING_ERR, VringState(index, 0), post=True)

    def shared_object_add(self, uuid: _uuid.UUID) -> None:
        """SHARED_OBJECT_ADD (SHARED_OBJECT): export ``uuid``."""
        self.request(BackendReq.SHARED_OBJECT_ADD, SharedObject(uuid))

    def shared_object_remove(self, uuid: _uuid.UUID) -> None:
        """SHARED_OBJECT_REMOVE (SHARED_OBJECT)."""
        self.request(BackendReq.SHARED_OBJECT_REMOVE, SharedObject(uuid))

    def shared_object_lookup(self, uuid: _uuid.UUID) -> int:
        """SHARED_OBJECT_LOOKUP (SHARED_OBJECT): the dma-buf fd for ``uuid`` (caller owns it)."""
        reply = self.request(BackendReq.SHARED_OBJECT_LOOKUP, SharedObject(uuid))
        assert reply is not None
        value = reply.payload.value if isinstance(reply.payload, U64) else 0
        if value or not reply.fds:
            reply.close_fds()
            raise RequestFailed(f"SHARED_OBJECT_LOOKUP {uuid} failed ({value})",
                                request=BackendReq.SHARED_OBJECT_LOOKUP, code=value)
        return reply.fds[0]

    def shmem_map(self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int,
                  writable: bool = False) -> None:
        """SHMEM_MAP (SHMEM): map ``length`` bytes of ``fd`` into shared memory region ``shmid``."""
        flags = ShmemMapFlags.WRITABLE if writable else 0
        self.request(BackendReq.SHMEM_MAP, ShmemMap(shmid, fd_offset, shm_offset, length, int(flags)), (fd,))

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """SHMEM_UNMAP (SHMEM)."""
        self.request(BackendReq.SHMEM_UNMAP, ShmemMap(shmid, 0, shm_offset, length, 0))

