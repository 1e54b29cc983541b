"""virtio-rng (device id 4): entropy for the guest.

The guest places writable buffers on its one queue; the device fills them from
a source (``/dev/urandom`` by default, or any file or character device) and
returns them.  A regular file that runs out leaves further requests waiting
on the ring (the guest sees a source with no more entropy), so a guest reads
exactly the file's bytes.  Like rust-vmm's vhost-device-rng it can limit the rate: at most
``max_bytes`` per ``period_ms``; when the quota is used up, requests wait (the
chains stay with the device) until the next period starts.

QEMU 7.2's ``vhost-user-rng-pci`` acks RING_INDIRECT_DESC and RING_EVENT_IDX
whether or not the back-end offered them and uses a queue of 4 entries; the
library's queues support both, so nothing special is needed here.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Mapping

from ..backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ..sys_util.event import new_event_consumer_and_notifier
from ..vring import VringState

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4
_TIMER_TOKEN = FIRST_DEVICE_TOKEN


class RngBackend(VhostUserBackend):
    """A virtio-rng device reading from ``source``."""

    num_queues = 1
    max_queue_size = 1024

    def __init__(self, source: str = "/dev/urandom", *, period_ms: int = 1000,
                 max_bytes: int | None = None) -> None:
        super().__init__()
        if period_ms <= 0:
            raise ValueError("period_ms must be positive")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.source = source
        self.period = period_ms / 1000.0
        self.max_bytes = max_bytes
        self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self._period_start = time.monotonic()
        self._quota = max_bytes
        self._timer_consumer, self._timer_notifier = new_event_consumer_and_notifier()
        self._timer: threading.Timer | None = None
        self._timer_pending = False  # a timer is armed and its event not yet handled
        self._timer_registered = False
        #: bytes handed to the guest so far
        self.bytes_served = 0
        #: the source reached end-of-file (a regular file): requests then wait
        #: on the ring, like a drained entropy source, instead of spinning
        self.exhausted = False

    def close(self) -> None:
        """Release the source file and the rate limiter's timer (the fixture and the command call it at the end)."""
        if self._timer is not None:
            self._timer.cancel()
        os.close(self._fd)
        self._timer_consumer.close()
        self._timer_notifier.close()

    # ---------------------------------------------------------------- quota
    def _available_quota(self) -> int | None:
        """Bytes still allowed in this period (None: unlimited)."""
        if self.max_bytes is None:
            return None
        now = time.monotonic()
        if now - self._period_start >= self.period:
            self._period_start = now
            self._quota = self.max_bytes
        return self._quota

    def _arm_timer(self) -> None:
        # not the timer thread's liveness: it may still be alive right after it
        # signalled, and the quota may not be renewed yet when we look
        if self._timer_pending:
            return
        self._timer_pending = True
        if not self._timer_registered:
            self.register_fd(self._timer_consumer.fileno(), _TIMER_TOKEN)
            self._timer_registered = True
        delay = max(0.0, self._period_start + self.period - time.monotonic())
        self._timer = threading.Timer(delay, self._timer_notifier.notify)
        self._timer.daemon = True
        self._timer.start()

    # ---------------------------------------------------------------- device
    def vring_started(self, index: int, vring: VringState) -> None:
        self._serve(vring)

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event == _TIMER_TOKEN:
            self._timer_consumer.consume()
            self._timer_pending = False
        self._serve(vrings[0])

    def _serve(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        used = []
        while not self.exhausted:
            quota = self._available_quota()
            if quota == 0:  # requests wait, still on the ring, for the next period
                self._arm_timer()
                break
            chain = vring.pop_descriptor_chain()
            if chain is None:
                break
            granted = chain.writable_length if quota is None else min(chain.writable_length, quota)
            if quota is not None:
                self._quota = quota - granted
            data = os.read(self._fd, granted) if granted else b""
            if granted and not data:
                self.exhausted = True
                log.warning("rng source %s is exhausted; further requests wait", self.source)
            written = chain.writer().write(data)
            self.bytes_served += written
            used.append((chain, written))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()


# --------------------------------------------------------------------- command
DESCRIPTION = """virtio-rng vhost-user back-end (device id 4).

Serves entropy to a guest's virtio-rng driver (/dev/hwrng in a Linux guest).
QEMU side:
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
  -chardev socket,id=rng0,path=PATH -device vhost-user-rng-pci,chardev=rng0

Flags follow rust-vmm's vhost-device-rng, so the two are interchangeable."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vhostuser rng`` options: the back-end conventions' flags plus rust-vmm's ``--rng-source``, ``--period``, ``--max-bytes``."""
    from .common import add_backend_arguments

    add_backend_arguments(parser)
    parser.add_argument("-f", "--rng-source", default="/dev/urandom", metavar="PATH",
                        help="where the random bytes come from (default: /dev/urandom)")
    parser.add_argument("-p", "--period", type=int, default=1000, metavar="MS",
                        help="rate-limit period in milliseconds (default: 1000)")
    parser.add_argument("-m", "--max-bytes", type=int, default=None, metavar="N",
                        help="at most N bytes per period (default: unlimited)")


def run(args: argparse.Namespace) -> int:
    """Serve ``vhostuser rng`` as parsed into ``args`` until SIGTERM/SIGINT; the exit status."""
    from .common import capabilities, serve_backends

    return serve_backends(
        "rng", args,
        lambda i: RngBackend(args.rng_source, period_ms=args.period, max_bytes=args.max_bytes),
        capabilities("rng"),
    )
