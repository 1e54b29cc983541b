"""``VringState``: one virtqueue as the back-end daemon sees it.

A vring is configured by the front-end (SET_VRING_NUM / ADDR / BASE / KICK /
CALL / ERR / ENABLE) and is, as the vhost-user spec says, in one of three
states:

* **stopped** - not processed at all (initial state, and after GET_VRING_BASE);
* **started but disabled** - a kick arrived but SET_VRING_ENABLE 0 (or no
  enable yet, when protocol features were negotiated); kicks are remembered, not
  lost, and processed once the ring is enabled;
* **started and enabled** - :meth:`VhostUserBackend.handle_event` runs.

One class, one lock: ``lock`` is the lock of the worker thread that serves the
ring, held while the worker runs the device and taken by the protocol thread
before it changes the ring.  A device that touches a vring from a thread of its
own wraps that in ``with vring.lock:``.
"""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from array import array
from typing import TYPE_CHECKING, Any

from .errors import QueueError

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from .backend_channel import BackendChannel
    from .memory import GuestMemory
    from .virtqueue import DescriptorChain, Queue
    from .virtqueue.iobatch import IoBatch
    from .sys_util.event import EventConsumer, EventNotifier

log = logging.getLogger(__name__)

#: VHOST_VRING_F_LOG: log writes to the used ring (SET_VRING_ADDR flags)
VHOST_VRING_F_LOG = 1 << 0


class RingState(enum.Enum):
    STOPPED = "stopped"
    STARTED_DISABLED = "started-disabled"
    STARTED_ENABLED = "started-enabled"


@dataclass(frozen=True)
class VringAddresses:
    """SET_VRING_ADDR, in front-end user (virtual) addresses."""

    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


class VringState:
    """A vring: its queue, its kick/call/err notifiers and its state."""

    def __init__(self, index: int, max_size: int, lock: threading.RLock) -> None:
        self.index = index
        self.max_size = max_size
        self.lock = lock
        self.size = 0
        self.base = 0
        self.addresses: VringAddresses | None = None
        self.kick: EventConsumer | None = None
        self.call: EventNotifier | None = None
        self.err: EventNotifier | None = None
        self.enabled = False
        self.started = False
        self.kick_pending = False
        self.failed: Exception | None = None
        self.queue: Queue | None = None
        self.event_idx = False
        self.packed = False
        #: with INBAND_NOTIFICATIONS: the back-end channel that carries VRING_CALL /
        #: VRING_ERR instead of the call and err fds
        self.inband: BackendChannel | None = None
        #: this queue's part of the inflight area (INFLIGHT_SHMFD), if any
        self.inflight_region: memoryview | None = None
        self.inflight_queue_size = 0

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> RingState:
        """The ring's state as the spec names it: stopped, started and enabled, or started and disabled."""
        if not self.started:
            return RingState.STOPPED
        return RingState.STARTED_ENABLED if self.enabled else RingState.STARTED_DISABLED

    @property
    def is_running(self) -> bool:
        """Started, enabled and not failed: the device may use the ring."""
        return self.started and self.enabled and self.failed is None and self.queue is not None

    def start(self, memory: GuestMemory) -> None:
        """Build the queue from the configuration and mark the ring started."""
        if self.addresses is None or self.size == 0:
            raise QueueError(f"vring {self.index}: kicked before SET_VRING_NUM/ADDR")
        from .virtqueue import Queue  # noqa: PLC0415 - the chosen implementation

        addr = self.addresses
        self.queue = Queue(
            memory,
            size=self.size,
            desc_addr=memory.uva_to_gpa(addr.desc_user_addr),
            driver_addr=memory.uva_to_gpa(addr.avail_user_addr),
            device_addr=memory.uva_to_gpa(addr.used_user_addr),
            packed=self.packed,
            event_idx=self.event_idx,
        )
        self.queue.set_vring_base(self.base)
        if addr.flags & VHOST_VRING_F_LOG:
            self.queue.set_used_log(addr.log_guest_addr)
        self._track_inflight()
        self.started = True
        self.failed = None

    def _track_inflight(self) -> None:
        """Record requests in the inflight area and queue the ones a crashed
        back-end left in flight for resubmission."""
        from .virtqueue.inflight import PackedInflight, SplitInflight  # noqa: PLC0415

        assert self.queue is not None
        if self.inflight_region is None:
            return
        if self.inflight_queue_size != self.size:
            log.warning("vring %d: inflight area is for %d entries, the ring has %d; not tracking",
                        self.index, self.inflight_queue_size, self.size)
            return
        cls = PackedInflight if self.packed else SplitInflight
        self.queue.set_inflight(cls(self.inflight_region, self.size))
        resubmitted = self.queue.resubmit_inflight()
        if resubmitted:
            log.info("vring %d: resubmitting %d requests left in flight by the previous back-end",
                     self.index, resubmitted)

    def stop(self) -> int:
        """Stop the ring; return the base to report in GET_VRING_BASE."""
        if self.queue is not None:
            self.base = self.queue.vring_base()
            # Drop the queue's views of guest RAM now: a broken queue keeps its
            # exception, whose traceback holds the queue (a cycle that kept the
            # guest RAM mapped, and its fd open, until the garbage collector ran).
            self.queue.reset()
        self.started = False
        self.kick_pending = False
        self.queue = None
        return self.base

    def update_memory(self, memory: GuestMemory) -> None:
        """A new memory table: re-point the running queue at it."""
        if self.queue is not None:
            self.queue.set_memory(memory)

    def close_fds(self) -> None:
        """Close kick, call and err (on disconnect)."""
        for name in ("kick", "call", "err"):
            fd_owner = getattr(self, name)
            if fd_owner is not None:
                fd_owner.close()
                setattr(self, name, None)

    def reset(self) -> None:
        """Back to the initial state, as after a fresh connection."""
        self.stop()
        self.close_fds()
        self.size = 0
        self.base = 0
        self.addresses = None
        self.enabled = False
        self.failed = None

    # ------------------------------------------------------ device operations
    def read_kick(self) -> bool:
        """Drain the kick fd; True if a kick was pending."""
        return self.kick.consume() if self.kick is not None else False

    def _running_queue(self) -> Queue:
        if self.queue is None or not self.started:
            raise QueueError(f"vring {self.index} is not started")
        if self.failed is not None:
            raise QueueError(f"vring {self.index} has failed: {self.failed}")
        return self.queue

    def pop_descriptor_chain(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has published no more.

        Raises :class:`~vhostuser.errors.QueueError` if the ring is not started or
        has failed, and a :class:`~vhostuser.errors.QueueBroken` subclass for a
        hostile ring (a descriptor outside guest memory, a loop, ...); raising it
        on from :meth:`~vhostuser.VhostUserBackend.handle_event` fails this queue only."""
        return self._running_queue().pop_descriptor_chain()

    def pop_batch(self, max_chains: int = 64) -> Sequence[DescriptorChain]:
        """Up to ``max_chains`` available chains in one call (empty: none left).

        Every buffer was checked to lie inside guest memory.  Raises as
        :meth:`pop_descriptor_chain` does."""
        return self._running_queue().pop_batch(max_chains)

    def add_used(self, chain: DescriptorChain | int, length: int) -> None:
        """Return one chain (or its head index) to the driver with ``length``
        bytes written into its device-writable buffers.  Then call
        :meth:`signal_used_queue`.  Raises :class:`~vhostuser.errors.QueueError`
        if the ring is not started or has failed."""
        self._running_queue().add_used(chain, length)

    def add_used_batch(self, entries: Iterable[tuple[DescriptorChain | int, int]]) -> None:
        """Return many chains, publishing the used index once."""
        self._running_queue().add_used_batch(entries)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was just used (EVENT_IDX / NO_INTERRUPT aware); :meth:`signal_used_queue` asks this itself."""
        return self._running_queue().needs_notification()

    def poll(self, ns: int) -> bool:
        """Busy-poll up to ``ns`` nanoseconds for available buffers (:meth:`Queue.poll`)."""
        return self._running_queue().poll(ns)

    def pop_io_batch(self, max_chains: int, header_len: int) -> IoBatch | None:
        """Up to ``max_chains`` chains with their headers (:meth:`Queue.pop_io_batch`)."""
        return self._running_queue().pop_io_batch(max_chains, header_len)

    def complete_io(self, iob: IoBatch, fd: int, ops: Any, offsets: Any, lens: Any, *, skip: int, tail: int = 1,
                    ok: int = 0, err: int = 1, every: int = 0, helper: Executor | None = None) -> array:
        """:meth:`Queue.complete_io`, notifying the driver through the call fd
        after each published sub-batch that needs it (then once more if
        anything is left to signal, e.g. in-band).  Returns the per-chain errnos."""
        queue = self._running_queue()
        call_fd = self.call.fileno() if self.call is not None else -1
        errs = queue.complete_io(iob, fd, ops, offsets, lens, skip=skip, tail=tail, ok=ok, err=err, every=every,
                                 call_fd=call_fd, helper=helper)
        if call_fd < 0 or not queue.notifies_in_core:
            self.signal_used_queue()
        return errs

    def signal_used_queue(self) -> bool:
        """Notify the driver (call fd) if EVENT_IDX / suppression flags ask for it.

        Returns whether a notification was sent.
        """
        queue = self._running_queue()
        if (self.call is None and self.inband is None) or not queue.needs_notification():
            return False
        if self.call is not None:
            self.call.notify()
        else:
            self.inband.vring_call(self.index)  # type: ignore[union-attr]
        return True

    def enable_notification(self) -> bool:
        """Ask the driver for kicks again; True if buffers arrived meanwhile."""
        return self._running_queue().enable_notification()

    def disable_notification(self) -> None:
        """Ask the driver not to kick (while the device polls the ring); :meth:`enable_notification` turns kicks back on."""
        self._running_queue().disable_notification()

    def fail(self, exc: Exception) -> None:
        """Mark the ring failed (hostile or broken) and signal its err fd."""
        self.failed = exc
        log.error("vring %d failed: %s", self.index, exc)
        if self.err is not None:
            try:
                self.err.notify()
            except OSError as notify_exc:  # a pipe whose reader is gone (the front-end left)
                log.warning("vring %d: error notification failed: %s", self.index, notify_exc)
        elif self.inband is not None:
            try:
                self.inband.vring_err(self.index)
            except Exception as chan_exc:  # noqa: BLE001 - reporting must not fail the caller
                log.warning("vring %d: in-band VRING_ERR failed: %s", self.index, chan_exc)

    def __repr__(self) -> str:
        return f"<VringState {self.index} {self.state.value} size={self.size}>"
