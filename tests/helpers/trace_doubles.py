"""Test doubles for ``vhostuser trace --check``: a raw front-end that sends exactly
the messages a test scripts (broken ones included), and a scripted back-end that
answers the basics and misbehaves on request."""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from vhostuser.errors import RemoteProtocolError
from vhostuser.memory import GuestMemory
from vhostuser.memory import MemoryRegion as MappedRegion
from vhostuser.protocol import (
    EOF,
    NEED_DATA,
    U64,
    Decoder,
    FrontendReq,
    Message,
    SingleMemoryRegion,
    VhostUserHeaderFlag,
    VringAddr,
    VringState,
    encode,
)
from vhostuser.protocol.message import VERSION
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.sys_util import recv_with_fds, send_with_fds

FR = FrontendReq
REPLY = int(VhostUserHeaderFlag.REPLY) | VERSION
NEED_REPLY = int(VhostUserHeaderFlag.NEED_REPLY) | VERSION


def _read_message(sock: socket.socket, dec: Decoder, timeout: float = 5.0) -> Message | None:
    sock.settimeout(timeout)
    while True:
        msg = dec.next_message()
        if isinstance(msg, Message):
            return msg
        if msg is EOF:
            return None
        assert msg is NEED_DATA
        try:
            data, fds = recv_with_fds(sock, 4096, 32)
        except (TimeoutError, OSError):
            return None
        dec.receive_data(data, fds)


class RawFrontend:
    """Sends scripted messages (the codec's encode, or raw bytes) and reads replies."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.dec = Decoder(FrontendReq, replies=True)

    def send(self, request: FrontendReq, payload: object = None, *, fds: Sequence[int] = (),
             flags: int = VERSION) -> None:
        msg = Message(request, payload if payload is not None else Message(request).payload, flags, tuple(fds))
        send_with_fds(self.sock, [encode(msg)], fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        send_with_fds(self.sock, [data], fds)

    def call(self, request: FrontendReq, payload: object = None, **kw: object) -> Message | None:
        self.send(request, payload, **kw)  # type: ignore[arg-type]
        return self.reply()

    def reply(self) -> Message | None:
        msg = _read_message(self.sock, self.dec)
        if msg is not None:
            msg.close_fds()
        return msg

    def close(self) -> None:
        self.sock.close()
        self.dec.close()

    def __enter__(self) -> RawFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Misbehaviour:
    """What the scripted back-end gets wrong."""

    #: never answer these requests
    no_reply: set[FrontendReq] = field(default_factory=set)
    #: after these requests, send a reply nobody asked for
    extra_reply: set[FrontendReq] = field(default_factory=set)
    #: after answering GET_VRING_BASE, move the ring's used index on
    use_ring_after_stop: bool = False


class ScriptedBackend:
    """A one-connection-at-a-time back-end: features, protocol features, queue num,
    REPLY_ACK, GET_VRING_BASE; maps the memory it is given (for ring misbehaviour)."""

    def __init__(self, path: str, *, features: int = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES),
                 protocol: int = int(PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS),
                 misbehave: Misbehaviour | None = None) -> None:
        self.features = features
        self.protocol = protocol
        self.misbehave = misbehave or Misbehaviour()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.received: list[str] = []
        self._acked_protocol = 0
        self._stopped: int | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            mem: GuestMemory | None = None
            addrs: dict[int, VringAddr] = {}
            dec = Decoder(FrontendReq)
            try:
                while True:
                    try:
                        msg = _read_message(conn, dec, timeout=30)
                    except RemoteProtocolError:  # skipped, the stream stays usable (like a real back-end)
                        self.received.append("<invalid>")
                        continue
                    if msg is None:
                        break
                    self.received.append(msg.request.name)
                    mem = self._handle(conn, msg, mem, addrs)
            finally:
                if mem is not None:
                    mem.close()
                conn.close()
                dec.close()

    def _reply(self, conn: socket.socket, request: FrontendReq, payload: object) -> None:
        send_with_fds(conn, [encode(Message(request, payload, REPLY))])  # type: ignore[arg-type]

    def _handle(self, conn: socket.socket, msg: Message, mem: GuestMemory | None,
                addrs: dict[int, VringAddr]) -> GuestMemory | None:
        req, p = msg.request, msg.payload
        assert isinstance(req, FrontendReq)
        self._use_stopped_ring(mem, addrs)  # late, as a back-end still running the ring would
        answer: object = None
        if req is FR.GET_FEATURES:
            answer = U64(self.features)
        elif req is FR.GET_PROTOCOL_FEATURES:
            answer = U64(self.protocol)
        elif req is FR.SET_PROTOCOL_FEATURES and isinstance(p, U64):
            self._acked_protocol = p.value
        elif req is FR.GET_QUEUE_NUM:
            answer = U64(1)
        elif req is FR.GET_MAX_MEM_SLOTS:
            answer = U64(8)
        elif req is FR.ADD_MEM_REG and isinstance(p, SingleMemoryRegion):
            region = MappedRegion.from_description(p.region, os.dup(msg.fds[0]))
            new = mem.with_region(region) if mem is not None else GuestMemory([region])
            if mem is not None:
                mem.close()
            mem = new
        elif req is FR.SET_VRING_ADDR and isinstance(p, VringAddr):
            addrs[p.index] = p
        elif req is FR.GET_VRING_BASE and isinstance(p, VringState):
            answer = VringState(p.index, 0)
        msg.close_fds()
        if answer is None and msg.need_reply and self._acked_protocol & PF.REPLY_ACK:
            answer = U64(0)
        if answer is not None and req not in self.misbehave.no_reply:
            self._reply(conn, req, answer)
        if req in self.misbehave.extra_reply:
            self._reply(conn, req, U64(0))
        if req is FR.GET_VRING_BASE and self.misbehave.use_ring_after_stop:
            assert isinstance(p, VringState)
            self._stopped = p.index
        return mem

    def _use_stopped_ring(self, mem: GuestMemory | None, addrs: dict[int, VringAddr]) -> None:
        """Complete a buffer on a ring after having answered GET_VRING_BASE for it."""
        if self._stopped is None or mem is None:
            return
        gpa = mem.uva_to_gpa(addrs[self._stopped].used + 2, 2)
        mem.write_u16(gpa, mem.read_u16(gpa) + 1)
        self._stopped = None

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)

    def __enter__(self) -> ScriptedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
