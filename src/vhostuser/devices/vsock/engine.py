"""The vsock engine: routing between one guest, host AF_UNIX sockets and sibling VMs.

The engine is the whole device minus the virtqueues, so it can be tested
with real host sockets and a simulated guest:

* ``handle_tx_packet(hdr, payload)`` - a packet the guest put on its tx queue;
* ``has_rx_work()`` / ``next_rx_packet(max_len)`` - the next packet for the
  guest's rx queue (the caller stops asking when it has no rx buffers: that is
  the backpressure);
* ``handle_fd_ready(fd)`` - a host socket the engine asked to watch is ready;
* ``deliver_from_sibling(hdr, payload)`` - another VM's engine (any thread)
  routes a packet to this guest.

The engine tells its :class:`FdWatcher` which fds to poll and for what
(readable, writable, neither); the device glue maps that onto the daemon's
worker poller, the tests onto a :class:`~vhostuser.sys_util.poll.Poller`.

Host side, Firecracker's *hybrid vsock*:

* the host connects to ``uds_path`` and writes ``CONNECT <port>\\n``; the engine
  sends REQUEST to guest port ``<port>``; on the guest's RESPONSE the host
  reads ``OK <local_port>\\n`` and the socket carries the stream;
* a guest connecting to host port P is connected to the AF_UNIX listener at
  ``<uds_path>_<P>``; nobody listening there means RST.

SOCK_SEQPACKET (when enabled and negotiated): guest seqpacket connections to
port P connect an AF_UNIX SOCK_SEQPACKET socket to ``<uds_path>_<P>``; the host
connects seqpacket sockets to ``<uds_path>.seqpacket`` and sends
``CONNECT <port>\\n`` as its first message (the ``OK`` answer is one message too).
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from ...errors import VsockConfigError, VsockPacketError
from ...sys_util.poll import EVENT_READ, EVENT_WRITE
from .conn import ConnState, VsockConnection
from .packet import HDR_SIZE, HOST_CID, SEQ_EOM, SEQ_EOR, VMADDR_CID_ANY, Op, SockType, VsockHeader, parse_packet

log = logging.getLogger(__name__)

#: defaults, as vhost-device-vsock
DEFAULT_GUEST_CID: Final = 3
DEFAULT_TX_BUFFER_SIZE: Final = 64 * 1024
DEFAULT_RX_BUFFER_SIZE: Final = 64 * 1024
DEFAULT_GROUP: Final = "default"
#: suffix of the seqpacket listener (host-initiated SOCK_SEQPACKET connections)
SEQPACKET_SUFFIX: Final = ".seqpacket"
#: the first local port handed out to host-initiated connections (as Firecracker)
FIRST_LOCAL_PORT: Final = 1 << 30
#: longest accepted ``CONNECT <port>\n`` line
MAX_CONNECT_LINE: Final = 64
#: RST answers (to unknown connections) waiting for rx buffers; more are dropped
MAX_PENDING_CTRL: Final = 4096
#: bytes from sibling VMs waiting for this guest's rx buffers; beyond, the sender gets RST
MAX_SIBLING_BYTES: Final = 64 * 1024 * 1024
#: connections accepted per listener readiness event
_ACCEPT_BATCH: Final = 64

Packet = tuple[VsockHeader, bytes]


class FdWatcher(Protocol):
    """Where the engine asks for readiness notifications."""

    def set_interest(self, fd: int, events: int) -> None:
        """Poll ``fd`` for ``events`` (EVENT_READ | EVENT_WRITE); 0 stops watching.
        The engine always calls this with 0 before it closes a watched fd."""


@dataclass
class VsockEngineConfig:
    """One VM's vsock device."""

    guest_cid: int = DEFAULT_GUEST_CID
    uds_path: str = ""
    tx_buffer_size: int = DEFAULT_TX_BUFFER_SIZE
    rx_buffer_size: int = DEFAULT_RX_BUFFER_SIZE
    groups: frozenset[str] = field(default_factory=lambda: frozenset({DEFAULT_GROUP}))
    seqpacket: bool = False

    def validate(self) -> None:
        """Raise :class:`VsockConfigError` for impossible values."""
        if not 3 <= self.guest_cid < VMADDR_CID_ANY:
            raise VsockConfigError(f"guest CID {self.guest_cid} is reserved or out of range (3 .. 2^32-2)")
        if not self.uds_path:
            raise VsockConfigError("uds-path is required")
        if not 1 <= self.tx_buffer_size <= 0xFFFF_FFFF:
            raise VsockConfigError(f"tx-buffer-size {self.tx_buffer_size} out of range")
        if self.rx_buffer_size < 1:
            raise VsockConfigError(f"rx-buffer-size {self.rx_buffer_size} out of range")
        if not self.groups:
            raise VsockConfigError("a device needs at least one group")


class SiblingRegistry:
    """The VMs served by one process, by CID, for sibling-VM routing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[int, VsockEngine] = {}

    def register(self, engine: VsockEngine) -> None:
        """Add a device's engine under its guest CID. Raises :class:`~vhostuser.errors.VsockConfigError` if another device has that CID."""
        with self._lock:
            other = self._engines.get(engine.guest_cid)
            if other is not None and other is not engine:
                raise VsockConfigError(f"guest CID {engine.guest_cid} is already used by another device")
            self._engines[engine.guest_cid] = engine

    def unregister(self, engine: VsockEngine) -> None:
        """Remove a device's engine (no-op if it is not the one registered under its CID)."""
        with self._lock:
            if self._engines.get(engine.guest_cid) is engine:
                del self._engines[engine.guest_cid]

    def lookup(self, cid: int) -> VsockEngine | None:
        """The engine of the sibling VM with guest CID ``cid``, or None."""
        with self._lock:
            return self._engines.get(cid)


class _PendingHostConn:
    """A host connection to ``uds_path`` that has not sent ``CONNECT <port>`` yet."""

    __slots__ = ("sock", "fd", "sock_type", "line")

    def __init__(self, sock: socket.socket, sock_type: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.sock_type = sock_type
        self.line = bytearray()


class _Listener:
    __slots__ = ("sock", "fd", "path", "sock_type")

    def __init__(self, sock: socket.socket, path: str, sock_type: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.path = path
        self.sock_type = sock_type


def parse_connect_line(line: bytes) -> int:
    """The port of a ``CONNECT <port>`` line (keyword case-insensitive, as
    Firecracker and vhost-device-vsock); :class:`VsockPacketError` otherwise."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        raise VsockPacketError("CONNECT line is not ASCII") from None
    if len(words) != 2 or words[0].upper() != "CONNECT" or not words[1].isdigit():
        raise VsockPacketError(f"expected 'CONNECT <port>', got {line!r}")
    port = int(words[1])
    if port > 0xFFFF_FFFF:
        raise VsockPacketError(f"port {port} out of range")
    return port


def _unlink_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VsockConfigError(f"{path} exists and is not a socket")
    os.unlink(path)


class VsockEngine:
    """The vsock device logic for one guest (see the module docs)."""

    def __init__(self, config: VsockEngineConfig, *, watcher: FdWatcher | None = None,
                 registry: SiblingRegistry | None = None, wakeup: Callable[[], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.guest_cid = config.guest_cid
        self.groups = frozenset(config.groups)
        self.watcher = watcher
        self.registry = registry if registry is not None else SiblingRegistry()
        #: called (from any thread) when a sibling queued a packet for this guest
        self.wakeup = wakeup
        #: the driver acked VIRTIO_VSOCK_F_SEQPACKET (set by the device glue;
        #: engine-level users set it themselves)
        self.seqpacket_negotiated = config.seqpacket
        self._listeners: list[_Listener] = []
        self._conns: dict[tuple[int, int], VsockConnection] = {}
        self._pending: dict[int, _PendingHostConn] = {}
        self._by_fd: dict[int, object] = {}
        self._watched: dict[int, int] = {}
        self._rx_ready: dict[tuple[int, int], None] = {}
        self._rx_ctrl: collections.deque[Packet] = collections.deque()
        self._sibling_lock = threading.Lock()
        self._sibling_q: collections.deque[list] = collections.deque()  # [hdr, payload, offset]
        self._sibling_bytes = 0
        self._next_local_port = FIRST_LOCAL_PORT
        self._turn = 0
        self._started = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the host listeners and join the sibling registry (idempotent)."""
        if self._started:
            return
        self.registry.register(self)
        try:
            self._listen(self.config.uds_path, socket.SOCK_STREAM, SockType.STREAM)
            if self.config.seqpacket:
                self._listen(self.config.uds_path + SEQPACKET_SUFFIX, socket.SOCK_SEQPACKET, SockType.SEQPACKET)
        except BaseException:
            self.close()
            raise
        self._started = True
        log.info("vsock cid %d: listening on %s", self.guest_cid, self.config.uds_path)

    def _listen(self, path: str, kind: int, sock_type: int) -> None:
        _unlink_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.bind(path)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise VsockConfigError(f"cannot listen on {path}: {exc}") from exc
        listener = _Listener(sock, path, sock_type)
        self._listeners.append(listener)
        self._by_fd[listener.fd] = listener
        self._set_interest(listener.fd, EVENT_READ)

    def close(self) -> None:
        """Close every connection and listener, remove the listener sockets' files
        and leave the registry.  Idempotent."""
        self.reset()
        for listener in self._listeners:
            self._forget_fd(listener.fd)
            listener.sock.close()
            try:
                os.unlink(listener.path)
            except OSError:
                pass
        self._listeners.clear()
        self.registry.unregister(self)
        self._started = False

    def reset(self) -> None:
        """The guest driver went away (device reset, front-end disconnect): close every
        host connection and drop every packet meant for the old guest."""
        for conn in list(self._conns.values()):
            self._drop_conn(conn)
        for pending in list(self._pending.values()):
            self._drop_pending(pending)
        self._rx_ready.clear()
        self._rx_ctrl.clear()
        with self._sibling_lock:
            self._sibling_q.clear()
            self._sibling_bytes = 0

    def set_watcher(self, watcher: FdWatcher) -> None:
        """Change the watcher; the fds being watched are handed over."""
        old, self.watcher = self.watcher, watcher
        for fd, events in self._watched.items():
            if old is not None:
                old.set_interest(fd, 0)
            watcher.set_interest(fd, events)

    # ------------------------------------------------------------ introspection
    @property
    def connections(self) -> dict[tuple[int, int], VsockConnection]:
        """Open connections by ``(local_port, peer_port)`` (read-only use)."""
        return self._conns

    def watched_fds(self) -> dict[int, int]:
        """fd -> events currently requested from the watcher."""
        return dict(self._watched)

    # ------------------------------------------------------------ fd interest
    def _set_interest(self, fd: int, events: int) -> None:
        if self._watched.get(fd, 0) == events:
            return
        if events:
            self._watched[fd] = events
        else:
            self._watched.pop(fd, None)
        if self.watcher is not None:
            self.watcher.set_interest(fd, events)

    def _forget_fd(self, fd: int) -> None:
        self._set_interest(fd, 0)
        self._by_fd.pop(fd, None)

    def _sync(self, conn: VsockConnection) -> None:
        """After anything happened to ``conn``: update polling, rx readiness, removal."""
        if conn.sock is not None:
            events = (EVENT_READ if conn.wants_read() else 0) | (EVENT_WRITE if conn.wants_write() else 0)
            self._set_interest(conn.fd, events)
        elif conn.fd in self._by_fd and self._by_fd[conn.fd] is conn:
            self._forget_fd(conn.fd)
        if conn.dead:
            self._remove_conn(conn)
        elif conn.rx_pending():
            self._rx_ready[conn.key] = None

    def _remove_conn(self, conn: VsockConnection) -> None:
        if self._by_fd.get(conn.fd) is conn:
            self._forget_fd(conn.fd)
        conn.close_socket()
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._rx_ready.pop(conn.key, None)

    def _drop_conn(self, conn: VsockConnection) -> None:
        if self._by_fd.get(conn.fd) is conn:
            self._forget_fd(conn.fd)
        conn.close_socket()
        conn.state = ConnState.CLOSED
        self._remove_conn(conn)

    def _drop_pending(self, pending: _PendingHostConn) -> None:
        self._forget_fd(pending.fd)
        self._pending.pop(pending.fd, None)
        pending.sock.close()

    # ------------------------------------------------------------ host readiness
    def handle_fd_ready(self, fd: int) -> None:
        """An fd the engine watches is ready (readable or writable: both are tried)."""
        obj = self._by_fd.get(fd)
        if obj is None:
            return  # closed meanwhile (a stale event)
        if isinstance(obj, VsockConnection):
            if obj.wants_write():
                obj.flush()
            if obj.wants_read():
                obj.on_readable()
            self._sync(obj)
        elif isinstance(obj, _PendingHostConn):
            self._read_connect_line(obj)
        elif isinstance(obj, _Listener):
            self._accept(obj)

    def _accept(self, listener: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("vsock cid %d: accept on %s failed: %s", self.guest_cid, listener.path, exc)
                return
            sock.setblocking(False)
            pending = _PendingHostConn(sock, listener.sock_type)
            self._pending[pending.fd] = pending
            self._by_fd[pending.fd] = pending
            self._set_interest(pending.fd, EVENT_READ)

    def _read_connect_line(self, pending: _PendingHostConn) -> None:
        try:
            if pending.sock_type == SockType.SEQPACKET:
                line = pending.sock.recv(MAX_CONNECT_LINE)
                complete = True
            else:
                # peek, so that bytes after the newline stay in the socket for the guest
                peek = pending.sock.recv(MAX_CONNECT_LINE - len(pending.line), socket.MSG_PEEK)
                nl = peek.find(b"\n")
                take = nl + 1 if nl >= 0 else len(peek)
                line = pending.sock.recv(take) if take else b""
                complete = nl >= 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("vsock cid %d: host connection failed before CONNECT: %s", self.guest_cid, exc)
            self._drop_pending(pending)
            return
        if not line:
            log.info("vsock cid %d: host connection closed before CONNECT", self.guest_cid)
            self._drop_pending(pending)
            return
        pending.line += line
        if not complete:
            if len(pending.line) >= MAX_CONNECT_LINE:
                log.warning("vsock cid %d: CONNECT line too long; closing", self.guest_cid)
                self._drop_pending(pending)
            return
        try:
            port = parse_connect_line(bytes(pending.line))
        except VsockPacketError as exc:
            log.warning("vsock cid %d: bad host request: %s; closing", self.guest_cid, exc)
            self._drop_pending(pending)
            return
        if pending.sock_type == SockType.SEQPACKET and not self.seqpacket_negotiated:
            log.info("vsock cid %d: the guest did not negotiate SEQPACKET; closing", self.guest_cid)
            self._drop_pending(pending)
            return
        local_port = self._allocate_local_port(port)
        if local_port is None:
            log.warning("vsock cid %d: no free local port; closing", self.guest_cid)
            self._drop_pending(pending)
            return
        self._set_interest(pending.fd, 0)
        del self._pending[pending.fd]
        conn = VsockConnection(pending.sock, sock_type=pending.sock_type, guest_cid=self.guest_cid,
                               local_port=local_port, peer_port=port, buf_alloc=self.config.tx_buffer_size,
                               rx_buffer_size=self.config.rx_buffer_size, host_initiated=True)
        self._conns[conn.key] = conn
        self._by_fd[conn.fd] = conn
        log.debug("vsock cid %d: host connects to guest port %d (local port %d)", self.guest_cid, port, local_port)
        self._sync(conn)

    def _allocate_local_port(self, peer_port: int) -> int | None:
        start = self._next_local_port
        port = start
        while True:
            nxt = port + 1 if port < 0xFFFF_FFFF else FIRST_LOCAL_PORT
            if (port, peer_port) not in self._conns:
                self._next_local_port = nxt
                return port
            port = nxt
            if port == start:
                return None

    # ------------------------------------------------------------ guest -> device
    def handle_tx_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """:meth:`handle_tx_packet` for one contiguous packet (header + payload).
        Malformed packets are logged and dropped."""
        try:
            hdr, payload = parse_packet(data)
        except VsockPacketError as exc:
            log.warning("vsock cid %d: dropping a malformed packet: %s", self.guest_cid, exc)
            return
        self.handle_tx_packet(hdr, payload)

    def handle_tx_packet(self, hdr: VsockHeader, payload: bytes) -> None:
        """A packet from the guest's tx queue: route it to a connection, a sibling
        VM, or answer it with RST."""
        if hdr.src_cid != self.guest_cid:
            log.warning("vsock cid %d: dropping a packet with source CID %d", self.guest_cid, hdr.src_cid)
            return
        try:
            hdr.validate()
        except VsockPacketError as exc:
            log.warning("vsock cid %d: bad packet (%s): %s", self.guest_cid, exc, hdr.describe())
            self._reply_rst(hdr)
            return
        if len(payload) != hdr.len:
            log.warning("vsock cid %d: len=%d but %d payload bytes; dropping", self.guest_cid, hdr.len, len(payload))
            return
        if hdr.dst_cid != HOST_CID:
            self._route_to_sibling(hdr, payload)
            return
        if hdr.type == SockType.SEQPACKET and not self.seqpacket_negotiated:
            self._reply_rst(hdr)
            return
        key = (hdr.dst_port, hdr.src_port)
        conn = self._conns.get(key)
        if conn is None:
            if hdr.op == Op.REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != Op.RST:
                self._reply_rst(hdr)
            return
        if hdr.type != conn.sock_type:
            conn.reset("socket type changed")
        else:
            conn.on_guest_packet(hdr, payload)
        self._sync(conn)

    def _reply_rst(self, hdr: VsockHeader) -> None:
        if hdr.op == Op.RST:
            return  # never answer an RST
        if len(self._rx_ctrl) >= MAX_PENDING_CTRL:
            log.debug("vsock cid %d: too many pending RSTs; dropping one", self.guest_cid)
            return
        rtype = hdr.type if hdr.type in (SockType.STREAM, SockType.SEQPACKET) else SockType.STREAM
        self._rx_ctrl.append((hdr.reply(Op.RST, type=rtype), b""))

    def _guest_connect(self, hdr: VsockHeader) -> None:
        path = f"{self.config.uds_path}_{hdr.dst_port}"
        kind = socket.SOCK_SEQPACKET if hdr.type == SockType.SEQPACKET else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            why = "listener backlog full" if exc.errno in (errno.EAGAIN, errno.EINPROGRESS) else exc.strerror
            log.info("vsock cid %d: guest port %d -> %s refused (%s)", self.guest_cid, hdr.src_port, path, why)
            self._reply_rst(hdr)
            return
        conn = VsockConnection(sock, sock_type=hdr.type, guest_cid=self.guest_cid, local_port=hdr.dst_port,
                               peer_port=hdr.src_port, buf_alloc=self.config.tx_buffer_size,
                               rx_buffer_size=self.config.rx_buffer_size, host_initiated=False,
                               peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt)
        self._conns[conn.key] = conn
        self._by_fd[conn.fd] = conn
        log.debug("vsock cid %d: guest port %d connected to %s", self.guest_cid, hdr.src_port, path)
        self._sync(conn)

    # ------------------------------------------------------------ sibling VMs
    def _route_to_sibling(self, hdr: VsockHeader, payload: bytes) -> None:
        target = self.registry.lookup(hdr.dst_cid) if hdr.dst_cid != self.guest_cid else None
        if target is None:
            log.debug("vsock cid %d: no VM with CID %d", self.guest_cid, hdr.dst_cid)
            self._reply_rst(hdr)
            return
        if self.groups.isdisjoint(target.groups):
            log.info("vsock cid %d: CID %d shares no group; refusing", self.guest_cid, hdr.dst_cid)
            self._reply_rst(hdr)
            return
        if not target.deliver_from_sibling(hdr, payload):
            self._reply_rst(hdr)

    def deliver_from_sibling(self, hdr: VsockHeader, payload: bytes) -> bool:
        """Queue a packet from a sibling VM for this guest (thread-safe).  False
        if this guest already has too much sibling traffic waiting."""
        with self._sibling_lock:
            if self._sibling_bytes + len(payload) > MAX_SIBLING_BYTES:
                log.warning("vsock cid %d: sibling backlog full; refusing a packet from CID %d",
                            self.guest_cid, hdr.src_cid)
                return False
            self._sibling_q.append([hdr, payload, 0])
            self._sibling_bytes += len(payload)
        if self.wakeup is not None:
            self.wakeup()
        return True

    def _next_sibling_packet(self, max_len: int) -> Packet | None:
        with self._sibling_lock:
            if not self._sibling_q:
                return None
            entry = self._sibling_q[0]
            hdr, payload, off = entry
            if hdr.op != Op.RW or not payload:
                self._sibling_q.popleft()
                return hdr, payload
            if max_len <= 0:
                return None
            chunk = payload[off:off + max_len]
            off += len(chunk)
            self._sibling_bytes -= len(chunk)
            last = off >= len(payload)
            if last:
                self._sibling_q.popleft()
            else:
                entry[2] = off
        flags = hdr.flags
        if hdr.type == SockType.SEQPACKET and not last:
            flags &= ~(SEQ_EOM | SEQ_EOR)  # message flags belong on the last fragment
        return VsockHeader(hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port, len(chunk), hdr.type,
                           hdr.op, flags, hdr.buf_alloc, hdr.fwd_cnt), chunk

    # ------------------------------------------------------------ device -> guest
    def has_rx_work(self) -> bool:
        """Is a packet for the guest ready?"""
        if self._rx_ctrl or self._sibling_q:
            return True
        while self._rx_ready:
            key = next(iter(self._rx_ready))
            conn = self._conns.get(key)
            if conn is not None and conn.rx_pending():
                return True
            del self._rx_ready[key]
        return False

    def next_rx_packet(self, max_len: int) -> Packet | None:
        """The next packet for the guest, with at most ``max_len`` payload bytes
        (the room an rx buffer has after the 44-byte header), or None."""
        if self._rx_ctrl:
            return self._rx_ctrl.popleft()
        self._turn ^= 1
        if self._turn and self._sibling_q:
            pkt = self._next_sibling_packet(max_len)
            if pkt is not None:
                return pkt
        while self._rx_ready:
            key = next(iter(self._rx_ready))
            del self._rx_ready[key]
            conn = self._conns.get(key)
            if conn is None or not conn.rx_pending():
                continue
            pkt = conn.next_packet(max_len)
            self._sync(conn)   # re-queues it if it has more, resumes reading, removes it if dead
            if pkt is not None:
                return pkt
        if self._sibling_q:
            return self._next_sibling_packet(max_len)
        return None

    def drain_rx(self, max_len: int = 4096 - HDR_SIZE, limit: int = 1 << 30) -> list[Packet]:
        """All ready packets (tests and simple callers)."""
        out: list[Packet] = []
        while len(out) < limit and self.has_rx_work():
            pkt = self.next_rx_packet(max_len)
            if pkt is None:
                break
            out.append(pkt)
        return out


class PollerWatcher:
    """An :class:`FdWatcher` over a :class:`~vhostuser.sys_util.poll.Poller`
    (token = fd), with :meth:`poll` to dispatch readiness to engines.  Used by
    the tests; the device glue has its own watcher on the worker's poller."""

    def __init__(self, poller) -> None:  # noqa: ANN001 - a sys_util Poller
        self.poller = poller
        self._events: dict[int, int] = {}

    def set_interest(self, fd: int, events: int) -> None:
        """Watch ``fd`` for ``events`` in the poller (0 stops watching)."""
        prev = self._events.get(fd, 0)
        if events == prev:
            return
        if not events:
            self.poller.unregister(fd)
            del self._events[fd]
        elif not prev:
            self.poller.register(fd, fd, events)
            self._events[fd] = events
        else:
            self.poller.modify(fd, fd, events)
            self._events[fd] = events

    def poll(self, engines: Iterable[VsockEngine], timeout: float | None) -> int:
        """Wait up to ``timeout`` and hand ready fds to whichever engine owns them;
        returns how many were ready."""
        ready = self.poller.wait(timeout)
        engines = list(engines)
        for token, _events in ready:
            for engine in engines:
                if token in engine._by_fd:  # noqa: SLF001 - same module
                    engine.handle_fd_ready(token)
                    break
        return len(ready)
