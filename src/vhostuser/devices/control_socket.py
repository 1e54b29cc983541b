"""A line-protocol control socket for device commands (sound, input).

:class:`LineServer` listens on a UNIX stream socket created with mode 0600
(only the owner may connect), serves several clients at once on a thread of
its own, and answers each request line with exactly one reply line from
``handler(line)``.  A handler that raises ``ValueError`` gets ``ERROR <reason>``
back; nothing else happens for that line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: longest request line accepted; a client sending more is disconnected
MAX_LINE = 4096


class LineServer:
    """Serve ``handler`` on the UNIX socket ``path`` (replacing a stale socket file)."""

    def __init__(self, path: str, handler: Callable[[str], str], *, name: str = "control") -> None:
        self.path = path
        self.handler = handler
        self.name = name
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others may connect
        try:
            self._listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listener.listen(8)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._buffers: dict[socket.socket, bytearray] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.data == "wake":
                    return
                if key.fileobj is self._listener:
                    self._accept()
                else:
                    self._serve(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._buffers[conn] = bytearray()
        self._selector.register(conn, selectors.EVENT_READ, "client")

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        self._buffers.pop(conn, None)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf = self._buffers[conn]
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self._answer(line.decode("utf-8", "replace").strip())
            try:
                conn.setblocking(True)
                conn.sendall(reply.encode() + b"\n")
                conn.setblocking(False)
            except OSError:
                self._drop(conn)
                return
        if len(buf) > MAX_LINE:
            log.warning("%s: request line longer than %d bytes, disconnecting the client", self.name, MAX_LINE)
            self._drop(conn)

    def _answer(self, line: str) -> str:
        try:
            return self.handler(line)
        except ValueError as exc:
            return f"ERROR {exc}"
        except Exception as exc:  # a bug in a handler must not end the server
            log.exception("%s: %r failed", self.name, line)
            return f"ERROR internal: {exc}"

    def close(self) -> None:
        """Stop serving, disconnect the clients and remove the socket file."""
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for conn in list(self._buffers):
            self._drop(conn)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def attach_control_socket(backend: Any, path: str, handler: Callable[[str], str], *, name: str) -> LineServer:
    """Serve ``handler`` on ``path`` for as long as ``backend`` lives: the server
    is closed before ``backend.close()`` runs (device commands close their
    back-ends when they stop)."""
    server = LineServer(path, handler, name=name)
    original_close = backend.close

    def close() -> None:
        server.close()
        original_close()

    backend.close = close
    return server


def request(path: str, line: str, timeout: float = 5.0) -> str:
    """Send one request line to a control socket and return its reply line (a client helper)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.decode().rstrip("\n")
