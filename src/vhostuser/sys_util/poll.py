"""A small readiness poller over :mod:`selectors` (the role mio plays in rust-vmm).

Each registered fd carries an integer token; :meth:`Poller.wait` returns
``(token, events)`` pairs.  :meth:`Poller.wake` (thread-safe) makes a blocked
:meth:`Poller.wait` return early, through an internal event pair whose token is
never shown to the caller.

The selector is picked by probe (epoll, kqueue, poll, select) or forced with
``kind=`` / ``VHOSTUSER_SELECTOR=epoll|kqueue|poll|select``.  Hang-ups and errors
are reported as readiness for the events the fd was registered for, and with
epoll and poll also as :data:`EVENT_ERROR` (kqueue and select cannot tell a
hang-up from readiness: there the fd just reads as ready, and the next read or
write reports the error).
"""
from __future__ import annotations

import enum
import errno
import math
import os
import select
import selectors
import threading
from typing import Final, Protocol, Union

from ._variant import _choose_variant
from .event import EventKind, new_event_consumer_and_notifier

__all__ = [
    "AVAILABLE_SELECTOR_KINDS",
    "DEFAULT_SELECTOR_KIND",
    "ENV_VAR",
    "EVENT_ERROR",
    "EVENT_READ",
    "EVENT_WRITE",
    "Poller",
    "SelectorKind",
]

ENV_VAR: Final = "VHOSTUSER_SELECTOR"
#: The fd is readable (also reported on hang-up / error).
EVENT_READ: Final = selectors.EVENT_READ
#: The fd is writable.
EVENT_WRITE: Final = selectors.EVENT_WRITE
#: The fd hung up or has an error pending (reported, never registered for;
#: epoll and poll only).
EVENT_ERROR: Final = 4


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


#: An fd number or an object with a ``fileno()`` method.
FileDescriptorLike = Union[int, _HasFileno]  # noqa: UP007 - Python 3.10


class SelectorKind(enum.Enum):
    """Which OS readiness API a :class:`Poller` uses."""

    EPOLL = "epoll"
    KQUEUE = "kqueue"
    POLL = "poll"
    SELECT = "select"


_PROBES: Final = {
    SelectorKind.EPOLL: ("epoll", "EpollSelector"),
    SelectorKind.KQUEUE: ("kqueue", "KqueueSelector"),
    SelectorKind.POLL: ("poll", "PollSelector"),
    SelectorKind.SELECT: ("select", "SelectSelector"),
}
#: The kinds this system supports.
AVAILABLE_SELECTOR_KINDS: Final = frozenset(
    kind for kind, (func, cls) in _PROBES.items() if hasattr(select, func) and hasattr(selectors, cls)
)
#: The kind used when neither ``kind=`` nor ``VHOSTUSER_SELECTOR`` says otherwise (best first).
DEFAULT_SELECTOR_KIND: Final = next(k for k in SelectorKind if k in AVAILABLE_SELECTOR_KINDS)

_WAKE: Final = object()  # the data of the internal wake registration


#: Our selectors (they also report EVENT_ERROR), by kind, where the OS has them.
_OURS: dict[SelectorKind, type[selectors.BaseSelector]] = {}

if hasattr(selectors, "EpollSelector"):
    class _EpollSelector(selectors.EpollSelector):
        """EpollSelector that also reports EPOLLERR/EPOLLHUP as :data:`EVENT_ERROR`."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is None:
                ms = -1.0
            elif timeout <= 0:
                ms = 0.0
            else:
                ms = math.ceil(timeout * 1e3) * 1e-3  # round up: never wake before the deadline
            fd_to_key = self._fd_to_key  # type: ignore[attr-defined]
            try:
                raw = self._selector.poll(ms, max(len(fd_to_key), 1))  # type: ignore[attr-defined]
            except InterruptedError:
                return []
            return _translate(fd_to_key, raw, select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP)

    _OURS[SelectorKind.EPOLL] = _EpollSelector

if hasattr(selectors, "PollSelector"):
    class _PollSelector(selectors.PollSelector):
        """PollSelector that also reports POLLERR/POLLHUP/POLLNVAL as :data:`EVENT_ERROR`."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            ms = None if timeout is None else (0 if timeout <= 0 else math.ceil(timeout * 1e3))
            try:
                raw = self._selector.poll(ms)  # type: ignore[attr-defined]
            except InterruptedError:
                return []
            err = select.POLLERR | select.POLLHUP | select.POLLNVAL
            return _translate(self._fd_to_key, raw,  # type: ignore[attr-defined]
                              select.POLLIN, select.POLLOUT, err)

    _OURS[SelectorKind.POLL] = _PollSelector


def _translate(fd_to_key, raw, pollin: int, pollout: int, err: int) -> list[tuple[selectors.SelectorKey, int]]:  # noqa: ANN001
    """(fd, OS mask) pairs to (key, EVENT_* mask): an error also reads as ready
    for what the fd was registered for (as :mod:`selectors` reports it)."""
    ready = []
    for fd, mask in raw:
        key = fd_to_key.get(fd)
        if key is None:
            continue
        events = 0
        if mask & (pollin | err):
            events |= EVENT_READ
        if mask & (pollout | err):
            events |= EVENT_WRITE
        events &= key.events
        if mask & err:
            events |= EVENT_ERROR
        if events:
            ready.append((key, events))
    return ready


def _fd_of(fileobj: FileDescriptorLike) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class Poller:
    """Waits for readiness of many fds, each registered with an integer token.

    One thread waits; any thread may call :meth:`wake`.  With epoll and kqueue,
    registrations made while another thread waits take effect at once; with poll
    and select only from the next :meth:`wait` (call :meth:`wake` to get there).
    """

    def __init__(self, kind: SelectorKind | str | None = None, *, wake_kind: EventKind | str | None = None) -> None:
        """``kind`` (or ``$VHOSTUSER_SELECTOR``) picks the selector; ``wake_kind`` (or
        ``$VHOSTUSER_NOTIFIER``) the internal wake-up pair.  Both raise
        :class:`~vhostuser.errors.UnsupportedVariant` for unknown/unavailable kinds."""
        self.kind: SelectorKind = _choose_variant(
            SelectorKind, kind, ENV_VAR, AVAILABLE_SELECTOR_KINDS, DEFAULT_SELECTOR_KIND
        )
        cls = _OURS.get(self.kind) or getattr(selectors, _PROBES[self.kind][1])
        self._selector: selectors.BaseSelector = cls()
        self._wake_lock = threading.Lock()
        try:
            self._wake_consumer, self._wake_notifier = new_event_consumer_and_notifier(wake_kind)
        except BaseException:
            self._selector.close()
            raise
        self._selector.register(self._wake_consumer.fileno(), EVENT_READ, _WAKE)

    def register(self, fd: FileDescriptorLike, token: int, events: int = EVENT_READ) -> None:
        """Watch ``fd`` (an int or an object with ``fileno()``) for ``events``,
        reported with ``token``.  A closed or invalid fd raises ``OSError(EBADF)``;
        an fd registered already raises ``KeyError``."""
        num = _fd_of(fileobj=fd)
        try:
            os.fstat(num)
        except (OSError, OverflowError, ValueError) as exc:
            raise OSError(errno.EBADF, f"cannot register fd {num}: not an open file descriptor") from exc
        self._selector.register(num, events, token)

    def modify(self, fd: FileDescriptorLike, token: int, events: int) -> None:
        """Change the events and token of a registered ``fd`` (``KeyError`` if it is not)."""
        self._selector.modify(_fd_of(fd), events, token)

    def unregister(self, fd: FileDescriptorLike) -> None:
        """Stop watching ``fd`` (``KeyError`` if it is not registered).  Unregister
        an fd before closing it: select and poll cannot forget a closed fd."""
        self._selector.unregister(_fd_of(fd))

    def wait(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Block until some fds are ready, ``timeout`` seconds pass (None: forever;
        0: just poll), or :meth:`wake` is called; return ``(token, events)`` pairs,
        possibly none.  ``events`` is a mask of the registered :data:`EVENT_READ` /
        :data:`EVENT_WRITE`, plus :data:`EVENT_ERROR` on a hang-up or error (epoll, poll).  ``EINTR`` is retried (by :mod:`selectors`)."""
        ready = []
        for key, events in self._selector.select(timeout):
            if key.data is _WAKE:
                self._wake_consumer.consume()
            else:
                ready.append((key.data, events))
        return ready

    def wake(self) -> None:
        """Make a current or the next :meth:`wait` return.  Thread-safe; a no-op
        once the poller is closed."""
        with self._wake_lock:
            if not self._wake_notifier.closed:
                self._wake_notifier.notify()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._wake_consumer.closed

    def close(self) -> None:
        """Release the selector and the wake pair (not the registered fds).  Idempotent."""
        if self.closed:
            return
        with self._wake_lock:  # the write end first: a racing wake() then sees it closed,
            self._wake_notifier.close()  # never writes into a pipe whose reader is gone
        self._selector.close()
        self._wake_consumer.close()

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._selector.get_map()) - 1} fds"
        return f"<Poller {self.kind.value} {state}>"
