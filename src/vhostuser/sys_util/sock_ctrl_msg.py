"""Send and receive file descriptors over AF_UNIX sockets with SCM_RIGHTS (port of
vmm-sys-util's ``sock_ctrl_msg``).

The fds travel with the first byte of the data they are sent with, so a
receiver may get them together with a short read; the remaining bytes arrive
later without fds.

Every received fd is close-on-exec: with ``MSG_CMSG_CLOEXEC`` where the system has
it (set atomically by the kernel), else by ``fcntl(FD_CLOEXEC)`` right after
receipt.  Force either with ``cmsg_cloexec=`` or ``VHOSTUSER_CMSG_CLOEXEC=0|1``.

Received fds are closed on every error path (truncated or malformed control
data, failure to set CLOEXEC), so a failing receive never leaks.
"""
from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Sequence
from typing import Final, Union

from ..errors import ControlMessageTruncated, FdPassingError, UnsupportedVariant

__all__ = [
    "ENV_VAR",
    "HAVE_MSG_CMSG_CLOEXEC",
    "MAX_FDS",
    "recv_into_with_fds",
    "recv_with_fds",
    "send_with_fds",
]

log = logging.getLogger(__name__)

#: The number of fds one message is guaranteed to carry (vhost-user needs up to 32,
#: e.g. SET_MEM_TABLE with the maximum number of regions).
MAX_FDS: Final = 32
ENV_VAR: Final = "VHOSTUSER_CMSG_CLOEXEC"
#: Whether this system has ``MSG_CMSG_CLOEXEC`` (Linux, FreeBSD; not macOS).
HAVE_MSG_CMSG_CLOEXEC: Final = hasattr(socket, "MSG_CMSG_CLOEXEC")
_FD_SIZE: Final = array.array("i").itemsize

Buffer = Union[bytes, bytearray, memoryview]


def _use_cmsg_cloexec(requested: bool | None) -> bool:
    """The argument if given, else ``$VHOSTUSER_CMSG_CLOEXEC`` (0/1), else the probe."""
    source = "cmsg_cloexec"
    if requested is None:
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            return HAVE_MSG_CMSG_CLOEXEC
        if raw not in ("0", "1"):
            raise UnsupportedVariant(f"{ENV_VAR}={raw!r}: expected 0 or 1")
        requested, source = raw == "1", ENV_VAR
    if requested and not HAVE_MSG_CMSG_CLOEXEC:
        raise UnsupportedVariant(f"MSG_CMSG_CLOEXEC ({source}) is not available on this system")
    return requested


def send_with_fds(sock: socket.socket, buffers: Sequence[Buffer], fds: Sequence[int] = ()) -> int:
    """Send ``buffers`` (gathered) with ``fds`` attached; return the number of bytes sent.

    The fds stay owned by the caller (the kernel duplicates them into the message).
    They need at least one byte of data to travel with.  On a stream socket fewer
    bytes than given may be sent (non-blocking socket, or a signal); the fds went
    with the first byte, so the caller sends the rest without them.  ``EINTR`` is
    retried; a non-blocking socket that cannot send raises ``BlockingIOError``.
    """
    ancdata = []
    if fds:
        if not any(memoryview(b).nbytes for b in buffers):
            raise ValueError("file descriptors must be sent with at least one byte of data")
        ancdata.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    while True:
        try:
            return sock.sendmsg(buffers, ancdata)
        except InterruptedError:  # only reached if PEP 475's own retry is bypassed
            continue


def recv_with_fds(
    sock: socket.socket, size: int, max_fds: int, *, cmsg_cloexec: bool | None = None
) -> tuple[bytes, list[int]]:
    """Receive up to ``size`` bytes and up to ``max_fds`` fds; ``b""`` means end of file.

    The caller owns the returned fds (all CLOEXEC).  If the peer sent more than
    ``max_fds`` fds, every fd that arrived is closed and
    :class:`~vhostuser.errors.ControlMessageTruncated` is raised; the bytes of that
    message are consumed, so the stream should be treated as broken.  ``EINTR`` is
    retried; on a non-blocking socket with nothing to read ``BlockingIOError``
    propagates (and nothing was received).
    """
    if size <= 0:
        raise ValueError(f"size must be > 0, not {size}")  # 0 would read as end of file
    flags, ancbufsize, cloexec = _recv_params(max_fds, cmsg_cloexec)
    while True:
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(size, ancbufsize, flags)
            break
        except InterruptedError:
            continue
    return data, _take_fds(ancdata, msg_flags, max_fds, set_cloexec=not cloexec)


def recv_into_with_fds(
    sock: socket.socket, buffer: Buffer, max_fds: int, *, cmsg_cloexec: bool | None = None
) -> tuple[int, list[int]]:
    """Like :func:`recv_with_fds` but reads into a writable ``buffer`` (zero copy);
    returns ``(nbytes, fds)``, where ``nbytes == 0`` means end of file."""
    if not memoryview(buffer).nbytes:
        raise ValueError("buffer must not be empty")  # 0 would read as end of file
    flags, ancbufsize, cloexec = _recv_params(max_fds, cmsg_cloexec)
    while True:
        try:
            nbytes, ancdata, msg_flags, _ = sock.recvmsg_into([buffer], ancbufsize, flags)
            break
        except InterruptedError:
            continue
    return nbytes, _take_fds(ancdata, msg_flags, max_fds, set_cloexec=not cloexec)


def _recv_params(max_fds: int, cmsg_cloexec: bool | None) -> tuple[int, int, bool]:
    if max_fds < 0:
        raise ValueError(f"max_fds must be >= 0, not {max_fds}")
    cloexec = _use_cmsg_cloexec(cmsg_cloexec)
    flags = socket.MSG_CMSG_CLOEXEC if cloexec else 0
    ancbufsize = socket.CMSG_SPACE(max_fds * _FD_SIZE) if max_fds else 0
    return flags, ancbufsize, cloexec


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:  # pragma: no cover - the fd was just received
            log.warning("closing received fd %d failed: %s", fd, exc)


def _take_fds(ancdata: list[tuple[int, int, bytes]], msg_flags: int, max_fds: int, *, set_cloexec: bool) -> list[int]:
    """Collect the fds of every SCM_RIGHTS message; validate; close them all on error."""
    fds: list[int] = []
    malformed = False
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            log.debug("ignoring control message level=%d type=%d (%d bytes)", level, kind, len(data))
            continue
        whole = len(data) - len(data) % _FD_SIZE
        malformed |= whole != len(data)
        fds.extend(array.array("i", data[:whole]))
    try:
        if msg_flags & socket.MSG_CTRUNC or len(fds) > max_fds:
            # CMSG_SPACE padding can let the kernel deliver one fd more than asked for.
            raise ControlMessageTruncated(
                f"control data truncated: the peer sent more than {max_fds} fds "
                f"({len(fds)} arrived and were closed)"
            )
        if malformed:
            raise FdPassingError(f"malformed SCM_RIGHTS control message ({len(fds)} fds closed)")
        if set_cloexec:
            for fd in fds:
                os.set_inheritable(fd, False)  # fcntl(F_SETFD, FD_CLOEXEC)
    except BaseException:
        _close_all(fds)
        raise
    return fds
