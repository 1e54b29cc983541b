"""VsockBackend at the ring level: the daemon serves it in this process, the mock
front-end plays QEMU *and* the guest's virtio-vsock driver (rx queue 0, tx queue 1,
packets REQUEST/RESPONSE/RW/CREDIT_*/SHUTDOWN/RST), and host threads sit on the
hybrid-vsock AF_UNIX sockets.

Streams of several MiB run both ways at once on several connections (guest ->
host through ``<uds>_<port>`` listeners, host -> guest through ``CONNECT <port>``),
with split and packed rings, EVENT_IDX on and off; every byte is checked by
SHA-256 and the guest driver checks that the device never exceeds its credit.
Malformed guest packets are dropped (or answered with RST) and the device keeps
serving.
"""
from __future__ import annotations

import collections
import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from vhostuser.devices.vsock.device import RX_QUEUE, TX_QUEUE, VsockBackend
from vhostuser.devices.vsock.engine import VsockEngineConfig
from vhostuser.devices.vsock.packet import (
    HDR_SIZE,
    HOST_CID,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    Op,
    SockType,
    VsockHeader,
)
from vhostuser.testing import FrontendOptions, MockFrontend
from vhostuser.testing.frontend import UsedBuffer

GUEST_CID = 3
#: what the simulated guest advertises per connection (Linux: 256 KiB)
GUEST_BUF_ALLOC = 256 * 1024
#: rx buffers kept posted (Linux posts a full ring of 4 KiB buffers)
RX_BUFFERS = 64
RX_PAYLOAD = 4096
#: tx: bytes of chains in flight at most (the driver's data area is a ring buffer)
TX_INFLIGHT = 512 * 1024
TIMEOUT = 60.0
_MiB = 1 << 20

#: QEMU's vsock rings (128 entries), the guest CID read as QEMU does, VIRTIO_VSOCK_F_STREAM acked
OPTIONS = FrontendOptions(num_queues=2, queue_size=128, config_size=8, device_features=1, data_size=2 * _MiB,
                          timeout=10.0)


def stream(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------- the guest
@dataclass
class GuestConn:
    """One connection as the guest driver sees it."""

    port: int                 # guest port
    peer_port: int            # host port
    data: bytes               # what the guest sends
    established: bool = False
    sent: int = 0
    shut_sent: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    fwd_cnt: int = 0          # bytes received and consumed (credit we give back)
    last_fwd_sent: int = 0
    credit_update_queued: bool = False
    rx_hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    rx_len: int = 0
    peer_shutdown: int = 0
    closed: bool = False
    reset_by_peer: bool = False

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))


class GuestVsock:
    """A virtio-vsock guest driver over :class:`MockFrontend` (one thread)."""

    def __init__(self, fe: MockFrontend, *, seed: int = 0, buf_alloc: int = GUEST_BUF_ALLOC) -> None:
        self.fe = fe
        self.buf_alloc = buf_alloc
        self.stats: collections.Counter[str] = collections.Counter()
        self.rnd = random.Random(seed)
        self.conns: dict[tuple[int, int], GuestConn] = {}
        self.listening: dict[int, Callable[[int], bytes]] = {}  # guest port -> data for a new conn
        self.ctrl: collections.deque[VsockHeader] = collections.deque()
        self.unmatched: list[VsockHeader] = []   # packets for no connection (RSTs to bad input)
        self.rx_posted = 0
        self.empty_rx = 0                         # rx chains the device returned unused
        self.tx_bytes: dict[int, int] = {}       # tx token -> bytes placed
        self.next_port = 50000
        fe.on_used(RX_QUEUE, self._on_rx)
        fe.on_used(TX_QUEUE, self._on_tx)

    # ---------------------------------------------------------------- packets
    def header(self, conn: GuestConn, op: int, length: int = 0, flags: int = 0) -> VsockHeader:
        conn.last_fwd_sent = conn.fwd_cnt
        return VsockHeader(GUEST_CID, HOST_CID, conn.port, conn.peer_port, length, SockType.STREAM, op, flags,
                           self.buf_alloc, conn.fwd_cnt)

    def connect(self, host_port: int, data: bytes) -> GuestConn:
        self.next_port += 1
        conn = GuestConn(self.next_port, host_port, data)
        self.conns[(conn.port, host_port)] = conn
        self.ctrl.append(self.header(conn, Op.REQUEST))
        return conn

    def _on_rx(self, _index: int, used: list[UsedBuffer]) -> None:
        for u in used:
            self.rx_posted -= 1
            if u.length == 0:
                self.empty_rx += 1
                continue
            assert u.length >= HDR_SIZE, f"rx buffer used with {u.length} bytes"
            hdr = VsockHeader.unpack(u.data)
            payload = u.data[HDR_SIZE:u.length]
            assert hdr.len == len(payload), hdr.describe()
            self._packet(hdr, payload)

    def _on_tx(self, _index: int, used: list[UsedBuffer]) -> None:
        for u in used:
            assert u.length == 0
            self.tx_bytes.pop(u.token)

    def _packet(self, hdr: VsockHeader, payload: bytes) -> None:
        assert (hdr.src_cid, hdr.dst_cid, hdr.type) == (HOST_CID, GUEST_CID, SockType.STREAM), hdr.describe()
        key = (hdr.dst_port, hdr.src_port)
        conn = self.conns.get(key)
        if conn is None or conn.closed:
            if hdr.op == Op.REQUEST and hdr.dst_port in self.listening:
                conn = GuestConn(hdr.dst_port, hdr.src_port, self.listening[hdr.dst_port](hdr.src_port),
                                 established=True)
                self.conns[key] = conn
                conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
                self.ctrl.append(self.header(conn, Op.RESPONSE))
                return
            self.unmatched.append(hdr)
            if hdr.op != Op.RST:
                self.ctrl.append(VsockHeader(GUEST_CID, HOST_CID, hdr.dst_port, hdr.src_port, 0, hdr.type, Op.RST))
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        op = hdr.op
        self.stats[Op(op).name] += 1
        if op == Op.RESPONSE:
            assert not conn.established
            conn.established = True
        elif op == Op.RW:
            assert conn.established and not conn.peer_shutdown & SHUTDOWN_SEND
            conn.rx_hash.update(payload)
            conn.rx_len += len(payload)
            # the device must stay within the credit of our last header
            assert conn.rx_len - conn.last_fwd_sent <= self.buf_alloc, "device exceeded the guest's credit"
            conn.fwd_cnt += len(payload)  # consumed at once
            if conn.fwd_cnt - conn.last_fwd_sent >= self.buf_alloc // 4 and not conn.credit_update_queued:
                conn.credit_update_queued = True
                self.ctrl.append(self.header(conn, Op.CREDIT_UPDATE))
        elif op == Op.CREDIT_REQUEST:
            self.ctrl.append(self.header(conn, Op.CREDIT_UPDATE))
        elif op == Op.CREDIT_UPDATE:
            pass
        elif op == Op.SHUTDOWN:
            conn.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH
            if conn.peer_shutdown == SHUTDOWN_BOTH:  # as Linux: the peer is gone, reset
                self.ctrl.append(self.header(conn, Op.RST))
                conn.closed = True
        elif op == Op.RST:
            conn.closed = True
            conn.reset_by_peer = True
        else:
            raise AssertionError(f"unexpected packet {hdr.describe()}")

    # ------------------------------------------------------------------ rings
    def _rx_layout(self) -> list[int]:
        # Linux 6.1 posts header + 4 KiB page as two descriptors; newer ones one buffer
        return self.rnd.choice([[HDR_SIZE, RX_PAYLOAD], [HDR_SIZE + RX_PAYLOAD], [20, 24, RX_PAYLOAD],
                                [HDR_SIZE + 100, RX_PAYLOAD - 100]])

    def fill_rx(self) -> None:
        added = False
        while self.rx_posted < RX_BUFFERS and self.fe.driver(RX_QUEUE).num_free >= 3:
            self.fe.add(RX_QUEUE, (), self._rx_layout())
            self.rx_posted += 1
            added = True
        if added:
            self.fe.publish(RX_QUEUE)

    def _place_tx(self, hdr: VsockHeader, payload: bytes = b"") -> bool:
        raw = hdr.pack() + payload
        if self.fe.driver(TX_QUEUE).num_free < 3 or sum(self.tx_bytes.values()) + len(raw) > TX_INFLIGHT:
            return False
        layout = self.rnd.randrange(3)
        if layout == 0 or not payload:
            bufs = [raw]
        elif layout == 1:
            bufs = [raw[:HDR_SIZE], raw[HDR_SIZE:]]       # Linux 6.1: header, then payload
        else:
            bufs = [raw[:16], raw[16:HDR_SIZE + 1], raw[HDR_SIZE + 1:]]  # the header split up
        token = self.fe.add(TX_QUEUE, [b for b in bufs if b])
        self.tx_bytes[token] = len(raw)
        return True

    def pump_tx(self) -> None:
        placed = False
        while self.ctrl:
            if not self._place_tx(self.ctrl[0]):
                break
            hdr = self.ctrl.popleft()
            if hdr.op == Op.CREDIT_UPDATE:
                for c in self.conns.values():
                    if (c.port, c.peer_port) == (hdr.src_port, hdr.dst_port):
                        c.credit_update_queued = False
            placed = True
        progress = True
        while progress and not self.ctrl:
            progress = False
            for conn in list(self.conns.values()):
                if not conn.established or conn.closed or conn.shut_sent:
                    continue
                if conn.sent == len(conn.data):
                    if self._place_tx(self.header(conn, Op.SHUTDOWN, flags=SHUTDOWN_SEND)):
                        conn.shut_sent = True
                        placed = progress = True
                    continue
                n = min(conn.credit(), len(conn.data) - conn.sent, self.rnd.choice([1, 512, 4096, 30000, 65536]))
                if n <= 0:
                    continue
                chunk = conn.data[conn.sent:conn.sent + n]
                if not self._place_tx(self.header(conn, Op.RW, len(chunk)), chunk):
                    break
                conn.sent += n
                conn.tx_cnt += n
                placed = progress = True
        if placed:
            self.fe.publish(TX_QUEUE)

    def run_until(self, done: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.fill_rx()
            self.pump_tx()
            if done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest driver: {what} not done; conns {list(self.conns.values())!r:.2000}")
            self.fe.process_events(0.2)
            assert not self.fe.vring(RX_QUEUE).failed and not self.fe.vring(TX_QUEUE).failed


# ------------------------------------------------------------------ the host
def host_peer(sock: socket.socket, data: bytes, *, connect_port: int | None = None) -> tuple[str, int]:
    """One host end: send ``data`` then SHUT_WR, read to EOF; returns (sha256, length)
    of what was read.  With ``connect_port``: first the ``CONNECT`` line / ``OK``."""
    with sock:
        sock.settimeout(TIMEOUT)
        if connect_port is not None:
            data = f"CONNECT {connect_port}\n".encode() + data   # data may follow the line at once

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        if connect_port is not None:
            line = b""
            while not line.endswith(b"\n"):
                b = sock.recv(1)
                assert b, "closed before OK"
                line += b
            assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30, line
        h = hashlib.sha256()
        n = 0
        while chunk := sock.recv(256 * 1024):
            h.update(chunk)
            n += len(chunk)
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        return h.hexdigest(), n


def serve_listener(listener: socket.socket, pool: ThreadPoolExecutor, datas: list[bytes]) -> list[Future]:
    """Accept ``len(datas)`` guest connections, a :func:`host_peer` each."""
    futures = []
    with listener:
        listener.settimeout(TIMEOUT)
        for data in datas:
            sock, _ = listener.accept()
            futures.append(pool.submit(host_peer, sock, data))
    return futures


def bring_up(serve_backend, vhost_socket_dir: str, *, device: dict | None = None,  # noqa: ANN001
             **opts) -> tuple[VsockBackend, MockFrontend, str]:
    uds = f"{vhost_socket_dir}/vm.vsock"
    backend = VsockBackend(VsockEngineConfig(guest_cid=GUEST_CID, uds_path=uds, **(device or {})), queue_size=128)
    path = serve_backend(backend)
    fe = MockFrontend.connect(path, OPTIONS.replace(**opts))
    try:
        assert fe.config == struct.pack("<Q", GUEST_CID)
        assert fe.acked_features >> 32 & 1 and fe.acked_features & 1  # VERSION_1, F_STREAM
    except BaseException:
        fe.close()
        raise
    return backend, fe, uds


# ----------------------------------------------------------------- the tests
#: (guest buf_alloc, device tx-buffer-size, device rx-buffer-size): the small one makes
#: both sides stall on credit all the time (CREDIT_REQUEST / CREDIT_UPDATE)
CREDITS = {"big_credit": (GUEST_BUF_ALLOC, 64 * 1024, 64 * 1024), "small_credit": (12 * 1024, 8192, 4096)}


@pytest.mark.parametrize("credit", list(CREDITS))
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_streams_both_ways(no_fd_leak, serve_backend, vhost_socket_dir, packed: bool,  # noqa: ANN001
                           event_idx: bool, credit: str) -> None:
    guest_buf, tx_buf, rx_buf = CREDITS[credit]
    backend, fe, uds = bring_up(serve_backend, vhost_socket_dir, packed=packed, event_idx=event_idx,
                                device={"tx_buffer_size": tx_buf, "rx_buffer_size": rx_buf})
    assert fe.packed == packed and fe.event_idx == event_idx
    sizes = [3 * _MiB + 17, 1 * _MiB + 5, 777]          # guest -> host connections (port 1234)
    back = [2 * _MiB + 3, 65536, 0]                      # what the host sends on those
    h2g = [(2 * _MiB + 11, 1 * _MiB + 1), (5000, 0)]     # host -> guest: (host sends, guest sends)
    g_data = [stream(100 + i, n) for i, n in enumerate(sizes)]
    hb_data = [stream(200 + i, n) for i, n in enumerate(back)]
    h2g_host = [stream(300 + i, a) for i, (a, _) in enumerate(h2g)]
    h2g_guest = [stream(400 + i, b) for i, (_, b) in enumerate(h2g)]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_1234")
    listener.listen(8)
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool, fe:
        guest = GuestVsock(fe, seed=int(packed) * 2 + int(event_idx), buf_alloc=guest_buf)
        accepted = pool.submit(serve_listener, listener, pool, hb_data)
        # the guest listens on 5555; it answers host connection k with h2g_guest[k]
        order = iter(h2g_guest)
        guest.listening[5555] = lambda _peer: next(order)
        for data in g_data:
            guest.connect(1234, data)
        host_conns = []
        for data in h2g_host:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(uds)
            host_conns.append(pool.submit(host_peer, s, data, connect_port=5555))
        expected = len(sizes) + len(h2g)
        guest.run_until(lambda: len(guest.conns) == expected and all(c.closed for c in guest.conns.values())
                        and all(f.done() for f in host_conns) and accepted.done(), what="the streams")
        host_results = [f.result(TIMEOUT) for f in host_conns] + [f.result(TIMEOUT) for f in accepted.result()]
        elapsed = time.monotonic() - t0
        # what each side received is exactly what the other sent (as multisets: the
        # host cannot tell which guest connection it accepted first)
        assert sorted((n, h) for h, n in host_results) == sorted((len(d), sha(d)) for d in g_data + h2g_guest)
        guest_got = sorted((c.rx_hash.hexdigest(), c.rx_len) for c in guest.conns.values())
        assert guest_got == sorted((sha(d), len(d)) for d in hb_data + h2g_host), guest_got
        assert all(c.sent == len(c.data) for c in guest.conns.values())
        assert not guest.unmatched
        assert not fe.vring(TX_QUEUE).failed and not fe.vring(RX_QUEUE).failed
        # every connection is gone on the device too
        deadline = time.monotonic() + TIMEOUT
        while backend.engine.connections and time.monotonic() < deadline:
            guest.run_until(lambda: True)
            fe.process_events(0.05)
        assert not backend.engine.connections
        fe.stop()
    total = sum(sizes) + sum(back) + sum(a + b for a, b in h2g)
    print(f"{total / _MiB:.1f} MiB in {elapsed:.2f} s ({total / _MiB / elapsed:.1f} MiB/s); "
          f"packets to the guest: {dict(guest.stats)}")


def test_bad_guest_input_is_dropped_and_the_device_keeps_serving(no_fd_leak, serve_backend,  # noqa: ANN001
                                                                 vhost_socket_dir) -> None:
    backend, fe, uds = bring_up(serve_backend, vhost_socket_dir)
    with fe:
        guest = GuestVsock(fe)
        # an rx chain the device cannot write into (first in line) is returned empty
        fe.add(RX_QUEUE, [b"\0" * 64])
        guest.rx_posted += 1
        guest.fill_rx()

        def hdr(op: int, length: int = 0, **kw: int) -> VsockHeader:
            fields = dict(src_cid=GUEST_CID, dst_cid=HOST_CID, src_port=7, dst_port=99, len=length,
                          type=SockType.STREAM, op=op, flags=0, buf_alloc=GUEST_BUF_ALLOC, fwd_cnt=0)
            fields.update(kw)
            return VsockHeader(**fields)

        bad_chains: list[tuple[list[bytes], list[int]]] = [
            ([hdr(Op.REQUEST).pack()[:30]], []),                      # truncated header
            ([hdr(Op.RW, 1000).pack(), b"x" * 10], []),               # len larger than the chain
            ([hdr(Op.RW, 0xFFFF_FFF0).pack(), b"x" * 10], []),        # absurd len
            ([], [HDR_SIZE + 64]),                                    # writable-only tx chain
            ([hdr(Op.REQUEST).pack()], [64]),                         # trailing writable part: ignored
            ([hdr(99).pack()], []),                                   # unknown op: RST
            ([hdr(Op.REQUEST, type=7).pack()], []),                   # unknown type: RST
            ([hdr(Op.RESPONSE, 4).pack() + b"abcd"], []),             # payload on a control op: RST
            ([hdr(Op.RW, 3, src_cid=9).pack() + b"abc"], []),         # spoofed source CID: dropped
            ([hdr(Op.RW, 3).pack() + b"abc"], []),                    # no such connection: RST
        ]
        for readable, writable in bad_chains:
            fe.add(TX_QUEUE, readable, writable)
        fe.publish(TX_QUEUE)
        used = fe.wait_used(TX_QUEUE, len(bad_chains))
        assert len(used) == len(bad_chains) and all(u.length == 0 for u in used)
        guest.run_until(lambda: len(guest.unmatched) >= 5, timeout=10, what="the RSTs")
        ops = sorted((h.op, h.type) for h in guest.unmatched)
        # REQUEST of the writable-tailed chain went to port 99: nobody listens -> RST too
        assert all(h.op == Op.RST for h in guest.unmatched), ops
        assert len(guest.unmatched) == 5, ops
        assert guest.empty_rx == 1
        assert not fe.vring(TX_QUEUE).failed and not fe.vring(RX_QUEUE).failed

        # ... and the device still serves a real connection
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_4321")
        listener.listen(1)
        data, back = stream(1, 300_000), stream(2, 200_000)
        with ThreadPoolExecutor(2) as pool:
            accepted = pool.submit(serve_listener, listener, pool, [back])
            conn = guest.connect(4321, data)
            guest.run_until(lambda: conn.closed and accepted.done(), what="the connection after bad input")
            (peer,) = accepted.result()
            assert peer.result(TIMEOUT) == (sha(data), len(data))
        assert (conn.rx_hash.hexdigest(), conn.rx_len) == (sha(back), len(back))
        assert not conn.reset_by_peer
        fe.stop()
