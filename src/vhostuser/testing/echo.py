"""``EchoBackend``: a test device that copies each chain's readable bytes into
its writable buffers and returns it.

It is the smallest useful :class:`~vhostuser.backend.VhostUserBackend` and the
device the daemon's tests, the pytest fixtures' examples and ``vhostuser check``
self-tests use.  Device id 0 (none): it exists only for tests.  It records the
ring hooks it sees, so tests can assert on them.

Run it as a process (for ``vhostuser check --exec``)::

    python -m vhostuser.testing.echo --socket-path /tmp/echo.sock [--queues 2]
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Mapping, Sequence

from ..backend import VhostUserBackend
from ..vring import VringState

__all__ = ["EchoBackend"]

log = logging.getLogger(__name__)


class EchoBackend(VhostUserBackend):
    """Echo every request (see module docs).

    ``num_queues`` queues, served by the worker threads ``queues_per_thread``
    describes (default: one thread for all).  ``config_space`` is exposed
    read-only when given.
    """

    def __init__(self, num_queues: int = 1, *, queues_per_thread: Sequence[int] | None = None,
                 config_space: bytes | None = None, max_queue_size: int = 1024) -> None:
        super().__init__()
        self.num_queues = num_queues  # type: ignore[misc]  # instance override of the ClassVar
        self.max_queue_size = max_queue_size  # type: ignore[misc]
        self.config_space = config_space
        self._qpt = list(queues_per_thread) if queues_per_thread is not None else None
        self.lock = threading.Lock()
        #: (hook name, queue index) in the order they were called
        self.hook_calls: list[tuple[str, int]] = []
        #: set on every vring_started / vring_stopped call
        self.hook_event = threading.Event()
        #: requests echoed so far, per queue
        self.echoed = [0] * num_queues
        #: thread names that handled each queue
        self.threads: list[set[str]] = [set() for _ in range(num_queues)]
        #: the queue indices handle_event was given (its ``vrings``' keys), per queue
        self.vrings_seen: list[set[frozenset[int]]] = [set() for _ in range(num_queues)]

    def queues_per_thread(self) -> Sequence[int]:
        if self._qpt is not None:
            return self._qpt
        return super().queues_per_thread()

    def vring_started(self, index: int, vring: VringState) -> None:
        with self.lock:
            self.hook_calls.append(("started", index))
        self.hook_event.set()

    def vring_stopped(self, index: int, vring: VringState) -> None:
        with self.lock:
            self.hook_calls.append(("stopped", index))
        self.hook_event.set()

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event not in vrings:
            self.handle_device_event(device_event, evset, thread_id)
            return
        vring = vrings[device_event]
        with self.lock:
            self.threads[device_event].add(threading.current_thread().name)
            self.vrings_seen[device_event].add(frozenset(vrings))
        while True:
            chains = vring.pop_batch()
            if not chains:
                # EVENT_IDX: re-arm, and go round again if buffers arrived meanwhile
                if vring.event_idx and vring.enable_notification():
                    continue
                break
            if vring.event_idx:
                vring.disable_notification()
            used = []
            for chain in chains:
                data = chain.reader().read_all()
                used.append((chain, chain.writer().write(data[:chain.writable_length])))
            vring.add_used_batch(used)
            with self.lock:
                self.echoed[device_event] += len(chains)
            vring.signal_used_queue()

    def handle_device_event(self, token: int, evset: int, thread_id: int) -> None:
        """An fd registered with :meth:`register_fd` fired (override in tests)."""
        log.debug("echo: device event %d (evset %#x) on thread %d", token, evset, thread_id)


# --------------------------------------------------------------------- command
DESCRIPTION = "Echo test device: copies each request's readable bytes into its writable buffers."


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhostuser.testing.echo``: serve :class:`EchoBackend`."""
    from ..devices.common import add_backend_arguments, capabilities, serve_backends  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m vhostuser.testing.echo", description=DESCRIPTION)
    add_backend_arguments(parser)
    parser.add_argument("--queues", type=int, default=1, help="number of queues (default 1)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if not args.verbose else logging.DEBUG)
    return serve_backends("echo", args, lambda i: EchoBackend(args.queues), capabilities("echo"))


if __name__ == "__main__":
    sys.exit(main())
