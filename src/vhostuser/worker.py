"""Worker threads: poll kick fds and device fds, run the device.

Each worker owns a :class:`~vhostuser.sys_util.poll.Poller` over the kick fds
of the queues it serves (token = queue index), the fds the device registered
(token >= :data:`~vhostuser.backend.FIRST_DEVICE_TOKEN`) and the device's exit
event.  It holds its lock while it runs the device; the protocol thread takes
the same lock before changing a ring this worker serves.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
        self.lock = lock
        self.memory: GuestMemory | None = None
        self.poller = Poller()
        self._stop = False
        self._kick_fds: dict[int, int] = {}
        self._exit = backend.exit_event(thread_id)
        if self._exit is not None:
            self.poller.register(self._exit.fileno(), EXIT_TOKEN)
        self._thread = threading.Thread(target=self._run, name=f"vhostuser-worker-{thread_id}", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the thread to exit and join it."""
        self._stop = True
        self.poller.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.poller.close()

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

    def register_fd(self, fd: int, token: int, events: int = EVENT_READ) -> None:
        with self.lock:
            self.poller.register(fd, token, events)
        self.poller.wake()

    def modify_fd(self, fd: int, token: int, events: int) -> None:
        with self.lock:
            self.poller.modify(fd, token, events)
        self.poller.wake()

    def unregister_fd(self, fd: int) -> None:
        with self.lock:
            self.poller.unregister(fd)

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
                log.error("worker %d: poll failed: %s", self.thread_id, exc)
                break
            for token, _mask in events:
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
                        self._dispatch_device(token)
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
                self._call_hook(self.backend.vring_started, vring)
        if not vring.enabled:
            vring.kick_pending = True
            return
        vring.kick_pending = False
        if vring.failed is not None:
            return
        try:
            self.backend.handle_event(index, self.vrings, self.thread_id)
        except Exception as exc:  # noqa: BLE001 - device errors fail the queue, not the daemon
            log.exception("device failed while handling queue %d", index)
            vring.fail(exc)

    def _dispatch_device(self, token: int) -> None:
        try:
            self.backend.handle_event(token, self.vrings, self.thread_id)
        except Exception:  # noqa: BLE001
            log.exception("device failed while handling its event %d", token)

    def _call_hook(self, hook, vring: VringState) -> None:  # noqa: ANN001
        try:
            hook(vring.index, vring)
        except Exception:  # noqa: BLE001
            log.exception("device hook %s failed for queue %d", getattr(hook, "__name__", hook), vring.index)
