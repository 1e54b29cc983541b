"""``BlkBackend``: the virtio-blk device (id 2) as a :class:`~vhostuser.backend.VhostUserBackend`.

The ring glue around :class:`~.engine.BlkRequestEngine`: pop requests in
batches, execute them, publish the used entries once per batch and notify the
driver if it wants to be (EVENT_IDX aware).  Split and packed rings, indirect
descriptors and any number of queues (VIRTIO_BLK_F_MQ); by default each queue
has its own worker thread (the image I/O releases the GIL, so queues really
run in parallel).

The config space (PROTOCOL_F_CONFIG) is built on demand from the image and
the engine; with VIRTIO_BLK_F_CONFIG_WCE a driver may write ``writeback``
(QEMU's SET_CONFIG offset 32, 1 byte), nothing else.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from ...backend import VhostUserBackend
from ...errors import DeviceError, QueueError
from ...protocol.message import VhostUserProtocolFeatures as PF
from ...vring import VringState
from .engine import CONFIG_SIZE, OUTHDR, WRITEBACK_OFFSET, BlkRequestEngine, Status
from .image import BlockImage

log = logging.getLogger(__name__)

#: QEMU's vhost-user-blk-pci queue-size default; seg_max defaults to it minus 2
#: (the header and the status byte take a descriptor each)
DEFAULT_FRONTEND_QUEUE_SIZE = 128

#: requests popped per batch
BATCH = 64
#: the batch path publishes used entries (and notifies, EVENT_IDX permitting)
#: every this many requests, so the driver refills the ring while the rest runs
SUB_BATCH = 8
#: a batch moving at least this many bytes does half of its I/O on a helper
#: thread (the copies then run on two CPUs)
HELPER_MIN_BYTES = 256 * 1024


class BlkBackend(VhostUserBackend):
    """A virtio-blk device backed by a raw image file or a block device.

    ``image``: a path (opened here, closed by :meth:`close`) or an open
    :class:`BlockImage` (shared, e.g. by several read-only front-ends; the
    caller closes it).  ``num_queues``: virtqueues offered (MQ).
    ``queue_size``: the largest ring the front-end may configure.  ``seg_max``:
    the most data segments per request the driver may use (default 126, right
    for QEMU's default queue-size 128; it must be at most the front-end's queue
    size minus 2, since a chain may not be longer than its queue).  ``queues_per_thread``: queues served by one worker thread
    (1 = a thread per queue).  The remaining keywords go to
    :class:`BlkRequestEngine`.  ``poll_ns``: adaptive polling (QEMU's
    ``poll-max-ns`` idea): after a queue ran dry, its thread busy-polls the
    ring this many nanoseconds before sleeping on the kick (0, the default:
    off; it trades CPU for latency).
    """

    #: block requests are idempotent: after a back-end crash the front-end's
    #: inflight area lets a restarted back-end redo what was in flight
    supports_inflight = True

    def __init__(
        self,
        image: BlockImage | str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct: bool = False,
        num_queues: int = 1,
        queue_size: int = 1024,
        serial: str | bytes = b"",
        queues_per_thread: int = 1,
        seg_max: int | None = None,
        discard: bool = True,
        write_zeroes: bool = True,
        poll_ns: int = 0,
    ) -> None:
        super().__init__()
        if poll_ns < 0:
            raise ValueError(f"poll_ns must be >= 0, not {poll_ns}")
        #: adaptive polling: busy-poll a queue this long after it ran dry before
        #: sleeping on its kick (0: off)
        self.poll_ns = poll_ns
        self._helper: ThreadPoolExecutor | None = None
        self._helper_lock = threading.Lock()
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be in 1..65535, not {num_queues}")
        if not 2 < queue_size <= 32768:
            raise ValueError(f"queue_size must be in 3..32768, not {queue_size}")
        if queues_per_thread < 1:
            raise ValueError("queues_per_thread must be at least 1")
        if seg_max is None:
            # the config is read before the front-end picks its queue size; QEMU's
            # default is 128 and a chain must not be longer than the queue
            seg_max = min(queue_size, DEFAULT_FRONTEND_QUEUE_SIZE) - 2
        if not 1 <= seg_max <= queue_size - 2:
            raise ValueError(f"seg_max must be in 1..queue_size-2 ({queue_size - 2}), not {seg_max}")
        if isinstance(image, BlockImage):
            self.image, self._owns_image = image, False
        else:
            self.image, self._owns_image = BlockImage(image, read_only=read_only, direct=direct), True
        # instance attributes shadow the base class's ClassVars (read by the daemon)
        self.num_queues = num_queues  # type: ignore[misc]
        self.max_queue_size = queue_size  # type: ignore[misc]
        self._queues_per_thread = queues_per_thread
        #: requests completed per queue (each queue is served by one thread)
        self.requests_served = [0] * num_queues
        try:
            self.engine = BlkRequestEngine(
                self.image, serial=serial, num_queues=num_queues,
                seg_max=seg_max, discard=discard, write_zeroes=write_zeroes,
            )
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ negotiation
    def features(self) -> int:
        return super().features() | self.engine.features()

    def protocol_features(self) -> PF:
        return super().protocol_features() | PF.CONFIG

    def acked_features(self, features: int) -> None:
        super().acked_features(features)
        self.engine.set_acked_features(features)
        log.debug("acked virtio-blk features %#x", features & 0xFFFFFF)

    def reset_device(self) -> None:
        super().reset_device()
        self.engine.reset()

    # ----------------------------------------------------------------- config
    @property
    def config_space(self) -> bytes:  # type: ignore[override]
        """The current ``struct virtio_blk_config``."""
        return self.engine.config().pack()

    def get_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > CONFIG_SIZE:
            raise DeviceError(f"config read [{offset}, +{size}) outside the {CONFIG_SIZE}-byte config space")
        return self.config_space[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        if offset == WRITEBACK_OFFSET and len(data) == 1:
            self.engine.set_writeback(data[0])
            return
        raise DeviceError(f"virtio-blk config [{offset}, +{len(data)}) is read-only "
                          f"(only writeback at offset {WRITEBACK_OFFSET} is writable)")

    # ---------------------------------------------------------------- threads
    def queues_per_thread(self) -> Sequence[int]:
        per = self._queues_per_thread
        masks = []
        for first in range(0, self.num_queues, per):
            mask = 0
            for q in range(first, min(first + per, self.num_queues)):
                mask |= 1 << q
            masks.append(mask)
        return masks

    # ----------------------------------------------------------------- device
    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event not in vrings:
            log.warning("unexpected device event %d", device_event)
            return
        self.process_queue(vrings[device_event])

    def vring_started(self, index: int, vring: VringState) -> None:
        # requests may have been queued before the ring was enabled; this hook may
        # run on the protocol thread, so a hostile ring fails the ring, not the request
        try:
            self.process_queue(vring)
        except QueueError as exc:
            vring.fail(exc)

    def process_queue(self, vring: VringState) -> int:
        """Serve every available request of ``vring``; returns how many.

        Queue errors (a hostile ring) propagate: the worker fails the vring.
        """
        if not vring.is_running:
            return 0
        engine = self.engine
        total = 0
        # the batch path: plain reads/writes done by the ring core in one call per
        # batch (O_DIRECT images keep the per-request path and its bounce buffer)
        fast = not self.image.direct
        fd = self.image.fd
        while True:
            vring.disable_notification()
            if fast:
                while iob := vring.pop_io_batch(BATCH, OUTHDR.size):
                    ops, offsets, lens, nbytes = engine.plan(iob)
                    helper = self._io_helper() if nbytes >= HELPER_MIN_BYTES else None
                    errs = vring.complete_io(iob, fd, ops, offsets, lens, skip=OUTHDR.size, ok=Status.OK,
                                             err=Status.IOERR, every=SUB_BATCH, helper=helper)
                    engine.finish(ops, errs)
                    total += len(iob.chains)
                    if len(iob.chains) < BATCH:
                        break  # the ring was drained: enable_notification below tells if more came
            else:
                while chains := vring.pop_batch(BATCH):
                    vring.add_used_batch([(chain, engine.process(chain)) for chain in chains])
                    vring.signal_used_queue()
                    total += len(chains)
            if self.poll_ns and vring.poll(self.poll_ns):
                continue  # more requests came within the polling window: no kick, no wake-up
            if not vring.enable_notification():
                self.requests_served[vring.index] += total
                return total

    def _io_helper(self) -> ThreadPoolExecutor:
        """The helper threads of large batches (one per queue, started on first use)."""
        pool = self._helper
        if pool is None:
            with self._helper_lock:
                pool = self._helper
                if pool is None:
                    pool = self._helper = ThreadPoolExecutor(self.num_queues, thread_name_prefix="blk-io")
        return pool

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the image if this backend opened it; stop the helper threads."""
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
        if self._owns_image:
            self.image.close()
