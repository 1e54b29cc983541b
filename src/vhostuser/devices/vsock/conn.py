"""One vsock connection between the guest and a host-side AF_UNIX socket.

:class:`VsockConnection` is the per-connection state machine of the hybrid
vsock device: it owns the host socket (non-blocking), does the credit
accounting of both directions, and produces the packets the guest must
receive.  It never touches a virtqueue; the engine moves packets between it
and the rings.

Credit (VIRTIO 1.3 §5.10.6.3), in both directions:

* **guest -> host** (tx): we advertise ``buf_alloc`` (the tx buffer size) and
  ``fwd_cnt`` (bytes we have written to the host socket).  The guest may have
  at most ``buf_alloc`` bytes in flight, so what we buffer for a slow host
  socket is bounded by ``buf_alloc``; a guest that sends more is reset.  When
  the guest's view of our free space falls below a quarter of ``buf_alloc``
  and we have forwarded bytes since the last header it saw, we send a
  CREDIT_UPDATE so it never stalls on stale credit.
* **host -> guest** (rx): every guest packet carries its ``buf_alloc`` and
  ``fwd_cnt``; we never send more RW payload than
  ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``.  With no credit left we send
  one CREDIT_REQUEST and wait for the guest's update.

Host-side reads are bounded too: at most ``rx_buffer_size`` bytes are read
ahead from the host socket; when that much waits for the guest (no credit, or
no rx buffers), the engine stops polling the socket, so the host writer blocks
in its kernel socket buffer - backpressure, never loss.
"""
from __future__ import annotations

import collections
import enum
import errno
import logging
import socket
from typing import Final

from ...sys_util.sockstate import socket_peer_state
from .packet import (
    HOST_CID,
    SEQ_EOM,
    SEQ_EOR,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Op,
    SockType,
    VsockHeader,
)

log = logging.getLogger(__name__)

_U32: Final = 0xFFFF_FFFF
#: one recv() from a host stream socket reads at most this much
_READ_CHUNK: Final = 64 * 1024
#: the largest host SOCK_SEQPACKET message we read when its size cannot be probed
_MAX_SEQ_MESSAGE: Final = 1 << 20
_DISCONNECT_ERRNOS: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED})


class ConnState(enum.Enum):
    """Life cycle of a :class:`VsockConnection`."""

    #: host-initiated: REQUEST queued/sent to the guest, waiting for RESPONSE
    CONNECTING = "connecting"
    #: data flows (each direction may be shut down separately)
    ESTABLISHED = "established"
    #: the host socket is closed; an RST for the guest is pending
    RESETTING = "resetting"
    #: gone: the engine forgets the connection
    CLOSED = "closed"


class VsockConnection:
    """A connection identified by ``(local_port, peer_port)`` on the host side.

    ``local`` is the host end (CID 2, ``local_port``); ``peer`` is the guest end
    (``guest_cid``, ``peer_port``).
    """

    def __init__(self, sock: socket.socket, *, sock_type: int, guest_cid: int, local_port: int,
                 peer_port: int, buf_alloc: int, rx_buffer_size: int, host_initiated: bool,
                 peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0) -> None:
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.sock_type = int(sock_type)
        self.guest_cid = guest_cid
        self.local_port = local_port
        self.peer_port = peer_port
        self.host_initiated = host_initiated
        self.state = ConnState.CONNECTING if host_initiated else ConnState.ESTABLISHED
        # --- our receive side (guest -> host)
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0                  # bytes delivered to the host socket (u32 wrapping)
        self.last_fwd_cnt_sent = 0        # fwd_cnt in the last header the guest got
        self.guest_rx_cnt = 0             # bytes received from the guest (u32 wrapping)
        self._tx_chunks: collections.deque[tuple[memoryview, bool]] = collections.deque()
        self.tx_buffered = 0              # bytes waiting for the host socket
        self._seq_partial = bytearray()   # seqpacket: guest message being assembled
        # --- the guest's receive side (host -> guest)
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        self.tx_cnt = 0                   # RW bytes sent to the guest (u32 wrapping)
        self.rx_buffer_size = rx_buffer_size
        self._rx_stream = bytearray()
        self._rx_msgs: collections.deque[bytes] = collections.deque()
        self._rx_msg_off = 0
        self.rx_buffered = 0
        # --- pending control packets for the guest
        self.pending_request = host_initiated
        self.pending_response = not host_initiated
        self.pending_credit_update = False
        self.credit_request_sent = False
        # --- shutdown state
        self.guest_shutdown = 0           # SHUTDOWN flags the guest sent us
        self.host_eof = False             # the host socket reached EOF
        self.shutdown_to_send = 0         # SHUTDOWN flags to send once buffered data is out
        self.shutdown_sent = 0            # SHUTDOWN flags already sent to the guest
        self._host_wr_shut = False
        self._close_after_flush = False   # guest shut both ways: flush, close, RST

    # ------------------------------------------------------------ identity
    @property
    def key(self) -> tuple[int, int]:
        """``(local_port, peer_port)``: how the engine finds this connection."""
        return (self.local_port, self.peer_port)

    def __repr__(self) -> str:
        return (f"<VsockConnection {HOST_CID}:{self.local_port} <-> {self.guest_cid}:{self.peer_port} "
                f"{SockType(self.sock_type).name.lower()} {self.state.value}>")

    # ------------------------------------------------------------ credit
    def peer_credit(self) -> int:
        """RW bytes the guest can take now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def _guest_view_of_free(self) -> int:
        return self.buf_alloc - ((self.guest_rx_cnt - self.last_fwd_cnt_sent) & _U32)

    def _forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & _U32
        if self._guest_view_of_free() < self.buf_alloc // 4 and self.fwd_cnt != self.last_fwd_cnt_sent:
            self.pending_credit_update = True

    # ------------------------------------------------------------ interest
    def wants_read(self) -> bool:
        """Should the engine poll the host socket for readability?"""
        return (self.sock is not None and self.state is ConnState.ESTABLISHED and not self.host_eof
                and not self.guest_shutdown & SHUTDOWN_RCV and not self._close_after_flush
                and self.rx_buffered < self.rx_buffer_size)

    def wants_write(self) -> bool:
        """Should the engine poll the host socket for writability?"""
        return self.sock is not None and self.tx_buffered > 0

    @property
    def dead(self) -> bool:
        """Nothing left to do: the engine forgets the connection."""
        return self.state is ConnState.CLOSED

    # ------------------------------------------------------------ closing
    def close_socket(self) -> None:
        """Close the host socket (the engine unwatches it first)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._tx_chunks.clear()
        self.tx_buffered = 0

    def reset(self, reason: str) -> None:
        """Abort: close the host socket, tell the guest with RST."""
        if self.state in (ConnState.RESETTING, ConnState.CLOSED):
            return
        log.debug("%r: reset (%s)", self, reason)
        self.close_socket()
        self._drop_rx()
        self.state = ConnState.RESETTING

    def _drop_rx(self) -> None:
        self._rx_stream.clear()
        self._rx_msgs.clear()
        self._rx_msg_off = 0
        self.rx_buffered = 0

    # ------------------------------------------------------------ guest -> host
    def on_guest_packet(self, hdr: VsockHeader, payload: bytes) -> None:
        """Apply a packet the guest sent on this connection."""
        # every packet refreshes the guest's credit information
        old_credit = self.peer_credit()
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        if self.peer_credit() > old_credit or self.peer_credit() > 0:
            self.credit_request_sent = False
        if self.state in (ConnState.RESETTING, ConnState.CLOSED):
            if hdr.op == Op.RST:
                self.state = ConnState.CLOSED
            return
        op = hdr.op
        if op == Op.RST:
            log.debug("%r: guest reset", self)
            self.close_socket()
            self.state = ConnState.CLOSED
        elif op == Op.RESPONSE:
            self._on_response()
        elif op == Op.RW:
            self._on_rw(hdr, payload)
        elif op == Op.CREDIT_UPDATE:
            pass  # credit refreshed above
        elif op == Op.CREDIT_REQUEST:
            self.pending_credit_update = True
        elif op == Op.SHUTDOWN:
            self._on_shutdown(hdr.flags)
        else:  # REQUEST on an existing connection
            self.reset(f"unexpected {Op(op).name} on an open connection")

    def _on_response(self) -> None:
        if self.state is not ConnState.CONNECTING:
            self.reset("RESPONSE on an established connection")
            return
        self.state = ConnState.ESTABLISHED
        line = f"OK {self.local_port}\n".encode()
        self._queue_tx(line, counted=False)
        self.flush()

    def _on_rw(self, hdr: VsockHeader, payload: bytes) -> None:
        if self.state is not ConnState.ESTABLISHED:
            self.reset("RW before the connection was established")
            return
        if self.guest_shutdown & SHUTDOWN_SEND:
            self.reset("RW after the guest shut down its sending side")
            return
        held = (self.guest_rx_cnt - self.fwd_cnt) & _U32
        if held + len(payload) > self.buf_alloc:
            log.warning("%r: guest exceeded our credit (%d held + %d > buf_alloc %d); resetting",
                        self, held, len(payload), self.buf_alloc)
            self.reset("credit violation")
            return
        self.guest_rx_cnt = (self.guest_rx_cnt + len(payload)) & _U32
        if self.sock_type == SockType.SEQPACKET:
            self._seq_partial += payload
            if hdr.flags & (SEQ_EOM | SEQ_EOR):
                message = bytes(self._seq_partial)
                self._seq_partial.clear()
                self._queue_tx(message, counted=True)
        elif payload:
            self._queue_tx(payload, counted=True)
        self.flush()

    def _on_shutdown(self, flags: int) -> None:
        flags &= SHUTDOWN_BOTH
        self.guest_shutdown |= flags
        if self.guest_shutdown & SHUTDOWN_RCV:
            # the guest will not read any more: drop what we hold, make the host's
            # further writes fail (AF_UNIX: EPIPE) instead of piling up
            self._drop_rx()
            self._shutdown_host(socket.SHUT_RD)
            self._discard_host_input()
        if self.guest_shutdown == SHUTDOWN_BOTH:
            self._close_after_flush = True
        self._check_both_done()
        self._after_flush()

    def _shutdown_host(self, how: int) -> None:
        if self.sock is None:
            return
        try:
            self.sock.shutdown(how)
        except OSError as exc:
            log.debug("%r: shutdown(%d): %s", self, how, exc)

    def _discard_host_input(self) -> None:
        """Throw away what the host already queued for a guest that will not read:
        that frees the host writer's socket buffer, so a writer blocked in poll()
        wakes up and gets EPIPE instead of hanging."""
        if self.sock is None:
            return
        for _ in range(256):
            try:
                if not self.sock.recv(_READ_CHUNK):
                    return
            except OSError:  # EAGAIN: queue empty; anything else: nothing to discard
                return

    def _queue_tx(self, data: bytes, *, counted: bool) -> None:
        self._tx_chunks.append((memoryview(data), counted))
        self.tx_buffered += len(data)

    def flush(self) -> None:
        """Write buffered guest data to the host socket, as much as it takes."""
        sock = self.sock
        while sock is not None and self._tx_chunks:
            chunk, counted = self._tx_chunks[0]
            try:
                n = sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    self.reset(f"host refused a {len(chunk)}-byte message: {exc}")
                elif exc.errno in _DISCONNECT_ERRNOS:
                    self.reset(f"host socket closed for writing: {exc}")
                else:
                    self.reset(f"host socket write failed: {exc}")
                return
            if self.sock_type == SockType.SEQPACKET or n == len(chunk):
                self._tx_chunks.popleft()
                n = len(chunk)
            else:
                self._tx_chunks[0] = (chunk[n:], counted)
            self.tx_buffered -= n
            if counted:
                self._forwarded(n)
        self._after_flush()

    def _after_flush(self) -> None:
        if self.tx_buffered or self.sock is None:
            return
        self._check_both_done()
        if self._close_after_flush:
            # clean disconnect: the guest shut down both ways; everything it sent is
            # delivered.  Close the host socket and answer with RST (§5.10.6.6).
            self.close_socket()
            self._drop_rx()
            self.state = ConnState.RESETTING
        elif self.guest_shutdown & SHUTDOWN_SEND and not self._host_wr_shut:
            self._host_wr_shut = True
            self._shutdown_host(socket.SHUT_WR)

    # ------------------------------------------------------------ host -> guest
    def on_readable(self) -> None:
        """The host socket is readable: read ahead up to ``rx_buffer_size``."""
        if not self.wants_read():
            return
        assert self.sock is not None
        room = self.rx_buffer_size - self.rx_buffered
        try:
            if self.sock_type == SockType.SEQPACKET:
                data = self._recv_message()
            else:
                data = self.sock.recv(min(room, _READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.reset(f"host socket read failed: {exc}")
            return
        if data is None:
            return
        if not data:
            self._on_host_eof()
            return
        if self.sock_type == SockType.SEQPACKET:
            if len(data) > self.peer_buf_alloc:
                log.warning("%r: host message of %d bytes exceeds the guest's buffer (%d); resetting",
                            self, len(data), self.peer_buf_alloc)
                self.reset("message larger than the guest's buf_alloc")
                return
            self._rx_msgs.append(data)
        else:
            self._rx_stream += data
        self.rx_buffered += len(data)

    def _recv_message(self) -> bytes | None:
        """One whole SOCK_SEQPACKET message (b"" for EOF, None if it was an empty message)."""
        assert self.sock is not None
        size = _MAX_SEQ_MESSAGE
        trunc = getattr(socket, "MSG_TRUNC", 0)
        if trunc:
            scratch = bytearray(1)
            size = self.sock.recv_into(scratch, 1, socket.MSG_PEEK | trunc)
        if size == 0:
            # zero bytes: EOF, or a zero-length message (skipped: it carries no data)
            data = self.sock.recv(1)
            if data or not socket_peer_state(self.sock.fileno()).send_shut:
                return None if not data else data
            return b""
        return self.sock.recv(max(size, 1))

    def _on_host_eof(self) -> None:
        self.host_eof = True
        flags = SHUTDOWN_SEND
        if self.sock is not None and socket_peer_state(self.sock.fileno()).both_shut:
            flags |= SHUTDOWN_RCV
        log.debug("%r: host EOF (%s close)", self, "full" if flags == SHUTDOWN_BOTH else "half")
        self.shutdown_to_send |= flags
        self._check_both_done()

    def _check_both_done(self) -> None:
        # the host sent EOF and the guest shut its sending side: nothing can flow any
        # more, so tell the guest we are done both ways (it then answers with RST).
        # Not while guest data still waits for the host socket: the guest's RST
        # would make us drop it (_after_flush calls this again once it is out).
        if self.host_eof and self.guest_shutdown & SHUTDOWN_SEND and not self.tx_buffered:
            self.shutdown_to_send |= SHUTDOWN_BOTH

    def has_rx_data(self) -> bool:
        """Whether bytes from the host side wait to be sent to the guest."""
        return self.rx_buffered > 0

    def rx_pending(self) -> bool:
        """Does the connection have a packet for the guest right now?"""
        if self.state is ConnState.CLOSED:
            return False
        if self.state is ConnState.RESETTING:
            return True
        if self.pending_request or self.pending_response or self.pending_credit_update:
            return True
        if self.state is not ConnState.ESTABLISHED:
            return False
        if self.rx_buffered:
            return self.peer_credit() > 0 or not self.credit_request_sent
        return bool(self.shutdown_to_send & ~self.shutdown_sent)

    def next_packet(self, max_len: int) -> tuple[VsockHeader, bytes] | None:
        """The next packet for the guest, with at most ``max_len`` payload bytes."""
        if self.state is ConnState.RESETTING:
            self.state = ConnState.CLOSED
            return self._header(Op.RST, buf_alloc=0, fwd_cnt=0), b""
        if self.state is ConnState.CLOSED:
            return None
        if self.pending_request:
            self.pending_request = False
            return self._header(Op.REQUEST), b""
        if self.pending_response:
            self.pending_response = False
            return self._header(Op.RESPONSE), b""
        if self.state is ConnState.ESTABLISHED and self.rx_buffered:
            credit = self.peer_credit()
            if credit > 0 and max_len > 0:
                return self._data_packet(min(credit, max_len))
            if credit == 0 and not self.credit_request_sent:
                self.credit_request_sent = True
                return self._header(Op.CREDIT_REQUEST), b""
        if self.pending_credit_update:
            return self._header(Op.CREDIT_UPDATE), b""
        if self.state is ConnState.ESTABLISHED and not self.rx_buffered:
            flags = self.shutdown_to_send & ~self.shutdown_sent
            if flags:
                self.shutdown_sent |= flags
                return self._header(Op.SHUTDOWN, flags=self.shutdown_sent), b""
        return None

    def _data_packet(self, limit: int) -> tuple[VsockHeader, bytes]:
        flags = 0
        if self.sock_type == SockType.SEQPACKET:
            msg = self._rx_msgs[0]
            chunk = msg[self._rx_msg_off:self._rx_msg_off + limit]
            self._rx_msg_off += len(chunk)
            if self._rx_msg_off >= len(msg):
                self._rx_msgs.popleft()
                self._rx_msg_off = 0
                flags = SEQ_EOM
        else:
            chunk = bytes(self._rx_stream[:limit])
            del self._rx_stream[:limit]
        self.rx_buffered -= len(chunk)
        self.tx_cnt = (self.tx_cnt + len(chunk)) & _U32
        return self._header(Op.RW, length=len(chunk), flags=flags), chunk

    def _header(self, op: Op, *, length: int = 0, flags: int = 0, buf_alloc: int | None = None,
                fwd_cnt: int | None = None) -> VsockHeader:
        # every packet tells the guest our credit: a pending CREDIT_UPDATE is implied
        self.pending_credit_update = False
        self.last_fwd_cnt_sent = self.fwd_cnt
        return VsockHeader(
            src_cid=HOST_CID, dst_cid=self.guest_cid, src_port=self.local_port, dst_port=self.peer_port,
            len=length, type=self.sock_type, op=int(op), flags=flags,
            buf_alloc=self.buf_alloc if buf_alloc is None else buf_alloc,
            fwd_cnt=self.fwd_cnt if fwd_cnt is None else fwd_cnt,
        )
