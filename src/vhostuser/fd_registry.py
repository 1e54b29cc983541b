"""``FdRegistry``: the device's own fds, watched by the daemon's worker threads.

A device often has fds besides its kick fds: a host socket, a timer, an event
another thread signals.  It registers each with a *token* (at least
:data:`FIRST_DEVICE_TOKEN`) and a worker thread; when the fd is ready, that
worker calls :meth:`VhostUserBackend.handle_event
<vhostuser.backend.VhostUserBackend.handle_event>` with the token as
``device_event`` and the readiness mask as ``evset``.

The rules (this is rust-vmm's ``VringEpollHandler::register_listener``, made
forgiving):

* **When**: at any time, from any thread - in ``__init__``, before the daemon
  exists, from :meth:`~vhostuser.backend.VhostUserBackend.vring_started`, from a
  host-side thread.  The registry remembers every registration and applies it to
  the worker threads when the daemon starts them.
* **Idempotent**: registering an fd that is registered already updates its token,
  events and thread; so registering in ``vring_started`` (which runs again after
  every reconnect) is fine.
* **Unregister before you close the fd** (``select`` and ``poll`` cannot forget a
  closed fd).  Unregistering an fd that is not registered is a no-op.  Front-end
  disconnects do not unregister anything: device fds outlive sessions.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .sys_util.poll import EVENT_READ, EVENT_WRITE, FileDescriptorLike

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["FIRST_DEVICE_TOKEN", "FdRegistry", "Registration"]

log = logging.getLogger(__name__)

#: Token values at or above this are free for a device's own fds; below it they
#: name vrings (and the worker's exit event).
FIRST_DEVICE_TOKEN: Final = 1 << 16


@dataclass(frozen=True)
class Registration:
    """One registered fd: the token reported for it, the events watched, the worker."""

    token: int
    events: int
    thread_id: int


def _fd_of(fileobj: FileDescriptorLike) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class FdRegistry:
    """The fds a device asked its worker threads to watch (see module docs)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[int, Registration] = {}
        self._workers: Sequence[Worker] = ()

    # ----------------------------------------------------------- device API
    def register(self, fd: FileDescriptorLike, token: int, thread_id: int = 0,
                 events: int = EVENT_READ) -> None:
        """Watch ``fd`` (an int or an object with ``fileno()``) for ``events`` in
        worker ``thread_id``; report readiness with ``token``.  Registering an fd
        again replaces its token, events and thread.

        Raises ``ValueError`` for a token below :data:`FIRST_DEVICE_TOKEN`, for
        events other than EVENT_READ/EVENT_WRITE, or (once the daemon runs) for a
        thread that does not exist; ``OSError`` if ``fd`` is not open.
        """
        if token < FIRST_DEVICE_TOKEN:
            raise ValueError(f"device tokens must be >= FIRST_DEVICE_TOKEN ({FIRST_DEVICE_TOKEN}), not {token}")
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"events must be EVENT_READ and/or EVENT_WRITE, not {events!r}")
        if thread_id < 0:
            raise ValueError(f"no worker thread {thread_id}")
        num = _fd_of(fd)
        new = Registration(token, events, thread_id)
        with self._lock:
            if self._workers:
                self._check_thread(thread_id)
            old = self._entries.get(num)
            if old == new:
                return
            if self._workers:
                if old is not None and old.thread_id != thread_id:
                    self._workers[old.thread_id].unwatch_fd(num)
                self._workers[thread_id].watch_fd(num, token, events)
            self._entries[num] = new

    def modify(self, fd: FileDescriptorLike, token: int, events: int, thread_id: int = 0) -> None:
        """Change what a registered ``fd`` is watched for (e.g. add EVENT_WRITE
        while output is pending).  The same as :meth:`register`."""
        self.register(fd, token, thread_id, events)

    def unregister(self, fd: FileDescriptorLike) -> bool:
        """Stop watching ``fd``; False if it was not registered."""
        num = _fd_of(fd)
        with self._lock:
            old = self._entries.pop(num, None)
            if old is not None and self._workers:
                self._workers[old.thread_id].unwatch_fd(num)
        return old is not None

    def get(self, fd: FileDescriptorLike) -> Registration | None:
        """The registration of ``fd``, or None."""
        with self._lock:
            return self._entries.get(_fd_of(fd))

    def __contains__(self, fd: object) -> bool:
        if not isinstance(fd, int) and not hasattr(fd, "fileno"):
            return False
        return self.get(fd) is not None  # type: ignore[arg-type]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bound(self) -> bool:
        """True while a daemon's worker threads watch the registered fds."""
        return bool(self._workers)

    @property
    def num_threads(self) -> int:
        """How many worker threads the bound daemon has (0 when unbound)."""
        return len(self._workers)

    # ----------------------------------------------------------- daemon side
    def bind(self, workers: Sequence[Worker]) -> None:
        """Hand every registration to ``workers`` (the daemon starting)."""
        with self._lock:
            self._workers = tuple(workers)
            for num, reg in list(self._entries.items()):
                if reg.thread_id >= len(self._workers):
                    log.error("fd %d was registered for worker %d, but the daemon has %d worker(s): dropped",
                              num, reg.thread_id, len(self._workers))
                    del self._entries[num]
                    continue
                try:
                    self._workers[reg.thread_id].watch_fd(num, reg.token, reg.events)
                except OSError as exc:
                    log.error("fd %d (token %d) cannot be watched: %s; dropped", num, reg.token, exc)
                    del self._entries[num]

    def unbind(self) -> None:
        """Forget the workers (the daemon stopped); registrations are kept."""
        with self._lock:
            for num, reg in self._entries.items():
                try:
                    self._workers[reg.thread_id].unwatch_fd(num)
                except (IndexError, KeyError, ValueError, OSError):
                    pass
            self._workers = ()

    def _check_thread(self, thread_id: int) -> None:
        if thread_id >= len(self._workers):
            raise ValueError(f"no worker thread {thread_id}: the daemon has {len(self._workers)} "
                             "(see VhostUserBackend.queues_per_thread)")
