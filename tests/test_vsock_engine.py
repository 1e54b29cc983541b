"""The vsock engine with real AF_UNIX host sockets and a simulated guest driver.

``FakeGuest`` plays the Linux virtio-vsock driver: it sends packets with its
credit (buf_alloc/fwd_cnt), never exceeds the engine's credit, answers
CREDIT_REQUEST, and checks that the engine never exceeds *its* credit.  Host
peers are real sockets served by threads with timeouts.  Every loop is bounded
by a deadline; nothing sleeps to synchronise.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from vhostuser.devices.vsock.engine import (
    FIRST_LOCAL_PORT,
    SEQPACKET_SUFFIX,
    PollerWatcher,
    SiblingRegistry,
    VsockEngine,
    VsockEngineConfig,
)
from vhostuser.devices.vsock.packet import (
    HDR_SIZE,
    HOST_CID,
    SEQ_EOM,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Op,
    SockType,
    VsockHeader,
)
from vhostuser.sys_util.poll import Poller

TIMEOUT = 20.0
U32 = 0xFFFF_FFFF


# ----------------------------------------------------------------- the fake guest
@dataclass
class GConn:
    """The guest's half of one connection."""

    gport: int
    hport: int
    peer_cid: int = HOST_CID
    type: int = SockType.STREAM
    state: str = "connecting"          # connecting / established / closed
    buf_alloc: int = 256 * 1024
    fwd_cnt: int = 0                   # bytes the guest app consumed
    rx_cnt: int = 0                    # RW bytes received
    data: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    partial: bytearray = field(default_factory=bytearray)
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    to_send: bytearray = field(default_factory=bytearray)
    shutdown_rcvd: int = 0
    rst: bool = False
    credit_requests: int = 0
    max_in_flight: int = 0

    def credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32)


class FakeGuest:
    def __init__(self, engine: VsockEngine, *, rx_buf: int = 4096, auto_consume: bool = True,
                 listen: set[int] | None = None) -> None:
        self.engine = engine
        self.cid = engine.guest_cid
        self.rx_payload = rx_buf - HDR_SIZE
        self.auto_consume = auto_consume
        self.listen = listen or set()
        self.conns: dict[tuple[int, int, int], GConn] = {}
        self.rsts: list[VsockHeader] = []
        self.log: list[VsockHeader] = []
        self._next_port = 50000

    # -- sending
    def _hdr(self, c: GConn, op: int, length: int = 0, flags: int = 0) -> VsockHeader:
        return VsockHeader(self.cid, c.peer_cid, c.gport, c.hport, length, c.type, op, flags, c.buf_alloc, c.fwd_cnt)

    def send(self, c: GConn, op: int, payload: bytes = b"", flags: int = 0) -> None:
        if op == Op.RW:
            assert len(payload) <= c.credit(), "the fake guest must respect credit"
            c.tx_cnt = (c.tx_cnt + len(payload)) & U32
        self.engine.handle_tx_packet(self._hdr(c, op, len(payload), flags), payload)

    def connect(self, hport: int, *, type: int = SockType.STREAM, peer_cid: int = HOST_CID,  # noqa: A002
                buf_alloc: int = 256 * 1024) -> GConn:
        self._next_port += 1
        c = GConn(self._next_port, hport, peer_cid=peer_cid, type=type, buf_alloc=buf_alloc)
        self.conns[(peer_cid, c.gport, hport)] = c
        self.send(c, Op.REQUEST)
        return c

    def write(self, c: GConn, data: bytes) -> None:
        c.to_send += data

    def consume(self, c: GConn, n: int | None = None) -> bytes:
        n = len(c.data) if n is None else n
        out = bytes(c.data[:n])
        del c.data[:n]
        c.fwd_cnt = (c.fwd_cnt + len(out)) & U32
        if out and c.state == "established":
            self.send(c, Op.CREDIT_UPDATE)
        return out

    # -- the loop
    def pump(self) -> bool:
        """Handle every packet the engine has, send what credit allows; True if anything moved."""
        moved = False
        while True:
            pkt = self.engine.next_rx_packet(self.rx_payload)
            if pkt is None:
                break
            moved = True
            self._receive(*pkt)
        for c in list(self.conns.values()):
            if c.state == "established" and c.to_send:
                n = min(len(c.to_send), c.credit(), 64 * 1024)
                if n > 0:
                    chunk = bytes(c.to_send[:n])
                    del c.to_send[:n]
                    flags = SEQ_EOM if c.type == SockType.SEQPACKET else 0
                    self.send(c, Op.RW, chunk, flags)
                    moved = True
        return moved

    def _receive(self, hdr: VsockHeader, payload: bytes) -> None:
        self.log.append(hdr)
        assert hdr.dst_cid == self.cid
        assert len(payload) == hdr.len <= self.rx_payload
        key = (hdr.src_cid, hdr.dst_port, hdr.src_port)
        c = self.conns.get(key)
        if hdr.op == Op.RST:
            self.rsts.append(hdr)
            if c is not None:
                c.rst = True
                c.state = "closed"
            return
        if c is None:
            if hdr.op == Op.REQUEST and hdr.dst_port in self.listen:
                c = GConn(hdr.dst_port, hdr.src_port, peer_cid=hdr.src_cid, type=hdr.type, state="established")
                c.peer_buf_alloc, c.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
                self.conns[key] = c
                self.send(c, Op.RESPONSE)
            elif hdr.op != Op.RST:
                self.engine.handle_tx_packet(VsockHeader(self.cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0,
                                                         hdr.type, Op.RST), b"")
            return
        c.peer_buf_alloc, c.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == Op.RESPONSE:
            assert c.state == "connecting"
            c.state = "established"
        elif hdr.op == Op.RW:
            assert c.state == "established"
            c.rx_cnt = (c.rx_cnt + len(payload)) & U32
            in_flight = (c.rx_cnt - c.fwd_cnt) & U32
            c.max_in_flight = max(c.max_in_flight, in_flight)
            assert in_flight <= c.buf_alloc, f"engine exceeded the guest's credit: {in_flight} > {c.buf_alloc}"
            if c.type == SockType.SEQPACKET:
                c.partial += payload
                if hdr.flags & SEQ_EOM:
                    c.messages.append(bytes(c.partial))
                    c.partial.clear()
                    c.fwd_cnt = (c.fwd_cnt + len(c.messages[-1])) & U32
            else:
                c.data += payload
                if self.auto_consume:
                    self.consume(c)
        elif hdr.op == Op.CREDIT_REQUEST:
            c.credit_requests += 1
            self.send(c, Op.CREDIT_UPDATE)
        elif hdr.op == Op.SHUTDOWN:
            c.shutdown_rcvd |= hdr.flags
        elif hdr.op == Op.REQUEST:
            raise AssertionError("REQUEST for an existing connection")


# ----------------------------------------------------------------- fixtures
class Rig:
    """Engines + their watcher + fake guests, driven by :meth:`run_until`."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.poller = Poller()
        self.watcher = PollerWatcher(self.poller)
        self.registry = SiblingRegistry()
        self.engines: list[VsockEngine] = []
        self.guests: list[FakeGuest] = []

    def add(self, cid: int = 3, *, groups: set[str] | None = None, tx_buffer_size: int = 64 * 1024,
            rx_buffer_size: int = 64 * 1024, seqpacket: bool = False, **guest_kw: object) -> FakeGuest:
        cfg = VsockEngineConfig(guest_cid=cid, uds_path=os.path.join(self.tmp, f"vm{cid}.vsock"),
                                tx_buffer_size=tx_buffer_size, rx_buffer_size=rx_buffer_size,
                                groups=frozenset(groups or {"default"}), seqpacket=seqpacket)
        engine = VsockEngine(cfg, watcher=self.watcher, registry=self.registry)
        engine.start()
        self.engines.append(engine)
        guest = FakeGuest(engine, **guest_kw)  # type: ignore[arg-type]
        self.guests.append(guest)
        return guest

    def step(self) -> None:
        moved = any([g.pump() for g in self.guests])
        busy = moved or any(e.has_rx_work() for e in self.engines)
        self.watcher.poll(self.engines, 0 if busy else 0.02)

    def run_until(self, cond: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.step()

    def close(self) -> None:
        for e in self.engines:
            e.close()
        assert not self.watcher._events, "engine left fds registered"  # noqa: SLF001
        self.poller.close()


@pytest.fixture
def rig(tmp_path, no_fd_leak):  # noqa: ANN001, ANN201
    r = Rig(str(tmp_path))
    try:
        yield r
    finally:
        r.close()


class HostListener:
    """A host application listening on ``<uds>_<port>``; accepted sockets are handed
    to ``serve(sock)`` in a thread each."""

    def __init__(self, path: str, serve: Callable[[socket.socket], None], kind: int = socket.SOCK_STREAM) -> None:
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(path)
        self.sock.listen(128)
        self.sock.settimeout(TIMEOUT)
        self.serve = serve
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(TIMEOUT)
        for t in self.threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in self.threads)
        if self.errors:
            raise self.errors[0]


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def host_connect(path: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(TIMEOUT)
    s.connect(path)
    s.sendall(f"CONNECT {port}\n".encode())
    return s


# ----------------------------------------------------------------- guest -> host
def test_guest_connect_echo_and_clean_close(rig: Rig) -> None:
    g = rig.add()
    uds = g.engine.config.uds_path

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    listener = HostListener(f"{uds}_1234", echo)
    try:
        c = g.connect(1234)
        rig.run_until(lambda: c.state == "established", what="RESPONSE")
        assert c.peer_buf_alloc == 64 * 1024
        g.write(c, b"hello vsock")
        rig.run_until(lambda: c.fwd_cnt == len(b"hello vsock"), what="echo")  # auto-consumed
    except BaseException:
        listener.close()
        raise
    # clean close from the guest: SHUTDOWN both -> the engine closes the host socket and answers RST
    g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)
    rig.run_until(lambda: c.rst, what="RST after SHUTDOWN")
    assert not g.engine.connections
    listener.close()


def test_connection_refused_is_rst(rig: Rig) -> None:
    g = rig.add()
    c = g.connect(4242)
    rig.run_until(lambda: c.rst, what="RST")
    assert c.state == "closed" and not g.engine.connections


def test_unknown_connection_gets_rst_but_rst_gets_nothing(rig: Rig) -> None:
    g = rig.add()
    ghost = GConn(7, 8, state="established")
    g.conns[(HOST_CID, 7, 8)] = ghost
    g.send(ghost, Op.CREDIT_UPDATE)
    rig.run_until(lambda: ghost.rst, what="RST for an unknown connection")
    n = len(g.log)
    g.engine.handle_tx_packet(VsockHeader(3, HOST_CID, 7, 8, 0, 1, Op.RST), b"")
    for _ in range(5):
        rig.step()
    assert len(g.log) == n


def test_foreign_source_cid_is_dropped(rig: Rig) -> None:
    g = rig.add()
    g.engine.handle_tx_packet(VsockHeader(99, HOST_CID, 1, 2, 0, 1, Op.REQUEST, 0, 4096, 0), b"")
    assert not g.engine.has_rx_work()


def test_bulk_both_ways_with_checksums(rig: Rig) -> None:
    g = rig.add()
    uds = g.engine.config.uds_path
    size_up, size_down = 3 << 20, 4 << 20
    up = os.urandom(size_up)
    down = os.urandom(size_down)
    got: dict[str, str] = {}

    def serve(conn: socket.socket) -> None:
        def reader() -> None:
            got["up"] = hashlib.sha256(recv_all(conn)).hexdigest()
        t = threading.Thread(target=reader)
        t.start()
        conn.sendall(down)
        conn.shutdown(socket.SHUT_WR)
        t.join(TIMEOUT)

    listener = HostListener(f"{uds}_5000", serve)
    try:
        c = g.connect(5000)
        received = bytearray()
        g.auto_consume = False
        rig.run_until(lambda: c.state == "established", what="RESPONSE")
        g.write(c, up)

        def done() -> bool:
            received.extend(g.consume(c))
            if not c.to_send and not c.shutdown_rcvd & SHUTDOWN_SEND:
                pass
            return len(received) == size_down and c.shutdown_rcvd & SHUTDOWN_SEND and not c.to_send

        rig.run_until(done, what="bulk transfer")
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_SEND)  # host reads EOF
        rig.run_until(lambda: "up" in got, what="host EOF")
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(down).hexdigest()
        assert got["up"] == hashlib.sha256(up).hexdigest()
        # the host closed: full close -> RCV|SEND; the guest finishes with its own SHUTDOWN -> RST
        rig.run_until(lambda: c.shutdown_rcvd == SHUTDOWN_BOTH, what="SHUTDOWN both")
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)
        rig.run_until(lambda: c.rst, what="final RST")
    finally:
        listener.close()
    assert not g.engine.connections


def test_engine_respects_guest_credit_and_resumes(rig: Rig) -> None:
    g = rig.add(auto_consume=False)
    uds = g.engine.config.uds_path
    payload = os.urandom(200_000)
    sent = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(payload)
        sent.set()
        conn.recv(1)  # wait for the guest's close

    listener = HostListener(f"{uds}_6000", serve)
    try:
        c = g.connect(6000, buf_alloc=16 * 1024)
        rig.run_until(lambda: c.rx_cnt == 16 * 1024 and c.credit_requests >= 1, what="credit exhausted")
        # nothing more arrives while the guest holds all its buffer
        for _ in range(20):
            rig.step()
        assert c.rx_cnt == 16 * 1024 and len(c.data) == 16 * 1024
        assert c.max_in_flight <= 16 * 1024
        out = bytearray()
        out += g.consume(c)  # sends CREDIT_UPDATE

        def all_in() -> bool:
            out.extend(g.consume(c))
            return len(out) == len(payload)

        rig.run_until(all_in, what="the rest after CREDIT_UPDATE")
        assert bytes(out) == payload
        assert c.max_in_flight <= 16 * 1024
        assert sent.is_set()
        g.send(c, Op.RST)
    finally:
        listener.close()
    rig.run_until(lambda: not g.engine.connections, what="connection gone")


def test_guest_violating_credit_is_reset(rig: Rig) -> None:
    g = rig.add(tx_buffer_size=4096)
    uds = g.engine.config.uds_path
    listener = HostListener(f"{uds}_6100", lambda conn: conn.recv(1))
    try:
        c = g.connect(6100)
        rig.run_until(lambda: c.state == "established")
        c.peer_buf_alloc = 1 << 30  # lie to ourselves: ignore the engine's 4 KiB credit
        g.send(c, Op.RW, b"x" * 8192)
        rig.run_until(lambda: c.rst, what="RST for the credit violation")
    finally:
        listener.close()


def test_engine_sends_credit_update_when_guest_would_stall(rig: Rig) -> None:
    g = rig.add(tx_buffer_size=32 * 1024)
    uds = g.engine.config.uds_path
    total = 1 << 20
    got = {}

    def serve(conn: socket.socket) -> None:
        got["data"] = recv_all(conn)

    listener = HostListener(f"{uds}_6200", serve)
    try:
        c = g.connect(6200)
        rig.run_until(lambda: c.state == "established")
        data = os.urandom(total)
        g.write(c, data)
        # the fake guest only sends within credit and never asks for more: the engine's
        # own CREDIT_UPDATEs (or piggy-backed fwd_cnt) must keep it going
        rig.run_until(lambda: not c.to_send, what="all data sent within credit")
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_SEND)
        rig.run_until(lambda: "data" in got, what="host EOF")
        assert got["data"] == data
        assert any(h.op == Op.CREDIT_UPDATE for h in g.log)
    finally:
        listener.close()


def test_credit_request_is_answered(rig: Rig) -> None:
    g = rig.add()
    listener = HostListener(f"{g.engine.config.uds_path}_6300", lambda conn: conn.recv(1))
    try:
        c = g.connect(6300)
        rig.run_until(lambda: c.state == "established")
        n = len(g.log)
        g.send(c, Op.CREDIT_REQUEST)
        rig.run_until(lambda: any(h.op == Op.CREDIT_UPDATE for h in g.log[n:]), what="CREDIT_UPDATE")
        g.send(c, Op.RST)
    finally:
        listener.close()


# ----------------------------------------------------------------- shutdown / RST corners
def test_guest_half_close_then_host_close(rig: Rig) -> None:
    """The case that panicked vhost-device-vsock 0.1.0: the guest half-closes, then
    the host closes its unix socket."""
    g = rig.add(auto_consume=False)
    release = threading.Event()
    seen = {}

    def serve(conn: socket.socket) -> None:
        seen["data"] = recv_all(conn)  # returns at the guest's SHUT_WR
        conn.sendall(b"reply after half-close")
        release.wait(TIMEOUT)

    listener = HostListener(f"{g.engine.config.uds_path}_7000", serve)
    try:
        c = g.connect(7000)
        rig.run_until(lambda: c.state == "established")
        g.write(c, b"request")
        rig.run_until(lambda: not c.to_send)
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_SEND)
        got = bytearray()

        def reply() -> bool:
            got.extend(g.consume(c))
            return bytes(got) == b"reply after half-close"
        rig.run_until(reply, what="reply after the guest's half-close")
        assert seen["data"] == b"request"
        release.set()  # the host closes its socket now
        rig.run_until(lambda: c.shutdown_rcvd == SHUTDOWN_BOTH, what="SHUTDOWN after the host closed")
        # Linux answers a full SHUTDOWN with RST
        g.send(c, Op.RST)
        rig.run_until(lambda: not g.engine.connections, what="connection removed")
        # late packets for the dead connection are answered with RST, never a crash
        g.send(c, Op.CREDIT_UPDATE)
        rig.run_until(lambda: c.rst, what="RST for the stale connection")
    finally:
        release.set()
        listener.close()


def test_host_half_close_keeps_guest_sending(rig: Rig) -> None:
    g = rig.add()
    got = {}

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)   # half-close: the host still reads
        got["data"] = recv_all(conn)

    listener = HostListener(f"{g.engine.config.uds_path}_7100", serve)
    try:
        c = g.connect(7100)
        rig.run_until(lambda: c.shutdown_rcvd, what="SHUTDOWN from the host's half-close")
        assert c.shutdown_rcvd == SHUTDOWN_SEND  # not RCV: the host still listens
        g.write(c, b"answer")
        rig.run_until(lambda: not c.to_send)
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)
        rig.run_until(lambda: c.rst, what="RST")
    finally:
        listener.close()
    assert got["data"] == b"answer"


def test_full_shutdown_waits_until_guest_data_is_delivered(rig: Rig) -> None:
    """The host half-closed and reads slowly; the guest sends until its credit is
    gone, then SHUTDOWN SEND.  The engine still holds guest data for the host, so
    it must not send SHUTDOWN SEND|RCV yet: Linux answers that with RST, which
    would drop the data (found by the ring-level test)."""
    g = rig.add()
    release = threading.Event()
    got = {}

    def serve(conn: socket.socket) -> None:
        conn.shutdown(socket.SHUT_WR)      # nothing to say
        release.wait(TIMEOUT)              # a slow reader
        got["data"] = recv_all(conn)

    listener = HostListener(f"{g.engine.config.uds_path}_7150", serve)
    try:
        c = g.connect(7150)
        rig.run_until(lambda: c.shutdown_rcvd == SHUTDOWN_SEND, what="SHUTDOWN from the host's half-close")
        data = os.urandom(4 << 20)
        g.write(c, data)
        (conn,) = g.engine.connections.values()
        rig.run_until(lambda: c.to_send and c.credit() <= 0 and conn.tx_buffered > 0,
                      what="the guest stalled on credit, the engine holding data (host socket full)")
        sent = len(data) - len(c.to_send)
        c.to_send.clear()
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_SEND)
        for _ in range(20):
            rig.step()
        assert c.shutdown_rcvd == SHUTDOWN_SEND and not c.rst, "full SHUTDOWN while data was buffered"
        release.set()
        rig.run_until(lambda: c.shutdown_rcvd == SHUTDOWN_BOTH, what="SHUTDOWN SEND|RCV once delivered")
        g.send(c, Op.RST)
        rig.run_until(lambda: not g.engine.connections, what="connection removed")
    finally:
        release.set()
        listener.close()
    assert got["data"] == data[:sent]


def test_guest_rst_closes_host_socket(rig: Rig) -> None:
    g = rig.add()
    eof = threading.Event()

    def serve(conn: socket.socket) -> None:
        if conn.recv(10) == b"":
            eof.set()

    listener = HostListener(f"{g.engine.config.uds_path}_7200", serve)
    try:
        c = g.connect(7200)
        rig.run_until(lambda: c.state == "established")
        g.send(c, Op.RST)
        assert not g.engine.connections
        rig.run_until(eof.is_set, what="host EOF after guest RST")
    finally:
        listener.close()


def test_guest_shutdown_rcv_stops_host_data(rig: Rig) -> None:
    g = rig.add()
    result = {}

    def serve(conn: socket.socket) -> None:
        try:
            for _ in range(1000):
                conn.sendall(b"x" * 4096)
            result["r"] = "sent"
        except OSError as exc:
            result["r"] = type(exc).__name__

    listener = HostListener(f"{g.engine.config.uds_path}_7300", serve)
    try:
        c = g.connect(7300)
        rig.run_until(lambda: c.state == "established")
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_RCV)
        rig.run_until(lambda: "r" in result, what="host writer ends")
        assert result["r"] == "BrokenPipeError"
        g.send(c, Op.RST)
    finally:
        listener.close()


# ----------------------------------------------------------------- host -> guest
def test_host_initiated_connection(rig: Rig) -> None:
    g = rig.add(listen={1234})
    uds = g.engine.config.uds_path
    s = host_connect(uds, 1234)
    try:
        s.sendall(b"early data")  # sent before OK: must not be eaten by the CONNECT parser
        rig.run_until(lambda: any(c.gport == 1234 for c in g.conns.values()), what="REQUEST to the guest")
        c = next(c for c in g.conns.values() if c.gport == 1234)
        assert c.hport == FIRST_LOCAL_PORT
        line = b""
        while not line.endswith(b"\n"):
            rig.step()
            s.setblocking(False)
            try:
                line += s.recv(1)
            except BlockingIOError:
                pass
        s.settimeout(TIMEOUT)
        assert line == f"OK {c.hport}\n".encode()
        rig.run_until(lambda: bytes(c.data) == b"early data" or c.fwd_cnt == 10, what="host data")
        g.write(c, b"pong")
        rig.run_until(lambda: not c.to_send)
        assert s.recv(4) == b"pong"
    finally:
        s.close()
    rig.run_until(lambda: c.shutdown_rcvd == SHUTDOWN_BOTH, what="SHUTDOWN after host close")
    g.send(c, Op.RST)
    assert not g.engine.connections


def test_host_initiated_refused_by_guest(rig: Rig) -> None:
    g = rig.add()  # listens nowhere: the fake guest answers REQUEST with RST
    s = host_connect(g.engine.config.uds_path, 99)
    try:
        rig.run_until(lambda: not g.engine.connections and any(h.op == Op.REQUEST for h in g.log), what="RST")
        assert s.recv(10) == b""
    finally:
        s.close()


@pytest.mark.parametrize("line", [b"HELLO\n", b"CONNECT abc\n", b"x" * 100])
def test_bad_connect_line_closes(rig: Rig, line: bytes) -> None:
    g = rig.add()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect(g.engine.config.uds_path)
        s.sendall(line)
        eof = threading.Event()

        def wait_eof() -> None:
            try:
                s.recv(10)
            except OSError:
                pass  # ECONNRESET: we sent more than the engine read before it closed
            eof.set()
        t = threading.Thread(target=wait_eof)
        t.start()
        rig.run_until(eof.is_set, what="close")
        t.join()
    finally:
        s.close()
    assert not g.log


def test_many_concurrent_connections(rig: Rig) -> None:
    g = rig.add(listen={80})
    uds = g.engine.config.uds_path
    n = 40

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    listener = HostListener(f"{uds}_9000", echo)
    host_socks: list[socket.socket] = []
    try:
        guest_side = [g.connect(9000) for _ in range(n)]
        host_socks = [host_connect(uds, 80) for _ in range(n)]
        rig.run_until(lambda: all(c.state == "established" for c in guest_side), what="guest conns")
        rig.run_until(lambda: sum(c.gport == 80 for c in g.conns.values()) == n, what="host conns")
        msgs = {c.gport: os.urandom(20000) for c in guest_side}
        for c in guest_side:
            g.write(c, msgs[c.gport])
        rig.run_until(lambda: all(c.fwd_cnt == 20000 for c in guest_side), what="echoes")
        # host-initiated ones: OK lines, then the guest writes and the host reads
        incoming = [c for c in g.conns.values() if c.gport == 80]
        for c in incoming:
            g.write(c, b"hi %d" % c.hport)
        rig.run_until(lambda: all(not c.to_send for c in incoming))

        for s in host_socks:  # the engine already wrote OK + data into each host socket
            data = b""
            while b"\n" not in data or not data.split(b"\n", 1)[1]:
                data += s.recv(100)
            ok, rest = data.split(b"\n", 1)
            port = int(ok.split()[1])
            while len(rest) < len(b"hi %d" % port):
                rest += s.recv(100)
            assert ok == b"OK %d" % port and rest == b"hi %d" % port
        for c in guest_side:
            g.send(c, Op.RST)
    finally:
        for s in host_socks:
            s.close()
        listener.close()
    rig.run_until(lambda: all(c.shutdown_rcvd == SHUTDOWN_BOTH for c in g.conns.values() if c.gport == 80))


# ----------------------------------------------------------------- seqpacket
def test_seqpacket_message_boundaries(rig: Rig) -> None:
    g = rig.add(seqpacket=True, listen={77})
    uds = g.engine.config.uds_path
    got: list[bytes] = []
    messages = [b"a", os.urandom(10000), b"", os.urandom(3000)]

    def serve(conn: socket.socket) -> None:
        for _ in range(3):
            got.append(conn.recv(1 << 17))
        for m in (b"one", os.urandom(9000), b"three"):
            conn.send(m)
        got.append(conn.recv(1))

    listener = HostListener(f"{uds}_8000", serve, socket.SOCK_SEQPACKET)
    try:
        c = g.connect(8000, type=SockType.SEQPACKET)
        rig.run_until(lambda: c.state == "established")
        for m in (messages[0], messages[1], messages[3]):
            g.write(c, m)
            rig.run_until(lambda: not c.to_send)
        rig.run_until(lambda: len(c.messages) == 3, what="host messages")
        assert [len(m) for m in c.messages] == [3, 9000, 5]
        assert got[:3] == [messages[0], messages[1], messages[3]]
        g.send(c, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)
        rig.run_until(lambda: c.rst)
    finally:
        listener.close()
    # host-initiated seqpacket: CONNECT message on <uds>.seqpacket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(TIMEOUT)
    try:
        s.connect(uds + SEQPACKET_SUFFIX)
        s.send(b"CONNECT 77\n")
        s.send(b"msg-1")
        rig.run_until(lambda: any(c.gport == 77 for c in g.conns.values()))
        c = next(c for c in g.conns.values() if c.gport == 77)
        rig.run_until(lambda: c.messages == [b"msg-1"], what="seqpacket message")
        assert s.recv(100) == f"OK {c.hport}\n".encode()
        g.write(c, b"back")
        rig.run_until(lambda: not c.to_send)
        assert s.recv(100) == b"back"
    finally:
        s.close()
    rig.run_until(lambda: c.shutdown_rcvd == SHUTDOWN_BOTH)
    g.send(c, Op.RST)


def test_seqpacket_not_negotiated_is_rst(rig: Rig) -> None:
    g = rig.add(seqpacket=False)
    c = g.connect(8000, type=SockType.SEQPACKET)
    rig.run_until(lambda: c.rst)


# ----------------------------------------------------------------- sibling VMs
def test_sibling_vms_with_shared_group(rig: Rig) -> None:
    a = rig.add(3, groups={"g1", "g2"})
    b = rig.add(4, groups={"g2"}, listen={1000}, auto_consume=False)
    c = a.connect(1000, peer_cid=4)
    rig.run_until(lambda: c.state == "established", what="sibling RESPONSE")
    data = os.urandom(300_000)
    a.write(c, data)
    peer = b.conns[(3, 1000, c.gport)]
    got = bytearray()

    def arrived() -> bool:
        got.extend(b.consume(peer))
        return len(got) == len(data)
    rig.run_until(arrived, what="sibling data")
    assert bytes(got) == data
    # big tx packets are split to fit the receiver's 4 KiB rx buffers
    assert all(h.len <= 4096 - HDR_SIZE for h in b.log)
    b.write(peer, b"reply")
    rig.run_until(lambda: a.consume(c) == b"reply" or c.fwd_cnt >= 5)
    a.send(c, Op.RST)
    rig.run_until(lambda: peer.rst, what="RST forwarded to the sibling")


def test_sibling_vms_without_shared_group_are_refused(rig: Rig) -> None:
    a = rig.add(3, groups={"red"})
    b = rig.add(4, groups={"blue"}, listen={1000})
    c = a.connect(1000, peer_cid=4)
    rig.run_until(lambda: c.rst, what="RST")
    assert not b.log
    d = a.connect(1000, peer_cid=77)  # no such VM
    rig.run_until(lambda: d.rst)


def test_registry_refuses_duplicate_cid(rig: Rig) -> None:
    from vhostuser.errors import VsockConfigError
    rig.add(3)
    cfg = VsockEngineConfig(guest_cid=3, uds_path=os.path.join(rig.tmp, "dup.vsock"))
    dup = VsockEngine(cfg, registry=rig.registry)
    with pytest.raises(VsockConfigError):
        dup.start()
    assert not os.path.exists(cfg.uds_path)


def test_backpressure_without_rx_buffers(rig: Rig) -> None:
    """No rx buffers: the engine stops reading, the host writer blocks, nothing is lost."""
    g = rig.add(rx_buffer_size=8192, auto_consume=False)
    payload = os.urandom(2 << 20)
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(payload)
        done.set()
        conn.recv(1)

    listener = HostListener(f"{g.engine.config.uds_path}_9100", serve)
    try:
        c = g.connect(9100)
        rig.run_until(lambda: c.state == "established")
        # the guest stops taking rx packets: only poll host fds
        for _ in range(100):
            rig.watcher.poll(rig.engines, 0.001)
        conn = next(iter(g.engine.connections.values()))
        assert conn.rx_buffered <= 8192
        assert not done.is_set()  # the host writer is blocked by the kernel buffer
        assert not g.engine.watched_fds().get(conn.fd, 0) & 1  # reading is paused
        got = bytearray()

        def all_in() -> bool:
            got.extend(g.consume(c))
            return len(got) == len(payload)
        rig.run_until(all_in, what="data after rx resumes")
        assert bytes(got) == payload
        g.send(c, Op.RST)
    finally:
        listener.close()


def test_reset_closes_everything(rig: Rig) -> None:
    g = rig.add(listen={5})
    s = host_connect(g.engine.config.uds_path, 5)
    try:
        rig.run_until(lambda: bool(g.engine.connections))
        g.engine.reset()
        assert not g.engine.connections and not g.engine.has_rx_work()
        assert s.recv(10) == b""
    finally:
        s.close()
