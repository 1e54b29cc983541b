"""Worker threads: poll kick fds and device fds, run the device.

Each worker owns a :class:`~vhostuser.sys_util.poll.Poller` over the kick fds
of the queues it serves (token = queue index), the fds the device registered
in its :class:`~vhostuser.fd_registry.FdRegistry` (token >=
:data:`~vhostuser.fd_registry.FIRST_DEVICE_TOKEN`) and the device's exit event.
It holds its lock while it runs the device; the protocol thread takes the same
lock before changing a ring this worker serves.

The device sees only this worker's vrings: ``handle_event`` gets a read-only
mapping from queue index to :class:`~vhostuser.vring.VringState` of the queues
the worker owns (as rust-vmm hands each epoll handler its own vrings).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from .errors import GuestMemoryError, QueueError
from .sys_util.poll import EVENT_READ, Poller

if TYPE_CHECKING:
    from .backend import VhostUserBackend
    from .memory import GuestMemory
    from .vring import VringState

log = logging.getLogger(__name__)

#: The token of the device's exit event.
EXIT_TOKEN = (1 << 16) - 1


class Worker:
    """One worker thread of a :class:`~vhostuser.daemon.VhostUserDaemon`."""

    def __init__(self, thread_id: int, backend: VhostUserBackend, vrings: Sequence[VringState],
                 queue_indices: Sequence[int], lock: threading.RLock) -> None:
        self.thread_id = thread_id
        self.backend = backend
        self.vrings = vrings
        self.queue_indices = tuple(queue_indices)
        #: what ``handle_event`` receives: queue index -> vring, this worker's queues only
        self.owned_vrings: Mapping[int, VringState] = MappingProxyType({q: vrings[q] for q in self.queue_indices})
        self.lock = lock
        self.memory: GuestMemory | None = None
        self.poller = Poller()
        self._stop = False
        self._kick_fds: dict[int, int] = {}
        self._device_fds: set[int] = set()
        self._fd_lock = threading.Lock()  # guards _device_fds and their poller registrations
        self._exit = backend.exit_event(thread_id)
        if self._exit is not None:
            self.poller.register(self._exit.fileno(), EXIT_TOKEN)
        self._thread = threading.Thread(target=self._run, name=f"vhostuser-worker-{thread_id}", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Ask the thread to exit and join it; False if it did not exit in time
        (its poller is then left open for it: closing it under a running
        thread would make it fail instead of exit)."""
        self._stop = True
        self.poller.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("worker %d did not exit within %ss (stuck in the device?)", self.thread_id, timeout)
                return False
        self.poller.close()
        return True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------ called by the protocol thread
    # (always with self.lock held)
    def watch_kick(self, index: int) -> None:
        """(Re)register the kick fd of vring ``index``."""
        self.unwatch_kick(index)
        kick = self.vrings[index].kick
        if kick is not None:
            fd = kick.fileno()
            self.poller.register(fd, index)
            self._kick_fds[index] = fd
            self.poller.wake()

    def unwatch_kick(self, index: int) -> None:
        fd = self._kick_fds.pop(index, None)
        if fd is not None:
            self.poller.unregister(fd)

    # ------------------------------------------------ called by the FdRegistry
    # Under ``_fd_lock``, never under the worker lock: the registry calls these
    # holding its own lock, and a device calls the registry from handle_event
    # (holding the worker lock), so taking the worker lock here could deadlock.
    def watch_fd(self, fd: int, token: int, events: int = EVENT_READ) -> None:
        """Watch a device fd (register, or modify if watched already)."""
        with self._fd_lock:
            if fd in self._device_fds:
                self.poller.modify(fd, token, events)
            else:
                self.poller.register(fd, token, events)
                self._device_fds.add(fd)
        self.poller.wake()

    def unwatch_fd(self, fd: int) -> None:
        with self._fd_lock:
            if fd in self._device_fds:
                self._device_fds.discard(fd)
                if not self.poller.closed:
                    self.poller.unregister(fd)
                    self.poller.wake()  # poll/select: leave the wait that still watches it

    def _drop_closed_fds(self) -> bool:
        """After EBADF: forget registered fds that were closed (a device that
        closed an fd before unregistering it); True if there were any."""
        dropped = False
        with self.lock, self._fd_lock:
            for fd in [*self._kick_fds.values(), *self._device_fds]:
                try:
                    os.fstat(fd)
                except OSError:
                    log.error("worker %d: fd %d was closed while watched; no longer watching it",
                              self.thread_id, fd)
                    self.poller.unregister(fd)
                    self._device_fds.discard(fd)
                    self._kick_fds = {q: f for q, f in self._kick_fds.items() if f != fd}
                    dropped = True
        return dropped

    def kick_now(self, index: int) -> None:
        """Process vring ``index`` as if kicked (in-band VRING_KICK, or a kick
        remembered while the ring was disabled).  Runs on the caller's thread,
        under the worker lock."""
        with self.lock:
            self._dispatch_ring(index, kicked=True)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        log.debug("worker %d serving queues %s", self.thread_id, self.queue_indices)
        while not self._stop:
            try:
                events = self.poller.wait(None)
            except (OSError, ValueError) as exc:
                if self._stop:
                    break
                if isinstance(exc, OSError) and exc.errno == errno.EBADF and self._drop_closed_fds():
                    continue
                log.error("worker %d: poll failed: %s", self.thread_id, exc)
                break
            for token, mask in events:
                if token == EXIT_TOKEN:
                    log.info("worker %d: exit event", self.thread_id)
                    self._stop = True
                    break
                with self.lock:
                    if self._stop:
                        break
                    if token < len(self.vrings):
                        self._dispatch_ring(token, kicked=False)
                    else:
                        self._dispatch_device(token, mask)
        log.debug("worker %d exits", self.thread_id)

    def _dispatch_ring(self, index: int, *, kicked: bool) -> None:
        vring = self.vrings[index]
        if not kicked:
            if self._kick_fds.get(index) is None:
                return  # unregistered meanwhile
            if not vring.read_kick():
                return
        if not vring.started:
            if self.memory is None:
                log.error("vring %d kicked before a memory table was set", index)
                return
            try:
                vring.start(self.memory)
            except Exception as exc:  # noqa: BLE001 - a bad configuration fails the ring
                vring.fail(exc)
                return
            if vring.enabled:
                self.call_hook(self.backend.vring_started, vring)
        if not vring.enabled:
            vring.kick_pending = True
            return
        vring.kick_pending = False
        if vring.failed is not None:
            return
        try:
            self.backend.handle_event(index, EVENT_READ, self.owned_vrings, self.thread_id)
        except Exception as exc:  # noqa: BLE001 - device errors fail the queue, not the daemon
            log.exception("device failed while handling queue %d", index)
            vring.fail(exc)

    def _dispatch_device(self, token: int, evset: int) -> None:
        try:
            self.backend.handle_event(token, evset, self.owned_vrings, self.thread_id)
        except Exception:  # noqa: BLE001
            log.exception("device failed while handling its event %d", token)

    def call_hook(self, hook: Callable[[int, VringState], None], vring: VringState) -> None:
        """Run a device's ``vring_started``/``vring_stopped``: a failure is logged,
        never raised (the protocol request that caused it still succeeds).  A
        data-path error on the ring (a hostile ring, guest memory that faulted)
        fails the ring, as it would in :meth:`handle_event`."""
        try:
            hook(vring.index, vring)
        except (QueueError, GuestMemoryError) as exc:
            log.error("device hook %s: queue %d failed", getattr(hook, "__name__", hook), vring.index)
            vring.fail(exc)
        except Exception:  # noqa: BLE001
            log.exception("device hook %s failed for queue %d", getattr(hook, "__name__", hook), vring.index)
