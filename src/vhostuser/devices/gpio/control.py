"""The simulated chip's control socket: the host's side of the lines.

A UNIX stream socket speaking one text command per line, one reply line each::

    set LINE 0|1      drive input LINE (a number or a line name): "ok"
    get LINE          "LINE NAME dir=none|out|in value=V irq=TYPE"
    list              one "get" line per line, then "ok"

Errors answer ``error: ...``.  The listener and its connections are watched by
the back-end's worker thread (``register_fd``), so no thread of its own.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from ...fd_registry import FIRST_DEVICE_TOKEN
from .chip import GpioError
from .protocol import Direction, IrqType

if TYPE_CHECKING:
    from .device import GpioBackend

log = logging.getLogger(__name__)

LISTEN_TOKEN = FIRST_DEVICE_TOKEN
MAX_LINE = 4096


class ControlServer:
    """Serves the control socket at ``path`` for ``backend``."""

    def __init__(self, backend: GpioBackend, path: str) -> None:
        self.backend = backend
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.listener.bind(path)
            os.chmod(path, 0o600)
            self.listener.listen(4)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self._conns: dict[int, tuple[socket.socket, bytearray]] = {}
        self._next_token = LISTEN_TOKEN + 1
        backend.register_fd(self.listener.fileno(), LISTEN_TOKEN)

    def handle(self, token: int) -> None:
        """The worker saw ``token`` ready."""
        if token == LISTEN_TOKEN:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            tok = self._next_token
            self._next_token += 1
            self._conns[tok] = (conn, bytearray())
            self.backend.register_fd(conn.fileno(), tok)
            return
        entry = self._conns.get(token)
        if entry is None:
            return
        conn, buf = entry
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(token)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self.command(line.decode(errors="replace").strip())
            try:
                conn.setblocking(True)
                conn.settimeout(1.0)
                conn.sendall(reply.encode() + b"\n")
                conn.setblocking(False)
            except OSError:
                self._drop(token)
                return
        if len(buf) > MAX_LINE:
            log.warning("gpio control: command longer than %d bytes: connection closed", MAX_LINE)
            self._drop(token)

    def _drop(self, token: int) -> None:
        conn, _ = self._conns.pop(token)
        self.backend.unregister_fd(conn.fileno())
        conn.close()

    def _line(self, text: str) -> int:
        chip = self.backend.chip
        if text.isdigit():
            return int(text)
        names = chip.names
        if text in names:
            return names.index(text)
        raise GpioError(f"no line {text!r}")

    def describe(self, gpio: int) -> str:
        """One line's state as the control socket reports it (name, direction, value, irq)."""
        line = self.backend.chip.line(gpio)
        return (f"{gpio} {line.name or '-'} dir={Direction(line.direction).name.lower()} value={line.value} "
                f"irq={IrqType(line.irq_type).name.lower()}")

    def command(self, text: str) -> str:
        """Execute one command; returns the reply (without the newline)."""
        words = text.split()
        try:
            if len(words) == 3 and words[0] == "set":
                if words[2] not in ("0", "1"):
                    raise GpioError(f"level {words[2]!r} is not 0 or 1")
                self.backend.drive(self._line(words[1]), int(words[2]))
                return "ok"
            if len(words) == 2 and words[0] == "get":
                return self.describe(self._line(words[1]))
            if words == ["list"]:
                return "\n".join([*(self.describe(i) for i in range(self.backend.chip.ngpio)), "ok"])
        except GpioError as exc:
            log.info("gpio control: %r: %s", text, exc)
            return f"error: {exc}"
        log.info("gpio control: unknown command %r", text)
        return "error: commands are 'set LINE 0|1', 'get LINE', 'list'"

    def close(self) -> None:
        """Close every control connection and the listening socket."""
        for token in list(self._conns):
            self._drop(token)
        self.backend.unregister_fd(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
