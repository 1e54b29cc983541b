"""Sockets for vhost-user: :class:`Listener` and :class:`Endpoint`.

This is the only socket code of the protocol layer.  An :class:`Endpoint` sends
and receives whole messages (with their fds) over a connected AF_UNIX stream
socket, using the sans-IO codec of :mod:`vhostuser.protocol.codec`.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Sequence

from .errors import Disconnected, FdPassingError, ControlMessageTruncated, MessageFramingError
from .protocol.codec import EOF, NEED_DATA, Decoder, Header, Message, encode
from .protocol.message import VERSION, BackendReq, FrontendReq, VhostUserHeaderFlag
from .sys_util.sock_ctrl_msg import MAX_FDS, recv_with_fds, send_with_fds

__all__ = ["Listener", "Endpoint", "ack_bytes"]

log = logging.getLogger(__name__)

_DISCONNECT_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}


def _wait(fd: int, events: str, deadline: float | None) -> None:
    """Block until ``fd`` is readable (``"r"``) or writable (``"w"``); TimeoutError at ``deadline``."""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        r, w, _ = select.select([fd] if events == "r" else [], [fd] if events == "w" else [], [], timeout)
        if r or w:
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("timed out waiting for the vhost-user peer")


class Listener:
    """A listening AF_UNIX socket at ``path``.

    A stale socket file (nobody accepting on it) is unlinked; a live one, or a
    path that is not a socket, raises :class:`OSError` (``EADDRINUSE`` /
    ``EEXIST``).  The liveness probe is a connect(), so the live listener sees
    one connection that closes without a message.  The socket file appears with ``mode`` (0600 by default),
    already listening (it is bound under a hidden name and renamed into place).  :meth:`close` unlinks the file if this listener created it.
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: int = 0o600, backlog: int = 1,
                 unlink_stale: bool = True) -> None:
        self.path: str | None = os.fspath(path)
        if unlink_stale:
            self._unlink_if_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind a hidden sibling, set its mode, listen, then rename it into place: the
        # path appears only once it has its mode and accepts connections
        head, tail = os.path.split(self.path)
        staging = os.path.join(head, f".{tail}.{os.getpid()}~")
        if len(os.fsencode(staging)) >= 104:  # sun_path is 104-108 bytes: bind in place
            staging = self.path
        try:
            sock.bind(staging)
            try:
                os.chmod(staging, mode)
                sock.listen(backlog)
                if staging != self.path:
                    os.rename(staging, self.path)
            except BaseException:
                if staging != self.path:
                    os.unlink(staging)
                raise
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._owns_path = True

    @classmethod
    def from_fd(cls, fd: int) -> Listener:
        """Adopt an already-listening socket fd (socket activation); takes ownership."""
        self = cls.__new__(cls)
        self._sock = socket.socket(fileno=fd)
        if self._sock.type != socket.SOCK_STREAM or self._sock.family != socket.AF_UNIX:
            self._sock.detach()
            raise OSError(errno.EINVAL, f"fd {fd} is not an AF_UNIX stream socket")
        name = self._sock.getsockname()
        self.path = name if isinstance(name, str) and name else None
        self._owns_path = False
        return self

    @staticmethod
    def _unlink_if_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.info("removing stale socket %s", path)
            os.unlink(path)
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")

    def fileno(self) -> int:
        """The listening socket's fd."""
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Accept one connection (blocking, or up to ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            _wait(self._sock.fileno(), "r", deadline)
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                continue
            conn.setblocking(True)
            return conn

    def accept_endpoint(self, timeout: float | None = None) -> Endpoint:
        """Accept a front-end: an :class:`Endpoint` that receives front-end requests."""
        return Endpoint(self.accept(timeout), FrontendReq, replies=False)

    def close(self) -> None:
        """Stop listening; unlink the socket file if we created it."""
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        if self._owns_path and self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Endpoint:
    """One side of a vhost-user connection: whole messages with fds.

    ``request_type`` is :class:`FrontendReq` on the main socket and
    :class:`BackendReq` on the back-end channel; ``replies`` says whether this
    side receives replies (front-end on the main socket, back-end on its channel)
    or requests.  EAGAIN and EINTR are retried; EOF, EPIPE and ECONNRESET raise
    :class:`Disconnected`.  Sending is serialised by a lock; receiving is meant
    for one thread.
    """

    def __init__(self, sock: socket.socket, request_type: type[FrontendReq] | type[BackendReq] = FrontendReq,
                 *, replies: bool = False) -> None:
        self._sock = sock
        self._decoder = Decoder(request_type, replies=replies)
        self._send_lock = threading.Lock()

    # ------------------------------------------------------------- creation
    @classmethod
    def from_fd(cls, fd: int, request_type: type[FrontendReq] | type[BackendReq] = FrontendReq,
                *, replies: bool = False) -> Endpoint:
        """Adopt an already-connected AF_UNIX stream socket fd (``--fd``); takes ownership."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise OSError(errno.EINVAL, f"fd {fd} is not an AF_UNIX stream socket")
        sock.setblocking(True)
        return cls(sock, request_type, replies=replies)

    @classmethod
    def connect(cls, path: str | os.PathLike[str], request_type: type[FrontendReq] | type[BackendReq] = FrontendReq,
                *, replies: bool = True) -> Endpoint:
        """Connect to a listening peer (by default as a front-end to a back-end)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock, request_type, replies=replies)

    # ---------------------------------------------------------------- basics
    @property
    def socket(self) -> socket.socket:
        """The underlying socket."""
        return self._sock

    def fileno(self) -> int:
        """The socket's fd (-1 once closed)."""
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Close the socket and any fds received but not yet handed out."""
        self._decoder.close()
        self._sock.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ send
    def send(self, msg: Message) -> None:
        """Send ``msg`` with its fds (the fds stay owned by the caller)."""
        self.send_bytes(encode(msg), msg.fds)

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send already-encoded message bytes; ``fds`` go with the first byte."""
        view = memoryview(data)
        with self._send_lock:
            try:
                while view:
                    try:
                        n = send_with_fds(self._sock, [view], fds)
                    except BlockingIOError:
                        _wait(self._sock.fileno(), "w", None)
                        continue
                    view = view[n:]
                    fds = ()
            except OSError as exc:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)) or exc.errno in _DISCONNECT_ERRNOS:
                    raise Disconnected(f"peer went away while sending: {exc}") from exc
                if exc.errno == errno.EBADF:
                    raise Disconnected("endpoint is closed") from exc
                raise

    # ------------------------------------------------------------------ recv
    def recv(self, timeout: float | None = None) -> Message:
        """Receive the next whole message.  The caller owns its fds.

        Raises :class:`Disconnected` at EOF, a :class:`RemoteProtocolError`
        subclass for an invalid message (its fds closed; the endpoint is still
        usable unless the error is a :class:`MessageFramingError`), or
        :class:`TimeoutError`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                result = self._decoder.next_message()
            except MessageFramingError as exc:
                if self._decoder_eof():
                    raise Disconnected(f"peer closed the connection mid-message ({exc})") from exc
                raise
            if isinstance(result, Message):
                return result
            if result is EOF:
                raise Disconnected("peer closed the connection")
            assert result is NEED_DATA
            self._fill(deadline)

    def _decoder_eof(self) -> bool:
        return self._decoder._eof  # noqa: SLF001 - same package, simple state

    def _fill(self, deadline: float | None) -> None:
        if self.closed:
            raise Disconnected("endpoint is closed")
        if deadline is not None:
            _wait(self._sock.fileno(), "r", deadline)
        try:
            data, fds = recv_with_fds(self._sock, self._decoder.bytes_needed, MAX_FDS)
        except BlockingIOError:
            _wait(self._sock.fileno(), "r", deadline)
            return
        except ControlMessageTruncated as exc:
            err = MessageFramingError(f"peer sent more than {MAX_FDS} fds with one message")
            self._decoder._error = err  # noqa: SLF001 - the stream is now unusable
            raise err from exc
        except FdPassingError:
            raise
        except OSError as exc:
            if isinstance(exc, ConnectionResetError) or exc.errno in _DISCONNECT_ERRNOS:
                raise Disconnected(f"connection reset: {exc}") from exc
            if exc.errno == errno.EBADF:
                raise Disconnected("endpoint is closed") from exc
            raise
        self._decoder.receive_data(data, fds)


def ack_bytes(request_code: int, value: int) -> bytes:
    """A REPLY_ACK for any request code, also one the table does not know."""
    return Header(request_code, VERSION | VhostUserHeaderFlag.REPLY, 8).pack() + struct.pack("=Q", value)
