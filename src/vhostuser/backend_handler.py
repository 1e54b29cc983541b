"""``VhostUserHandler``: applies front-end requests to a device.

This is the back-end side of every vhost-user request, for any
:class:`~vhostuser.backend.VhostUserBackend`: it owns the vrings, the worker
threads, the guest memory, the back-end channel and the negotiated features.
The protocol layer (:mod:`vhostuser.handler`) decodes, validates and
dispatches; this class decides what each request *does*.

Locking rule: a method that changes a vring takes that vring's lock (the lock
of the worker thread serving it) first, so a worker is never inside the device
while its ring changes, and GET_VRING_BASE waits for the worker to leave.
"""
from __future__ import annotations

import logging
import os
import threading
from uuid import UUID
from collections.abc import Sequence
from contextlib import ExitStack

from .backend import VhostUserBackend
from .backend_channel import BackendChannel
from .errors import DeviceError, RemoteProtocolError
from .handler import BackendReqHandler
from .memory import MAX_MEM_SLOTS, DirtyLog, GuestMemory, MemoryRegion
from .protocol.message import VhostUserProtocolFeatures as PF
from .protocol.message import VirtioFeatures as VF
from .protocol import payloads as P
from .protocol.payloads import Inflight
from .sys_util.event import EventConsumer, EventNotifier
from .sys_util.shm import MappedRegion, create_shm_fd, fd_size, map_fd
from .virtqueue.inflight import queue_region_size
from .vring import VringAddresses, VringState
from .worker import Worker

log = logging.getLogger(__name__)

#: Protocol features the daemon implements for every device.
DAEMON_PROTOCOL_FEATURES = (
    PF.MQ
    | PF.REPLY_ACK
    | PF.BACKEND_REQ
    | PF.BACKEND_SEND_FD
    | PF.CONFIGURE_MEM_SLOTS
    | PF.LOG_SHMFD
    | PF.RESET_DEVICE
    | PF.STATUS
    | PF.INBAND_NOTIFICATIONS
)

#: Ring features the library's queues implement, accepted even when the
#: device did not offer them (QEMU 7.2's vhost-user-rng acks them regardless).
RING_FEATURES = VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX

#: VHOST_USER_VRING_NOFD_MASK: bit 8 of SET_VRING_KICK/CALL/ERR's u64
VRING_NOFD = 1 << 8


class VhostUserHandler(BackendReqHandler):
    """The back-end side of the protocol for one device (see module docs)."""

    def __init__(self, backend: VhostUserBackend) -> None:
        super().__init__()
        self.backend = backend
        masks = list(backend.queues_per_thread())
        self.workers: list[Worker] = []
        self.vrings: list[VringState] = []
        locks = [threading.RLock() for _ in masks]
        owner = {}
        for thread_id, mask in enumerate(masks):
            for q in range(backend.num_queues):
                if mask >> q & 1 and q not in owner:
                    owner[q] = thread_id
        missing = [q for q in range(backend.num_queues) if q not in owner]
        if missing:
            raise DeviceError(f"queues_per_thread() leaves queues {missing} without a worker")
        self.vrings = [VringState(q, backend.max_queue_size, locks[owner[q]]) for q in range(backend.num_queues)]
        self._owner = owner
        for thread_id in range(len(masks)):
            queues = [q for q, t in owner.items() if t == thread_id]
            self.workers.append(Worker(thread_id, backend, self.vrings, queues, locks[thread_id]))
        self.memory: GuestMemory | None = None
        self.dirty_log: DirtyLog | None = None
        self.log_notifier: EventNotifier | None = None
        self.channel: BackendChannel | None = None
        self.inflight_area: MappedRegion | None = None
        self.status = 0
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = PF(0)
        #: SET_PROTOCOL_FEATURES arrived: the front-end saw F_PROTOCOL_FEATURES offered
        self.protocol_features_set = False

    # --------------------------------------------------------------- helpers
    def start_workers(self) -> None:
        """Start the worker threads and let them watch the device's registered fds."""
        self.backend.fd_registry.bind(self.workers)
        for worker in self.workers:
            worker.start()

    def stop_workers(self) -> None:
        self.backend.fd_registry.unbind()
        for worker in self.workers:
            worker.stop()

    def _vring(self, index: int) -> VringState:
        if not 0 <= index < len(self.vrings):
            raise RemoteProtocolError(f"vring index {index} out of range (the device has {len(self.vrings)} queues)")
        return self.vrings[index]

    def _worker_of(self, index: int) -> Worker:
        return self.workers[self._owner[index]]

    def _all_locks(self) -> ExitStack:
        stack = ExitStack()
        for worker in self.workers:
            stack.enter_context(worker.lock)
        return stack

    @property
    def protocol_features_negotiated(self) -> bool:
        return bool(self.acked_features & VF.PROTOCOL_FEATURES)

    def _stop_ring(self, vring: VringState) -> int:
        """Stop one ring (caller holds its lock); returns its base."""
        was_running = vring.started and vring.enabled
        self._worker_of(vring.index).unwatch_kick(vring.index)
        base = vring.stop()
        if was_running:
            self._worker_of(vring.index).call_hook(self.backend.vring_stopped, vring)
        return base

    # ------------------------------------------------------ feature negotiation
    def get_features(self) -> int:
        return int(self.backend.features()) | VF.PROTOCOL_FEATURES | VF.LOG_ALL

    def set_features(self, features: int) -> None:
        offered = self.get_features()
        extra = features & ~offered
        if extra & ~RING_FEATURES:
            raise RemoteProtocolError(f"SET_FEATURES acks features {extra:#x} that were not offered")
        if extra:
            log.warning("front-end acked ring features %#x that were not offered; accepting them", extra)
        self.acked_features = features
        event_idx = bool(features & VF.RING_EVENT_IDX)
        packed = bool(features & VF.RING_PACKED)
        for vring in self.vrings:
            with vring.lock:
                vring.event_idx = event_idx
                vring.packed = packed
                if not self.protocol_features_negotiated:
                    vring.enabled = True  # the spec: rings start enabled without protocol features
        self.backend.acked_features(features)
        self.backend.set_event_idx(event_idx)

    def get_protocol_features(self) -> int:
        return int(DAEMON_PROTOCOL_FEATURES | self.backend.protocol_features())

    def set_protocol_features(self, features: int) -> None:
        pf = PF(features & self.get_protocol_features())
        if features & ~self.get_protocol_features():
            log.warning("front-end set protocol features %#x that were not offered; ignoring them",
                        features & ~self.get_protocol_features())
        if pf & PF.INBAND_NOTIFICATIONS and not (pf & PF.BACKEND_REQ and pf & PF.REPLY_ACK):
            raise RemoteProtocolError("INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK", request=None)
        self.acked_protocol_features = pf
        self.protocol_features_set = True

    def set_owner(self) -> None:
        self.owned = True

    def reset_owner(self) -> None:
        self.reset_device()

    def get_queue_num(self) -> int:
        return self.backend.num_queues

    # ----------------------------------------------------------------- memory
    def _install_memory(self, memory: GuestMemory) -> None:
        old = self.memory
        if self.dirty_log is not None:
            memory.set_dirty_log(self.dirty_log)
        with self._all_locks():
            self.memory = memory
            for worker in self.workers:
                worker.memory = memory
            for vring in self.vrings:
                vring.update_memory(memory)
            self.backend.update_memory(memory)
        if old is not None and old is not memory:
            old.close()

    def set_mem_table(self, regions: Sequence[P.MemoryRegion], fds: Sequence[int]) -> None:
        self._install_memory(GuestMemory.from_table(regions, fds))

    def get_max_mem_slots(self) -> int:
        return MAX_MEM_SLOTS

    def add_mem_reg(self, region: P.MemoryRegion, fd: int) -> None:
        base = self.memory if self.memory is not None else GuestMemory()
        self._install_memory(base.with_region(MemoryRegion.from_description(region, fd)))

    def rem_mem_reg(self, region: P.MemoryRegion) -> None:
        if self.memory is None:
            raise DeviceError("REM_MEM_REG without a memory table")
        self._install_memory(self.memory.without_region(region.guest_phys_addr, region.memory_size))

    def set_log_base(self, log_payload: P.Log, fd: int) -> None:
        new = DirtyLog.from_fd(fd, log_payload.mmap_size, log_payload.mmap_offset)
        old = self.dirty_log
        with self._all_locks():
            self.dirty_log = new
            if self.memory is not None:
                self.memory.set_dirty_log(new)
            for vring in self.vrings:  # running queues log into the new log from now on
                if vring.queue is not None:
                    vring.queue.refresh_dirty_log()
        if old is not None:
            old.close()  # unmapped when the last snapshot using it lets go

    def set_log_fd(self, fd: int) -> None:
        if self.log_notifier is not None:
            self.log_notifier.close()
        self.log_notifier = EventNotifier.from_fd(fd)

    # ------------------------------------------------------------------ vrings
    def set_vring_num(self, index: int, num: int) -> None:
        vring = self._vring(index)
        if not 0 < num <= self.backend.max_queue_size:
            raise RemoteProtocolError(f"vring {index}: size {num} not in 1..{self.backend.max_queue_size}")
        if not vring.packed and num & (num - 1):
            raise RemoteProtocolError(f"vring {index}: split ring size {num} is not a power of two")
        with vring.lock:
            vring.size = num

    def set_vring_addr(self, addr: P.VringAddr) -> None:
        vring = self._vring(addr.index)
        with vring.lock:
            vring.addresses = VringAddresses(addr.flags, addr.descriptor, addr.used, addr.available, addr.log)
            if vring.queue is not None:  # logging switched on or off while running
                vring.queue.set_log_used(bool(addr.flags & 1), addr.log)

    def set_vring_base(self, index: int, num: int) -> None:
        vring = self._vring(index)
        with vring.lock:
            vring.base = num

    def get_vring_base(self, index: int) -> int:
        vring = self._vring(index)
        with vring.lock:
            base = self._stop_ring(vring)
            for name in ("kick", "call"):
                owner = getattr(vring, name)
                if owner is not None:
                    owner.close()
                    setattr(vring, name, None)
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        vring = self._vring(index)
        with vring.lock:
            worker = self._worker_of(index)
            worker.unwatch_kick(index)
            if vring.kick is not None:
                vring.kick.close()
                vring.kick = None
            if fd is None:
                log.warning("vring %d: no kick fd (polling mode is not supported; use in-band VRING_KICK)", index)
                return
            vring.kick = EventConsumer.from_fd(fd)
            worker.watch_kick(index)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        vring = self._vring(index)
        with vring.lock:
            if vring.call is not None:
                vring.call.close()
            vring.call = EventNotifier.from_fd(fd) if fd is not None else None

    def set_vring_err(self, index: int, fd: int | None) -> None:
        vring = self._vring(index)
        with vring.lock:
            if vring.err is not None:
                vring.err.close()
            vring.err = EventNotifier.from_fd(fd) if fd is not None else None

    def set_vring_enable(self, index: int, enable: bool) -> None:
        vring = self._vring(index)
        # QEMU 7.2's vhost-user-net enables its rings before SET_FEATURES (which then
        # acks PROTOCOL_FEATURES): SET_PROTOCOL_FEATURES already shows the negotiation
        if not (self.protocol_features_negotiated or self.protocol_features_set):
            raise RemoteProtocolError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        with vring.lock:
            was_running = vring.started and vring.enabled
            vring.enabled = bool(enable)
            worker = self._worker_of(index)
            if vring.started and vring.enabled and not was_running:
                worker.call_hook(self.backend.vring_started, vring)  # a failing hook is logged, contained
                if vring.kick_pending:  # a kick that arrived while disabled is not lost
                    worker.kick_now(index)
            elif was_running and not vring.enabled:
                worker.call_hook(self.backend.vring_stopped, vring)

    def vring_kick(self, index: int) -> None:
        """In-band kick (INBAND_NOTIFICATIONS)."""
        self._vring(index)
        self._worker_of(index).kick_now(index)

    # ------------------------------------------------------------------ config
    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        del flags
        return self.backend.get_config(offset, size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        del flags
        self.backend.set_config(offset, data)

    # ---------------------------------------------------- back-end channel
    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        # Swap under every worker lock and close the old channel only then: a
        # worker inside vring_call() on the old channel finishes it first.
        old = self.channel
        inband = channel if self.acked_protocol_features & PF.INBAND_NOTIFICATIONS else None
        with self._all_locks():
            self.channel = channel
            for vring in self.vrings:
                vring.inband = inband
            self.backend.set_backend_req_fd(channel)
        if old is not None:
            _close_quietly(old)

    def get_shared_object(self, uuid: UUID) -> int:
        return self.backend.get_shared_object(uuid)

    def send_rarp(self, mac: bytes) -> None:
        self.backend.send_rarp(bytes(mac))

    def net_set_mtu(self, mtu: int) -> None:
        self.backend.net_set_mtu(mtu)

    # ------------------------------------------------------------ inflight I/O
    def _check_inflight_geometry(self, num_queues: int, queue_size: int) -> None:
        """The inflight area is bounded by the device: at most its queue count
        and its largest queue size (a hostile front-end cannot make us create
        or map gigabytes)."""
        if not 0 < num_queues <= self.backend.num_queues:
            raise DeviceError(f"inflight area for {num_queues} queues; the device has {self.backend.num_queues}")
        if not 0 < queue_size <= self.backend.max_queue_size:
            raise DeviceError(f"inflight queue size {queue_size} not in 1..{self.backend.max_queue_size}")

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[Inflight, int]:
        """Allocate a zeroed inflight area (one region per queue, in the layout of
        the negotiated ring type); the front-end keeps it across back-end restarts."""
        self._check_inflight_geometry(num_queues, queue_size)
        packed = bool(self.acked_features & VF.RING_PACKED)
        size = num_queues * queue_region_size(queue_size, packed)
        fd = create_shm_fd(size, "vhostuser-inflight")
        try:
            self._attach_inflight(map_fd(fd, size), queue_size, packed)
        except BaseException:
            os.close(fd)
            raise
        return Inflight(size, 0, num_queues, queue_size), fd  # the dispatcher sends, then closes, the fd

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        """The inflight area (maybe of a back-end that crashed): used when rings start.
        Refused unless it holds a whole region for each of its queues and the fd
        really is that large (a shorter file would fault on access)."""
        try:
            self._check_inflight_geometry(inflight.num_queues, inflight.queue_size)
            packed = bool(self.acked_features & VF.RING_PACKED)
            need = inflight.num_queues * queue_region_size(inflight.queue_size, packed)
            if inflight.mmap_size < need:
                raise DeviceError(f"inflight area of {inflight.mmap_size} bytes is too small for "
                                  f"{inflight.num_queues} queues of {inflight.queue_size} ({need} bytes)")
            if fd_size(fd) < inflight.mmap_offset + inflight.mmap_size:
                raise DeviceError(f"inflight fd is {fd_size(fd)} bytes, shorter than its area "
                                  f"({inflight.mmap_offset:#x}+{inflight.mmap_size:#x})")
            region = map_fd(fd, inflight.mmap_size, inflight.mmap_offset)
        finally:
            os.close(fd)
        self._attach_inflight(region, inflight.queue_size, packed)

    def _attach_inflight(self, region: MappedRegion, queue_size: int, packed: bool) -> None:
        per_queue = queue_region_size(queue_size, packed)
        old = self.inflight_area
        with self._all_locks():
            self.inflight_area = region
            for vring in self.vrings:
                start = vring.index * per_queue
                vring.inflight_region = (region.buf[start:start + per_queue]
                                         if start + per_queue <= len(region.buf) else None)
                vring.inflight_queue_size = queue_size
        if old is not None:
            _close_quietly(old)

    # ------------------------------------------------------------ device state
    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        self.backend.set_device_state_fd(direction, phase, fd)
        return None  # the front-end's fd carries the state

    def check_device_state(self) -> None:
        self.backend.check_device_state()

    # ------------------------------------------------------------ status, reset
    def set_status(self, status: int) -> None:
        # Only recorded.  QEMU (7.2 and later) sends SET_STATUS 0 from
        # vhost_dev_stop *before* SET_VRING_ENABLE 0 / GET_VRING_BASE, also when
        # the VM is merely stopped (migration, `stop`): resetting here would make
        # GET_VRING_BASE report 0 instead of the ring position (the rings would
        # replay old requests after `cont`) and would refuse the SET_VRING_ENABLE
        # that follows.  Rings stop at GET_VRING_BASE; RESET_DEVICE, RESET_OWNER
        # and a disconnect reset the device.
        self.status = status

    def get_status(self) -> int:
        return self.status

    def reset_device(self) -> None:
        """Stop every ring and reset the device (RESET_DEVICE, RESET_OWNER, disconnect)."""
        with self._all_locks():
            for vring in self.vrings:
                if vring.started:
                    self._stop_ring(vring)
                self._worker_of(vring.index).unwatch_kick(vring.index)
                vring.reset()
            self.backend.reset_device()
        self.acked_features = 0

    def disconnected(self) -> None:
        """The front-end went away: stop rings, unmap memory, close every fd we
        received, reset the device and the negotiation state."""
        self.backend.cancel_device_state()
        self.reset_device()
        with self._all_locks():
            if self.memory is not None:
                self.memory.close()
                self.memory = None
                for worker in self.workers:
                    worker.memory = None
        for vring in self.vrings:
            vring.inflight_region = None
            vring.inband = None
        for attr in ("dirty_log", "log_notifier", "channel", "inflight_area"):
            obj = getattr(self, attr)
            if obj is not None:
                _close_quietly(obj)
                setattr(self, attr, None)
        self.backend.backend_channel = None
        self.backend.memory = None
        self.status = 0
        self._reset_negotiation()


def _close_quietly(obj: object) -> None:
    """Close something we own on cleanup; a failure is logged, never raised."""
    try:
        obj.close()  # type: ignore[attr-defined]
    except (OSError, BufferError) as exc:
        log.warning("closing %r: %s", obj, exc)
