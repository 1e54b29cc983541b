"""Front-end client <-> back-end handler over a real socketpair (back-end in a thread):
the QEMU 7.2 start-up and shutdown, REPLY_ACK on and off, and every rejection."""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import uuid

import pytest

from vhostuser.backend_channel import BackendChannel
from vhostuser.sys_util.shm import create_shm_fd
from vhostuser.connection import Endpoint, ack_bytes
from vhostuser.errors import (
    DeviceError,
    Disconnected,
    LocalProtocolError,
    MessageFramingError,
    RequestFailed,
    RequestNotAllowed,
)
from vhostuser.frontend import Frontend, FrontendReqHandler
from vhostuser.handler import BackendConnection, BackendReqHandler
from vhostuser.protocol import payloads as p
from vhostuser.protocol.codec import Header, Message
from vhostuser.protocol.message import FrontendReq, VhostUserHeaderFlag
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF

NEED_REPLY = 0x1 | VhostUserHeaderFlag.NEED_REPLY
FEATURES = VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_EVENT_IDX | 0x46
PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.BACKEND_SEND_FD


class RecordingHandler(BackendReqHandler):
    """A blk-like back-end that records every call and keeps (then closes) its fds."""

    def __init__(self, features: int = FEATURES, protocol: int = PROTOCOL) -> None:
        self.features, self.protocol = features, protocol
        self.calls: list[tuple] = []
        self.fds: list[int] = []
        self.channel: BackendChannel | None = None
        self.fail: set[str] = set()

    def _rec(self, *call: object) -> None:
        if call[0] in self.fail:
            raise DeviceError(f"{call[0]} failed on purpose")
        self.calls.append(call)

    def _keep(self, fd: int | None) -> bool:
        if fd is not None:
            self.fds.append(fd)
        return fd is not None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self.channel:
            self.channel.close()

    def get_features(self) -> int:
        self._rec("get_features")
        return self.features

    def set_features(self, features: int) -> None:
        self._rec("set_features", features)

    def get_protocol_features(self) -> int:
        self._rec("get_protocol_features")
        return self.protocol

    def set_protocol_features(self, features: int) -> None:
        self._rec("set_protocol_features", features)

    def set_owner(self) -> None:
        self._rec("set_owner")

    def get_queue_num(self) -> int:
        self._rec("get_queue_num")
        return 1

    def get_max_mem_slots(self) -> int:
        self._rec("get_max_mem_slots")
        return 32

    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        self._rec("set_backend_req_fd")
        self.channel = channel

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        self._rec("get_config", offset, size)
        return bytes(range(offset, offset + size))

    def set_mem_table(self, regions, fds) -> None:
        self.fds += fds
        self._rec("set_mem_table", len(regions), len(fds))

    def add_mem_reg(self, region, fd) -> None:
        self._keep(fd)
        self._rec("add_mem_reg", region.guest_phys_addr)

    def set_vring_num(self, index: int, num: int) -> None:
        self._rec("set_vring_num", index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._rec("set_vring_base", index, base)

    def set_vring_addr(self, addr) -> None:
        self._rec("set_vring_addr", addr.index)

    def get_vring_base(self, index: int) -> int:
        self._rec("get_vring_base", index)
        return 42

    def set_vring_kick(self, index, fd) -> None:
        self._rec("set_vring_kick", index, self._keep(fd))

    def set_vring_call(self, index, fd) -> None:
        self._rec("set_vring_call", index, self._keep(fd))

    def set_vring_err(self, index, fd) -> None:
        self._rec("set_vring_err", index, self._keep(fd))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._rec("set_vring_enable", index, enable)


class Pair:
    """A front-end and a back-end served in a thread."""

    def __init__(self, handler: RecordingHandler) -> None:
        a, b = socket.socketpair()
        self.handler = handler
        self.conn = BackendConnection(Endpoint(b, FrontendReq, replies=False), handler)
        self.frontend = Frontend(Endpoint(a, FrontendReq, replies=True), reply_timeout=5)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.conn.serve_forever()
        except BaseException as exc:  # noqa: BLE001 - inspected by the tests
            self.error = exc

    def close(self) -> None:
        self.frontend.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.handler.close()

    def dropped(self) -> bool:
        """The back-end dropped the connection."""
        self.thread.join(5)
        with pytest.raises(Disconnected):
            self.frontend.endpoint.recv(timeout=5)
        return not self.thread.is_alive()

    def raw(self, request: int, flags: int, body: bytes, fds=(), size: int | None = None) -> Message | None:
        """Send hand-made bytes; return the reply if NEED_REPLY was set."""
        self.frontend.endpoint.send_bytes(Header(request, flags, len(body) if size is None else size).pack() + body, fds)
        if flags & VhostUserHeaderFlag.NEED_REPLY:
            return self.frontend.endpoint.recv(timeout=5)
        return None


@pytest.fixture
def pair(no_fd_leak):
    pairs: list[Pair] = []

    def make(handler: RecordingHandler | None = None) -> Pair:
        pairs.append(Pair(handler or RecordingHandler()))
        return pairs[-1]

    yield make
    for pr in pairs:
        pr.close()


def eventfd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def negotiate(fe: Frontend, protocol: int = PROTOCOL) -> None:
    fe.get_features()
    offered = fe.get_protocol_features()
    fe.set_protocol_features(offered & protocol)


@pytest.mark.parametrize("reply_ack", [True, False])
def test_qemu_72_startup_and_shutdown(pair, reply_ack: bool) -> None:
    pr = pair()
    fe = pr.frontend
    memfd = create_shm_fd(2 << 20, "guest")
    fds = [eventfd() for _ in range(3)]
    try:
        assert fe.get_features() == FEATURES
        offered = fe.get_protocol_features()
        assert offered == PROTOCOL
        fe.set_protocol_features(offered if reply_ack else offered & ~PF.REPLY_ACK)
        assert fe.reply_ack is reply_ack
        assert fe.get_queue_num() == 1
        ours, theirs = socket.socketpair()
        fe.set_backend_req_fd(theirs.fileno())
        theirs.close()
        fe.set_owner()
        assert fe.get_config(0, 57) == bytes(range(57))
        fe.set_features(VF.VERSION_1 | VF.PROTOCOL_FEATURES)
        fe.set_mem_table([p.MemoryRegion(0, 1 << 20, 0x7F0000000000, 0),
                          p.MemoryRegion(1 << 20, 1 << 20, 0x7F0000100000, 1 << 20)], [memfd, memfd])
        fe.set_vring_num(0, 128)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(p.VringAddr(0, 0, 0x7F0000000000, 0x7F0000001000, 0x7F0000000800, 0))
        fe.set_vring_kick(0, fds[0])
        fe.set_vring_call(0, fds[1])
        fe.set_vring_err(0, None)
        fe.set_vring_enable(0, True)
        fe.set_vring_enable(0, False)
        assert fe.get_vring_base(0) == 42
    finally:
        os.close(memfd)
        for fd in fds:
            os.close(fd)
    pr.close()
    ours.close()
    assert [c[0] for c in pr.handler.calls] == [
        "get_features", "get_protocol_features", "set_protocol_features", "get_queue_num", "set_backend_req_fd",
        "set_owner", "get_config", "set_features", "set_mem_table", "set_vring_num", "set_vring_base",
        "set_vring_addr", "set_vring_kick", "set_vring_call", "set_vring_err", "set_vring_enable",
        "set_vring_enable", "get_vring_base"]
    assert ("set_mem_table", 2, 2) in pr.handler.calls
    assert ("set_vring_err", 0, False) in pr.handler.calls
    assert pr.error is None


def test_add_mem_reg_with_reply_ack(pair) -> None:
    pr = pair()
    negotiate(pr.frontend)
    pr.frontend.set_owner()
    assert pr.frontend.get_max_mem_slots() == 32
    fd = create_shm_fd(4096, "guest")
    try:
        pr.frontend.add_mem_reg(p.MemoryRegion(0, 4096, 0x1000, 0), fd)
    finally:
        os.close(fd)
    with pytest.raises(RequestFailed):  # REM_MEM_REG: not implemented by the handler -> nack
        pr.frontend.rem_mem_reg(p.MemoryRegion(0, 4096, 0x1000, 0))
    assert ("add_mem_reg", 0) in pr.handler.calls


# ------------------------------------------------------------------ rejections
def test_request_before_set_owner(pair, caplog) -> None:
    pr = pair()
    negotiate(pr.frontend)
    with caplog.at_level(logging.WARNING, logger="vhostuser.handler"):
        with pytest.raises(RequestFailed) as info:
            pr.frontend.set_vring_num(0, 128)
    assert info.value.request is FrontendReq.SET_VRING_NUM
    assert "SET_VRING_NUM" in caplog.text and "SET_OWNER" in caplog.text
    pr.frontend.set_owner()
    pr.frontend.set_vring_num(0, 128)  # usable
    assert [c for c in pr.handler.calls if c[0] == "set_vring_num"] == [("set_vring_num", 0, 128)]


def test_rejection_without_reply_ack_is_silent_and_connection_stays(pair) -> None:
    pr = pair()
    negotiate(pr.frontend, PROTOCOL & ~PF.REPLY_ACK)
    pr.frontend.set_vring_num(0, 128)  # before SET_OWNER: rejected, no reply due
    assert pr.frontend.get_queue_num() == 1
    assert not any(c[0] == "set_vring_num" for c in pr.handler.calls)


def test_feature_not_negotiated(pair) -> None:
    pr = pair()
    negotiate(pr.frontend, PF.REPLY_ACK)  # MQ offered but not negotiated
    pr.frontend.set_owner()
    with pytest.raises(LocalProtocolError):
        pr.frontend.get_queue_num()  # the client refuses locally
    with pytest.raises(RequestFailed):  # an ACK-type request: nack, connection stays
        pr.frontend.request(FrontendReq.SET_STATUS, p.U64(1), check=False)
    assert pr.frontend.get_features() == FEATURES
    # a reply-always request whose reply cannot say "no": the back-end drops the connection
    pr.frontend.endpoint.send(Message(FrontendReq.GET_QUEUE_NUM))
    assert pr.dropped()
    assert isinstance(pr.error, RequestNotAllowed)


def test_protocol_features_need_bit_30(pair) -> None:
    pr = pair(RecordingHandler(features=VF.VERSION_1))
    assert pr.frontend.get_features() == VF.VERSION_1
    with pytest.raises(LocalProtocolError):
        pr.frontend.get_protocol_features()
    pr.frontend.endpoint.send(Message(FrontendReq.GET_PROTOCOL_FEATURES))
    assert pr.dropped()


def test_set_protocol_features_not_offered(pair) -> None:
    pr = pair()
    pr.frontend.get_features()
    pr.frontend.get_protocol_features()
    with pytest.raises(RequestFailed):
        pr.frontend.set_protocol_features(PF.REPLY_ACK | PF.STATUS)


def test_inband_without_backend_req_drops(pair) -> None:
    pr = pair(RecordingHandler(protocol=PF.INBAND_NOTIFICATIONS))
    pr.frontend.get_features()
    pr.frontend.get_protocol_features()
    pr.frontend.endpoint.send(Message(FrontendReq.SET_PROTOCOL_FEATURES, p.U64(PF.INBAND_NOTIFICATIONS)))
    assert pr.dropped()


def test_handler_error_fails_only_that_request(pair, caplog) -> None:
    pr = pair()
    pr.handler.fail = {"set_vring_num", "get_config"}
    negotiate(pr.frontend)
    pr.frontend.set_owner()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(RequestFailed):
            pr.frontend.set_vring_num(0, 128)
        with pytest.raises(RequestFailed):  # an empty GET_CONFIG reply
            pr.frontend.get_config(0, 8)
    assert "SET_VRING_NUM" in caplog.text and "DeviceError" in caplog.text
    pr.frontend.set_vring_base(0, 0)


@pytest.mark.parametrize("request_code, body, nfds, what", [
    (99, b"", 0, "unknown request"),
    (2, bytes(4), 0, "payload size"),
    (12, struct.pack("=Q", 0), 0, "fd count"),
    (12, struct.pack("=Q", 0x100), 1, "fd count"),
    (5, struct.pack("=II", 9, 0) + bytes(9 * 32), 9, "region count"),
    (25, struct.pack("=III", 0, 57, 0) + bytes(3), 0, "config size"),
])
def test_malformed_request_nacked_and_connection_stays(pair, request_code, body, nfds, what) -> None:
    pr = pair()
    negotiate(pr.frontend)
    pr.frontend.set_owner()
    fds = [eventfd() for _ in range(nfds)]
    try:
        if request_code == 99:  # our own client cannot decode a reply to an unknown request: read raw bytes
            pr.raw(request_code, 0x1, body, fds)  # no NEED_REPLY: no answer
            pr.frontend.endpoint.send_bytes(Header(99, NEED_REPLY, 0).pack())
            pr.frontend.endpoint.socket.settimeout(5)
            assert pr.frontend.endpoint.socket.recv(100) == ack_bytes(99, 1)
            pr.frontend.endpoint.socket.settimeout(None)
        else:
            reply = pr.raw(request_code, NEED_REPLY, body, fds)
            assert reply is not None and reply.request == request_code and reply.payload == p.U64(1), what
    finally:
        for fd in fds:
            os.close(fd)
    assert pr.frontend.get_features() == FEATURES  # still usable


def test_get_config_size_mismatch_gets_empty_reply(pair) -> None:
    pr = pair()
    negotiate(pr.frontend)
    reply = pr.raw(24, 0x1, struct.pack("=III", 0, 57, 0) + bytes(3))
    assert reply is None
    got = pr.frontend.endpoint.recv(timeout=5)
    assert got.request is FrontendReq.GET_CONFIG and got.payload == p.Empty()
    assert pr.frontend.get_features() == FEATURES


@pytest.mark.parametrize("flags, size", [(0x2, 0), (0x1 | 0x40, 0), (0x1, 0x1001)])
def test_framing_errors_drop_the_connection(pair, flags, size) -> None:
    pr = pair()
    pr.raw(1, flags, b"", size=size)
    assert pr.dropped()
    assert isinstance(pr.error, MessageFramingError)


def test_backend_channel(pair) -> None:
    protocol = PROTOCOL | PF.SHARED_OBJECT | PF.SHMEM | PF.HOST_NOTIFIER
    pr = pair(RecordingHandler(protocol=protocol))
    negotiate(pr.frontend, protocol)

    class FrontHandler(FrontendReqHandler):
        def __init__(self) -> None:
            self.seen: list[tuple] = []
            self.done = threading.Event()

        def config_change_msg(self) -> None:
            self.seen.append(("config_change",))

        def shared_object_add(self, u) -> None:
            self.seen.append(("add", u))

        def shared_object_lookup(self, u) -> int:
            return create_shm_fd(4096, "dmabuf")

        def shmem_map(self, mapping, fd) -> None:
            self.seen.append(("map", mapping.shmid, mapping.len, os.fstat(fd).st_size))
            os.close(fd)

    fh = FrontHandler()
    server = pr.frontend.open_backend_channel(fh)
    thread = server.start()
    pr.frontend.set_owner()  # the channel is set up once this returns (REPLY_ACK)
    channel = pr.handler.channel
    assert channel is not None and channel.reply_ack
    u = uuid.uuid4()
    channel.config_change()
    channel.shared_object_add(u)
    fd = channel.shared_object_lookup(u)
    os.close(fd)
    mem = create_shm_fd(8192, "shm")
    try:
        channel.shmem_map(1, mem, 0, 0, 4096, writable=True)
    finally:
        os.close(mem)
    with pytest.raises(RequestFailed):  # not implemented by the front-end handler
        channel.shared_object_remove(u)
    with pytest.raises(LocalProtocolError):  # INBAND_NOTIFICATIONS not negotiated
        channel.vring_call(0)
    assert fh.seen == [("config_change",), ("add", u), ("map", 1, 4096, 8192)]
    channel.close()
    thread.join(5)
    assert not thread.is_alive()
    pr.handler.channel = None
