"""Event notification fds: the kick/call/err fds of vhost-user (port of vmm-sys-util's
``EventNotifier`` / ``EventConsumer``).

Two variants, picked by probe or forced with ``kind=`` / ``VHOSTUSER_NOTIFIER``:

* ``eventfd`` (Linux): one kernel counter; the notifier and the consumer each own a
  dup of it, so either can be closed independently.
* ``pipe`` (everywhere): the consumer owns the read end, the notifier the write end.

A signal is an 8-byte write of the native-endian u64 ``1``, as the vhost-user spec
requires for eventfds; a pipe carries the same bytes.  Both ends are non-blocking:
:meth:`EventNotifier.notify` never blocks and :meth:`EventConsumer.consume` drains
every pending signal.
"""
from __future__ import annotations

import enum
import logging
import os
import struct
import warnings
from typing import Final, TypeVar

from ._variant import _choose_variant

__all__ = [
    "AVAILABLE_EVENT_KINDS",
    "DEFAULT_EVENT_KIND",
    "ENV_VAR",
    "EventConsumer",
    "EventKind",
    "EventNotifier",
    "new_event_consumer_and_notifier",
]

log = logging.getLogger(__name__)

ENV_VAR: Final = "VHOSTUSER_NOTIFIER"
_SIGNAL: Final = struct.pack("=Q", 1)
# Big enough for an eventfd read (exactly 8 bytes) and for draining a pipe quickly.
_READ_SIZE: Final = 4096


class EventKind(enum.Enum):
    """How an event notifier/consumer pair is implemented."""

    EVENTFD = "eventfd"
    PIPE = "pipe"


#: The kinds this system supports.
AVAILABLE_EVENT_KINDS: Final = frozenset(
    {EventKind.PIPE} | ({EventKind.EVENTFD} if hasattr(os, "eventfd") else set())
)
#: The kind used when neither ``kind=`` nor ``VHOSTUSER_NOTIFIER`` says otherwise.
DEFAULT_EVENT_KIND: Final = EventKind.EVENTFD if EventKind.EVENTFD in AVAILABLE_EVENT_KINDS else EventKind.PIPE


_T = TypeVar("_T", bound="_OwnedFd")


class _OwnedFd:
    """Owns one fd: ``fileno()``, ``close()``, ``detach()``, context manager."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd``, which must already be non-blocking (see :meth:`from_fd`)."""
        self._fd = fd

    @classmethod
    def from_fd(cls: type[_T], fd: int) -> _T:
        """Take ownership of ``fd`` (e.g. one received from the peer) and make it non-blocking.

        ``O_NONBLOCK`` is a property of the open file description, so the peer's copy of
        the fd becomes non-blocking too; vhost-user peers use them non-blocking anyway.
        """
        os.set_blocking(fd, False)
        return cls(fd)

    def fileno(self) -> int:
        """The owned fd (for a poller, or to send to the peer)."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`detach` was called."""
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership and return the fd; this object is closed afterwards."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def try_clone(self: _T) -> _T:
        """A new object of the same type owning a dup (CLOEXEC) of the fd."""
        return type(self)(os.dup(self.fileno()))

    def close(self) -> None:
        """Close the fd.  Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self._fd}>"


class EventNotifier(_OwnedFd):
    """The write side: signals the consumer (e.g. a vring's call fd)."""

    __slots__ = ()

    def notify(self) -> None:
        """Signal the consumer.  Never blocks.

        ``EAGAIN`` (a full pipe, or an eventfd counter at its maximum) means the
        consumer has signals pending already, so it is ignored.  Other errors
        propagate (``BrokenPipeError`` when a pipe's read end is gone).
        """
        try:
            os.write(self.fileno(), _SIGNAL)
        except BlockingIOError:
            log.debug("%r: already signalled (EAGAIN)", self)


class EventConsumer(_OwnedFd):
    """The read side: is told about signals (e.g. a vring's kick fd)."""

    __slots__ = ()

    def consume(self) -> bool:
        """Drain every pending signal; return whether there was any.  Never blocks.

        Reads until ``EAGAIN`` with a buffer of at least 8 bytes, which works for
        an eventfd (also in semaphore mode) and a pipe alike, so it suits fds of
        unknown kind received from the peer.  End of file on a pipe (the write end
        was closed) stops the loop; a poller keeps reporting such an fd readable.
        """
        fd = self.fileno()
        got = False
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return got
            if not data:
                return got
            got = True


def new_event_consumer_and_notifier(
    kind: EventKind | str | None = None,
) -> tuple[EventConsumer, EventNotifier]:
    """Create a connected (consumer, notifier) pair, both non-blocking and CLOEXEC.

    ``kind`` (or ``$VHOSTUSER_NOTIFIER`` when it is None) forces a variant; default
    :data:`DEFAULT_EVENT_KIND`.  Raises :class:`~vhostuser.errors.UnsupportedVariant`.
    """
    kind = _choose_variant(EventKind, kind, ENV_VAR, AVAILABLE_EVENT_KINDS, DEFAULT_EVENT_KIND)
    if kind is EventKind.EVENTFD:
        rfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            wfd = os.dup(rfd)  # os.dup makes the copy non-inheritable (CLOEXEC)
        except BaseException:
            os.close(rfd)
            raise
    else:
        rfd, wfd = os.pipe()  # non-inheritable (CLOEXEC) by default
        try:
            os.set_blocking(rfd, False)
            os.set_blocking(wfd, False)
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
    return EventConsumer(rfd), EventNotifier(wfd)
