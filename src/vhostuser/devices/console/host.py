"""The host side of a console port: where the guest's bytes go and where the
bytes for the guest come from.

* :class:`StdioHost` - the terminal the back-end runs in (``--backend nested``):
  raw mode when the input is a tty (restored on :meth:`close`), non-blocking fds.
* :class:`ListenerHost` - a listening socket (``--backend network``: TCP on
  127.0.0.1; ``--backend unix``: an AF_UNIX path); one client at a time, others
  wait in the listen backlog; the port survives clients coming and going.

Every operation is non-blocking: ``read`` returns ``None`` for "nothing now",
``b""`` when the host side went away; ``write`` returns the bytes taken (maybe
fewer than offered, maybe 0).  The device (:mod:`.device`) decides when to call
them from the fds' readiness.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import termios
from typing import Any
from collections.abc import Callable

from ...errors import ConsoleConfigError
from ...sys_util.fileops import restore_flags, set_nonblocking
from ...sys_util.poll import EVENT_READ, EVENT_WRITE

__all__ = ["HostEndpoint", "StdioHost", "ListenerHost", "tcp_listener", "unix_listener"]

log = logging.getLogger(__name__)

_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EIO, errno.ETIMEDOUT, errno.EHOSTUNREACH)


class HostEndpoint:
    """Base class: one port's host side."""

    #: keep the guest's output while nobody is connected (up to the port's backlog)
    keeps_backlog = True

    def describe(self) -> str:
        """Where the port is, for logs and the command's banner."""
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        """Bytes can flow (a client is attached / the terminal is there)."""
        raise NotImplementedError

    @property
    def readable(self) -> bool:
        """The input side is open (not at EOF)."""
        return self.connected

    @property
    def writable(self) -> bool:
        """The output side takes bytes (a client is attached / the terminal is open)."""
        return self.connected

    #: the connection failed (EPIPE, ECONNRESET...): the device drops the client
    broken = False

    def drop_client(self) -> None:
        """The input ended or the connection broke: let go of the client (the
        device has stopped watching its fd).  Listening endpoints listen again."""

    def interest(self, want_read: bool, want_write: bool) -> dict[int, int]:
        """fd -> selector events the port needs watched now."""
        raise NotImplementedError

    def accept(self) -> bool:
        """Take a waiting client, if this endpoint listens; True if one arrived."""
        return False

    def read(self, n: int) -> bytes | None:
        """Up to ``n`` bytes; ``None``: nothing now; ``b""``: the input ended
        (the endpoint is then not :attr:`readable`)."""
        raise NotImplementedError

    def write(self, data: bytes | memoryview) -> int:
        """Write what the host side takes now (0 if nothing); on a broken
        connection 0, and :attr:`broken` is set."""
        raise NotImplementedError

    def close(self) -> None:
        """Release fds, restore the terminal, remove socket files.  Idempotent."""


class StdioHost(HostEndpoint):
    """The terminal (or any pair of pipes / sockets) the back-end runs in.

    A tty is reopened by name (``os.ttyname``): the new open file description is
    non-blocking without making the shell's stdin/stdout non-blocking.  Other fds
    get O_NONBLOCK, restored on :meth:`close`.  With ``raw`` and a tty input the
    terminal is put in raw mode (every key, Ctrl-C included, goes to the guest)
    and restored on :meth:`close`.  ``escape`` (a byte, tty input only) ends the
    session: ``on_escape`` is called and the rest of that read is dropped.
    """

    keeps_backlog = False  # the terminal is always there: nothing to keep

    def __init__(self, in_fd: int = 0, out_fd: int = 1, *, raw: bool = True, escape: int | None = 0x1D,
                 on_escape: Callable[[], None] | None = None) -> None:
        self._in_orig, self._out_orig = in_fd, out_fd
        self._owned: list[int] = []
        self._restore_flags: list[tuple[int, int]] = []
        self._saved_termios: list | None = None
        self._in_tty = os.isatty(in_fd)
        self.escape = escape if self._in_tty else None
        self.on_escape = on_escape
        self.in_open = True
        self.out_open = True
        try:
            self.in_fd = self._prepare(in_fd)
            if os.isatty(out_fd) and self._in_tty and os.ttyname(out_fd) == os.ttyname(in_fd):
                self.out_fd = self.in_fd
            else:
                self.out_fd = self._prepare(out_fd)
            if raw and self._in_tty:
                self._saved_termios = termios.tcgetattr(in_fd)
                termios.tcsetattr(in_fd, termios.TCSAFLUSH, _raw_mode(self._saved_termios))
            if stat.S_ISREG(os.fstat(self.in_fd).st_mode):
                raise ConsoleConfigError("the nested backend's input cannot be a regular file (use a pipe: cat FILE |)")
        except BaseException:
            self.close()
            raise

    def _prepare(self, fd: int) -> int:
        if os.isatty(fd):
            new = os.open(os.ttyname(fd), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._owned.append(new)
            return new
        self._restore_flags.append((fd, set_nonblocking(fd)))
        return fd

    def describe(self) -> str:
        return "this terminal" if self._in_tty else f"fds {self._in_orig}/{self._out_orig}"

    @property
    def connected(self) -> bool:
        return self.out_open or self.in_open

    @property
    def readable(self) -> bool:
        return self.in_open

    @property
    def writable(self) -> bool:
        return self.out_open

    def interest(self, want_read: bool, want_write: bool) -> dict[int, int]:
        out: dict[int, int] = {}
        if want_read and self.in_open:
            out[self.in_fd] = EVENT_READ
        if want_write and self.out_open:
            out[self.out_fd] = out.get(self.out_fd, 0) | EVENT_WRITE
        return out

    def read(self, n: int) -> bytes | None:
        if not self.in_open:
            return b""
        try:
            data = os.read(self.in_fd, n)
        except BlockingIOError:
            return None
        except OSError as exc:
            log.warning("console input: %s; no more input", exc)
            data = b""
        if not data:
            log.info("console input reached end of file")
            self.in_open = False
            return b""
        if self.escape is not None:
            k = data.find(bytes([self.escape]))
            if k >= 0:
                log.info("escape character read: ending the session")
                self.in_open = False
                if self.on_escape is not None:
                    self.on_escape()
                return data[:k] or b""
        return data

    def write(self, data: bytes | memoryview) -> int:
        if not self.out_open:
            return 0
        try:
            return os.write(self.out_fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.warning("console output: %s; the guest's output is discarded from now on", exc)
            self.out_open = False
            return 0

    def close(self) -> None:
        if self._saved_termios is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self._in_orig, termios.TCSAFLUSH, self._saved_termios)
            self._saved_termios = None
        for fd, flags in self._restore_flags:
            with contextlib.suppress(OSError):
                restore_flags(fd, flags)
        self._restore_flags = []
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned = []
        self.in_open = self.out_open = False


def _raw_mode(attrs: list[Any]) -> list[Any]:
    """``cfmakeraw`` on a copy of tcgetattr's list."""
    new: list[Any] = [list(a) if isinstance(a, list) else a for a in attrs]
    iflag, oflag, cflag, lflag = 0, 1, 2, 3
    new[iflag] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                    | termios.IGNCR | termios.ICRNL | termios.IXON)
    new[oflag] &= ~termios.OPOST
    new[lflag] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    new[cflag] = (new[cflag] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = new[6]
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return new


class ListenerHost(HostEndpoint):
    """A listening socket; the accepted client (one at a time) is the host side."""

    def __init__(self, listener: socket.socket, *, unlink_path: str | None = None) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.conn: socket.socket | None = None
        self._unlink = unlink_path
        self.clients = 0

    @property
    def address(self) -> str | tuple[str, int]:
        """The bound address (TCP: ``(host, port)``, useful with port 0)."""
        return self.listener.getsockname()

    def describe(self) -> str:
        addr = self.address
        return f"tcp {addr[0]}:{addr[1]}" if isinstance(addr, tuple) else f"unix {addr}"

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def interest(self, want_read: bool, want_write: bool) -> dict[int, int]:
        if self.conn is None:
            return {self.listener.fileno(): EVENT_READ}
        events = (EVENT_READ if want_read else 0) | (EVENT_WRITE if want_write else 0)
        return {self.conn.fileno(): events} if events else {}

    def accept(self) -> bool:
        if self.conn is not None:
            return False
        try:
            conn, peer = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("%s: accept failed: %s", self.describe(), exc)
            return False
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        self.clients += 1
        log.info("%s: client %s connected", self.describe(), peer or "(unix)")
        return True

    def drop_client(self) -> None:
        """Close the client connection (the port then listens again)."""
        self.broken = False
        if self.conn is not None:
            log.info("%s: client disconnected", self.describe())
            self.conn.close()
            self.conn = None

    def read(self, n: int) -> bytes | None:
        if self.conn is None:
            return b""
        try:
            data = self.conn.recv(n)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno not in _GONE:
                log.warning("%s: recv: %s", self.describe(), exc)
            data = b""
        return data

    def write(self, data: bytes | memoryview) -> int:
        if self.conn is None or self.broken:
            return 0
        try:
            return self.conn.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno not in _GONE:
                log.warning("%s: send: %s", self.describe(), exc)
            self.broken = True
            return 0

    def close(self) -> None:
        self.drop_client()
        if self.listener.fileno() >= 0:
            self.listener.close()
        if self._unlink is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unlink)
            self._unlink = None


def tcp_listener(port: int, host: str = "127.0.0.1") -> ListenerHost:
    """Listen on ``host:port`` (port 0: any free port; see :attr:`ListenerHost.address`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise ConsoleConfigError(f"cannot listen on tcp {host}:{port}: {exc.strerror or exc}") from exc
    return ListenerHost(sock)


def unix_listener(path: str) -> ListenerHost:
    """Listen on the AF_UNIX socket ``path`` (a stale socket file is replaced;
    the file is removed on close)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise ConsoleConfigError(f"cannot listen on unix {path}: {exc.strerror or exc}") from exc
    return ListenerHost(sock, unlink_path=path)
