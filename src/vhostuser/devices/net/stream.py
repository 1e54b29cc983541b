"""``StreamPort``: a switch port on a UNIX stream socket with the framing of
QEMU's ``-netdev stream`` (QEMU >= 7.2): every frame is preceded by its length
as a 4-byte big-endian integer.  So a VM with a stock QEMU NIC joins the switch::

    vhostuser net -s /tmp/net.sock -c 2 --stream /tmp/net-stream.sock
    qemu-system-x86_64 ... -netdev stream,id=s0,server=off,addr.type=unix,addr.path=/tmp/net-stream.sock \\
        -device virtio-net-pci,netdev=s0

One peer at a time; when it leaves, the next may connect.  Frames to the port
are queued (at most ``max_pending`` bytes; more are dropped and counted) and
written without blocking the switch.  A peer that sends a length shorter than
an Ethernet header or longer than a frame can be is disconnected (logged).
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

from .defs import ETH_HLEN, MAX_FRAME_LEN

if TYPE_CHECKING:
    from .switch import L2Switch, SwitchPort

log = logging.getLogger(__name__)


class StreamPort:
    """A listening UNIX socket attached to an :class:`~.switch.L2Switch`."""

    def __init__(self, path: str, switch: L2Switch, *, max_pending: int = 4 << 20) -> None:
        self.path = path
        self.switch = switch
        self.max_pending = max_pending
        self.drops: Counter[str] = Counter()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
            self.listener.listen(1)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self.conn: socket.socket | None = None
        self._out = bytearray()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self.port: SwitchPort = switch.add_port(self, name=f"stream:{path}")
        self._thread = threading.Thread(target=self._loop, name="vhostuser-net-stream", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ switch -> peer
    def deliver(self, frame: bytes) -> bool:
        """Send ``frame`` to the connected peer; False if none is connected or the send failed."""
        with self._lock:
            if self.conn is None:
                self.drops["stream-no-peer"] += 1
                return False
            if len(self._out) + len(frame) + 4 > self.max_pending:
                self.drops["stream-full"] += 1
                return False
            was_empty = not self._out
            self._out += len(frame).to_bytes(4, "big") + frame
            self._flush_locked()
            wake = was_empty and bool(self._out)
        if wake:  # the thread now waits for the socket to become writable
            self._wake()
        return True

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _flush_locked(self) -> None:
        conn = self.conn
        if conn is None or not self._out:
            return
        try:
            sent = conn.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("stream peer on %s: send failed: %s", self.path, exc)
            self._close_conn_locked()
            return
        del self._out[:sent]

    def _close_conn_locked(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._out.clear()

    # ------------------------------------------------------------ peer -> switch
    def _loop(self) -> None:
        inbuf = bytearray()
        while not self._stopping:
            with self._lock:
                conn = self.conn
                want_out = bool(self._out)
            rlist: list[Any] = [self._wake_r]
            wlist: list[Any] = []
            if conn is None:
                rlist.append(self.listener)
            else:
                rlist.append(conn)
                if want_out:
                    wlist.append(conn)
            readable, writable, _ = select.select(rlist, wlist, [])
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if self._stopping:
                return
            if conn is None and self.listener in readable:
                try:
                    new, _ = self.listener.accept()
                except BlockingIOError:
                    continue
                new.setblocking(False)
                with self._lock:
                    self.conn = new
                inbuf.clear()
                log.info("stream peer connected on %s", self.path)
                continue
            if conn is not None and conn in writable:
                with self._lock:
                    self._flush_locked()
            if conn is not None and conn in readable:
                if not self._read(conn, inbuf):
                    with self._lock:
                        if self.conn is conn:
                            self._close_conn_locked()
                    inbuf.clear()

    def _read(self, conn: socket.socket, inbuf: bytearray) -> bool:
        """Read what is there and pass complete frames on; False: the peer is gone."""
        try:
            data = conn.recv(1 << 18)
        except BlockingIOError:
            return True
        except OSError as exc:
            log.warning("stream peer on %s: %s", self.path, exc)
            return False
        if not data:
            log.info("stream peer on %s left", self.path)
            return False
        inbuf += data
        pos = 0
        while len(inbuf) - pos >= 4:
            length = int.from_bytes(inbuf[pos:pos + 4], "big")
            if not ETH_HLEN <= length <= MAX_FRAME_LEN:
                log.error("stream peer on %s sent a frame length of %d: disconnected", self.path, length)
                self.drops["stream-bad-length"] += 1
                return False
            if len(inbuf) - pos - 4 < length:
                break
            frame = bytes(inbuf[pos + 4:pos + 4 + length])
            pos += 4 + length
            self.switch.input(self.port, frame)
        del inbuf[:pos]
        return True

    def close(self) -> None:
        """Stop the thread, close the sockets and remove the socket file."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            self._close_conn_locked()
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
