"""Device-state transfers (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE) that a
front-end cannot wedge.

A :class:`StateTransfer` moves the device's state through the fd the
front-end sent, on a thread of its own, so the protocol thread stays free.
Every wait in it is bounded or cancellable: the thread polls the fd together
with a wake-up event, so :meth:`StateTransfer.cancel` ends it at once (a
front-end that keeps a pipe's write end open and never writes, or never reads
what we save, cannot hold it); :meth:`StateTransfer.wait` has a timeout; a load
larger than ``max_size`` fails instead of eating memory.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from .errors import DeviceError
from .sys_util.poll import EVENT_READ, EVENT_WRITE, Poller

__all__ = ["StateTransfer", "StateTransferCancelled", "SAVE", "LOAD"]

log = logging.getLogger(__name__)

#: ``VHOST_USER_TRANSFER_STATE_DIRECTION_SAVE`` / ``_LOAD``
SAVE, LOAD = 0, 1
_CHUNK = 1 << 16


class StateTransferCancelled(DeviceError):
    """The transfer was cancelled (disconnect, a newer transfer, a timed-out check)."""


class StateTransfer:
    """One transfer over ``fd`` (owned: closed when the transfer ends).

    ``direction`` :data:`SAVE` writes ``save()``'s bytes and closes the fd;
    :data:`LOAD` reads to EOF (at most ``max_size`` bytes) and calls ``load(data)``.
    """

    def __init__(self, fd: int, direction: int, *, save: Callable[[], bytes],
                 load: Callable[[bytes], None], max_size: int) -> None:
        self.direction = direction
        self.error: BaseException | None = None
        self._fd = fd
        self._save = save
        self._load = load
        self._max_size = max_size
        self._cancelled = threading.Event()
        self._poller = Poller()
        self._thread = threading.Thread(target=self._run, name="vhostuser-device-state", daemon=True)

    def start(self) -> None:
        """Start the transfer thread."""
        self._thread.start()

    @property
    def done(self) -> bool:
        """The thread has finished (successfully or not)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds; True if the transfer finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the transfer (it fails with :class:`StateTransferCancelled`) and
        wait (bounded) for its thread to let go of the fd."""
        if self._thread.is_alive():
            self._cancelled.set()
            self._poller.wake()
            self._thread.join(timeout)
            if self._thread.is_alive():  # inside save()/load(): the device's own code
                log.error("device-state transfer did not stop within %ss (inside the device's save/load)",
                          timeout)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            os.set_blocking(self._fd, False)
            if self.direction == SAVE:
                data = self._save()
                self._poller.register(self._fd, 0, EVENT_WRITE)
                self._write_all(data)
            else:
                self._poller.register(self._fd, 0, EVENT_READ)
                self._load(self._read_all())
        except BaseException as exc:  # noqa: BLE001 - reported by check_device_state
            self.error = exc
            if not isinstance(exc, StateTransferCancelled):
                log.warning("device-state transfer failed: %s", exc)
        finally:
            self._poller.close()
            os.close(self._fd)

    def _wait_ready(self) -> None:
        while True:
            if self._cancelled.is_set():
                raise StateTransferCancelled("device-state transfer cancelled")
            if any(token == 0 for token, _ in self._poller.wait(None)):
                return

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait_ready()
            try:
                n = os.write(self._fd, view[:_CHUNK])
            except BlockingIOError:
                continue
            view = view[n:]

    def _read_all(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            self._wait_ready()
            try:
                chunk = os.read(self._fd, _CHUNK)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self._max_size:
                raise DeviceError(f"device state larger than {self._max_size} bytes")
            chunks.append(chunk)
