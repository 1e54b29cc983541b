"""A mock vhost-user front-end: plays QEMU's role against any back-end.

:class:`MockFrontend` does what QEMU 7.2 does for a vhost-user device, in the
same message order (see ``docs/testing.md`` and the QEMU traces), and then acts
as the guest's virtio driver:

* creates guest RAM shared by fd (:class:`~vhostuser.testing.driver_memory.GuestRam`:
  several regions, a hole, user addresses distinct from guest physical ones);
* connects to a back-end's socket (or listens for a client-mode back-end);
* negotiates virtio and protocol features, takes ownership, reads config space;
* sets the memory table (SET_MEM_TABLE, or ADD_MEM_REG per region when the
  back-end offers CONFIGURE_MEM_SLOTS), hot-adds and removes regions;
* lays out split or packed rings with kick / call / err notifiers and starts them;
* places buffers through :mod:`vhostuser.virtqueue.driver` (batches, indirect
  tables, EVENT_IDX), kicks, waits for used buffers (blocking on the call fds with
  a timeout, or through callbacks);
* services back-end requests (config change, shared objects...) on the
  SET_BACKEND_REQ_FD channel;
* stops rings with GET_VRING_BASE, disconnects and reconnects the way QEMU does
  (the rings restart from the used index), supplies a dirty log (SET_LOG_BASE)
  and an inflight area (GET/SET_INFLIGHT_FD) when asked.

Typical use::

    with MockFrontend.connect(socket_path, FrontendOptions(queue_size=64)) as fe:
        used = fe.request(0, [b"ping"], [4])
        assert used.data == b"ping"

It owns every fd it creates and closes them all in :meth:`MockFrontend.close`.
Run ``python -m vhostuser.testing.frontend --help`` for a load generator that
runs in its own process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid as _uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..connection import Endpoint, Listener
from ..errors import MockFrontendError, RequestNotSupported, VringFailed
from ..frontend import BackendChannelServer, Frontend, FrontendReqHandler
from ..memory import DIRTY_LOG_PAGE_SIZE, DirtyLog
from ..protocol.message import FrontendReq
from ..protocol.message import VhostUserProtocolFeatures as PF
from ..protocol.message import VirtioFeatures as VF
from ..protocol.payloads import Inflight, IotlbMsg, Log, VringAddr
from ..sys_util.event import new_event_consumer_and_notifier
from ..sys_util.poll import Poller
from ..sys_util.shm import create_shm_fd
from ..virtqueue.defs import DESC_SIZE
from ..virtqueue.driver import PackedDriver, RingDriver, SplitDriver
from .driver_memory import DEFAULT_UVA_BASE, GuestRam, RamRegion

__all__ = [
    "FrontendOptions",
    "MockFrontend",
    "MockFrontendReqHandler",
    "UsedBuffer",
    "FrontendVring",
    "LoadStats",
    "run_load",
    "run_load_in_subprocess",
    "DEFAULT_PROTOCOL_FEATURES",
]

log = logging.getLogger(__name__)

#: Protocol features the mock front-end asks for by default (the ones it implements).
DEFAULT_PROTOCOL_FEATURES = (
    PF.MQ
    | PF.LOG_SHMFD
    | PF.REPLY_ACK
    | PF.BACKEND_REQ
    | PF.CONFIG
    | PF.BACKEND_SEND_FD
    | PF.INFLIGHT_SHMFD
    | PF.RESET_DEVICE
    | PF.CONFIGURE_MEM_SLOTS
    | PF.STATUS
    | PF.SHARED_OBJECT
)

#: VHOST_VRING_F_LOG in SET_VRING_ADDR flags
_VRING_F_LOG = 1
_MiB = 1 << 20


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass
class FrontendOptions:
    """What the mock front-end negotiates and how it lays things out.

    Tri-state feature switches (``event_idx``, ``indirect``, ``packed``): ``None``
    uses the feature if the back-end offers it, ``True`` requires it
    (:class:`MockFrontendError` if not offered), ``False`` never acks it.
    """

    #: queues to set up (None: GET_QUEUE_NUM's answer with MQ, else 1)
    num_queues: int | None = None
    #: entries per queue (one value for all, or one per queue)
    queue_size: int | Sequence[int] = 256
    #: VIRTIO_F_RING_PACKED
    packed: bool | None = False
    #: VIRTIO_F_RING_EVENT_IDX
    event_idx: bool | None = None
    #: VIRTIO_F_RING_INDIRECT_DESC
    indirect: bool | None = None
    #: place every chain through an indirect table (needs ``indirect`` negotiated)
    use_indirect: bool = False
    #: device-specific feature bits (0..23) to ack when offered
    device_features: int = 0
    #: bits to ack even if not offered (QEMU 7.2's vhost-user-rng does that)
    force_features: int = 0
    #: ack VHOST_USER_F_PROTOCOL_FEATURES when offered (False: no protocol features,
    #: rings start enabled, no SET_VRING_ENABLE)
    protocol: bool = True
    #: negotiate REPLY_ACK (then every ack-type request waits for its ack)
    reply_ack: bool = True
    #: negotiate MQ (GET_QUEUE_NUM)
    mq: bool = True
    #: use ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS is offered (False: SET_MEM_TABLE)
    mem_slots: bool = True
    #: open the back-end request channel (SET_BACKEND_REQ_FD) when offered
    backend_channel: bool = True
    #: use an inflight area (GET/SET_INFLIGHT_FD) when INFLIGHT_SHMFD is offered
    inflight: bool = False
    #: the protocol features to ask for (masked with the options above and the offer)
    protocol_features: int = int(DEFAULT_PROTOCOL_FEATURES)
    #: GET_CONFIG this many bytes at handshake when CONFIG is negotiated (0: don't)
    config_size: int = 0
    #: send SET_FEATURES twice per start, around a SET_VRING_CALL (QEMU's vhost-user-blk)
    set_features_twice: bool = False
    #: SET_VRING_ENABLE 1 at the end of :meth:`MockFrontend.start`
    enable: bool = True
    #: guest RAM layout: ``[(gpa, size), ...]``; the default has a hole
    memory: Sequence[tuple[int, int]] = ((0, 8 * _MiB), (16 * _MiB, 8 * _MiB))
    #: all regions in one shm fd at mmap_offset = gpa (QEMU-like) or one fd each
    single_fd: bool = True
    #: front-end user address of the first region
    uva_base: int = DEFAULT_UVA_BASE
    #: bytes of buffer space per queue (the driver's data area)
    data_size: int = 512 * 1024
    #: seconds to wait for a reply (None: forever)
    reply_timeout: float | None = 10.0
    #: default seconds to wait for used buffers
    timeout: float = 5.0

    def queue_size_of(self, index: int) -> int:
        """The size of queue ``index``."""
        if isinstance(self.queue_size, int):
            return self.queue_size
        return self.queue_size[index]

    def replace(self, **changes: Any) -> FrontendOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class UsedBuffer:
    """One used entry: the chain's token (split head / packed buffer id), the
    length the device reported, and (unless not asked for) the bytes it wrote."""

    token: int
    length: int
    data: bytes = b""


class MockFrontendReqHandler(FrontendReqHandler):
    """What the mock front-end does with back-end requests: records them.

    * CONFIG_CHANGE_MSG: counts, sets :attr:`config_changed`;
    * SHARED_OBJECT_ADD / REMOVE: kept in :attr:`shared_objects`; LOOKUP answers
      with a dup of the fd registered in :attr:`shared_object_fds` (else "no");
    * VRING_CALL / VRING_ERR (in-band): signal the vring as its call / err fd would;
    * IOTLB_MSG: recorded in :attr:`iotlb`.

    Every request is appended to :attr:`log` (thread-safe to read after an event).
    """

    def __init__(self, frontend: MockFrontend | None = None) -> None:
        self._frontend = frontend
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.config_changes = 0
        self.config_changed = threading.Event()
        self.shared_objects: set[_uuid.UUID] = set()
        #: fds the front-end can hand out for SHARED_OBJECT_LOOKUP (not owned)
        self.shared_object_fds: dict[_uuid.UUID, int] = {}
        self.iotlb: list[IotlbMsg] = []

    def _note(self, what: str) -> None:
        with self.lock:
            self.log.append(what)

    def config_change_msg(self) -> None:
        self._note("CONFIG_CHANGE_MSG")
        with self.lock:
            self.config_changes += 1
        self.config_changed.set()

    def shared_object_add(self, uuid: _uuid.UUID) -> None:
        self._note(f"SHARED_OBJECT_ADD {uuid}")
        with self.lock:
            self.shared_objects.add(uuid)

    def shared_object_remove(self, uuid: _uuid.UUID) -> None:
        self._note(f"SHARED_OBJECT_REMOVE {uuid}")
        with self.lock:
            if uuid not in self.shared_objects:
                raise RequestNotSupported(f"no shared object {uuid}")
            self.shared_objects.discard(uuid)

    def shared_object_lookup(self, uuid: _uuid.UUID) -> int:
        self._note(f"SHARED_OBJECT_LOOKUP {uuid}")
        fd = self.shared_object_fds.get(uuid)
        if fd is None:
            raise RequestNotSupported(f"no shared object {uuid}")
        return os.dup(fd)

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        self._note("IOTLB_MSG")
        with self.lock:
            self.iotlb.append(msg)

    def vring_call(self, index: int) -> None:
        self._note(f"VRING_CALL {index}")
        if self._frontend is not None:
            self._frontend.vring(index).call_peer.notify()

    def vring_err(self, index: int) -> None:
        self._note(f"VRING_ERR {index}")
        if self._frontend is not None:
            self._frontend.vring(index).err_peer.notify()


class FrontendVring:
    """One queue as the mock front-end sees it: notifiers, placement in guest RAM,
    the ring driver, and used buffers reaped but not yet handed out."""

    def __init__(self, index: int, size: int, ring_gpa: int, ring_bytes: int, data_gpa: int, data_size: int) -> None:
        self.index = index
        self.size = size
        self.ring_gpa = ring_gpa
        self.ring_bytes = ring_bytes
        self.data_gpa = data_gpa
        self.data_size = data_size
        # kick: we notify, the back-end consumes; call / err: the other way round
        self.kick_peer, self.kick = new_event_consumer_and_notifier()
        try:
            self.call, self.call_peer = new_event_consumer_and_notifier()
            try:
                self.err, self.err_peer = new_event_consumer_and_notifier()
            except BaseException:
                self.call.close()
                self.call_peer.close()
                raise
        except BaseException:
            self.kick_peer.close()
            self.kick.close()
            raise
        self.driver: RingDriver | None = None
        self.started = False
        self.failed = False
        #: reaped used buffers not yet returned to the caller
        self.backlog: list[UsedBuffer] = []
        #: chains placed and not yet used, by token
        self.outstanding = 0
        self.callback: Callable[[int, list[UsedBuffer]], None] | None = None
        self.kicks = 0
        self.calls = 0

    def close(self) -> None:
        """Close the six notifier fds."""
        for obj in (self.kick_peer, self.kick, self.call, self.call_peer, self.err, self.err_peer):
            obj.close()

    def __repr__(self) -> str:
        return f"<FrontendVring {self.index} size={self.size} started={self.started} outstanding={self.outstanding}>"


def _ring_bytes(size: int) -> int:
    """Bytes to reserve for a ring of ``size`` (enough for split or packed, aligned)."""
    split = DESC_SIZE * size + 16 + (6 + 2 * size) + 16 + (6 + 8 * size) + 16
    return _align(max(split, DESC_SIZE * size + 64), 4096)


class MockFrontend:
    """A vhost-user front-end and virtio driver for tests and load (see module docs).

    Build it with :meth:`connect` (server-mode back-ends) or :meth:`listen` +
    :meth:`accept` (client-mode back-ends); both do the whole QEMU-like bring-up
    unless ``start=False``.  Single-threaded: use one thread (back-end requests
    are serviced on a thread of their own).
    """

    def __init__(self, options: FrontendOptions | None = None, **overrides: Any) -> None:
        opts = options or FrontendOptions()
        if overrides:
            opts = opts.replace(**overrides)
        self.options = opts
        self.ram = GuestRam(opts.memory, single_fd=opts.single_fd, uva_base=opts.uva_base)
        self.fe: Frontend | None = None
        self.listener: Listener | None = None
        self.socket_path: str | None = None
        self.handler = MockFrontendReqHandler(self)
        self.channel: BackendChannelServer | None = None
        self._channel_thread: threading.Thread | None = None
        self.vrings: list[FrontendVring] = []
        self._poller = Poller()
        #: virtio features the back-end offered / we acked
        self.offered_features = 0
        self.acked_features = 0
        #: protocol features the back-end offered / we negotiated
        self.offered_protocol_features = PF(0)
        self.protocol_features = PF(0)
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        #: config space read at handshake (``options.config_size`` bytes)
        self.config: bytes | None = None
        self.dirty_log: DirtyLog | None = None
        self._log_fd: int | None = None
        self._log_size = 0
        self.inflight: Inflight | None = None
        self._inflight_fd: int | None = None
        self._regions_sent: set[int] = set()  # gpas the back-end has (ADD_MEM_REG mode)
        #: bases GET_VRING_BASE returned at the last :meth:`stop`
        self.last_bases: list[int] = []
        #: number of connections made (1 after the first handshake)
        self.connections = 0
        self._closed = False

    # ================================================================ set-up
    @classmethod
    def connect(cls, socket_path: str | os.PathLike[str], options: FrontendOptions | None = None, *,
                start: bool = True, timeout: float = 5.0, **overrides: Any) -> MockFrontend:
        """Connect to a back-end listening at ``socket_path`` (retrying until
        ``timeout`` if the socket is not there yet), do the handshake and, with
        ``start``, start every ring."""
        self = cls(options, **overrides)
        self.socket_path = path = os.fspath(socket_path)
        return self._bring_up(lambda: self._connect_endpoint(path, timeout), start)

    def _bring_up(self, endpoint: Callable[[], Endpoint], start: bool) -> MockFrontend:
        """Attach the endpoint, handshake, start the rings; closes everything on failure."""
        try:
            self._attach(endpoint())
            self.handshake()
            if start:
                self.start()
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def from_socket(cls, sock: socket.socket, options: FrontendOptions | None = None, *, start: bool = True,
                    **overrides: Any) -> MockFrontend:
        """Drive a back-end over an already-connected socket (taken over, e.g. one
        end of a socketpair whose other end the back-end got with ``--fd``).
        :meth:`reconnect` is not possible."""
        return cls(options, **overrides)._bring_up(lambda: Endpoint(sock, FrontendReq, replies=True), start)

    @classmethod
    def listen(cls, socket_path: str | os.PathLike[str], options: FrontendOptions | None = None,
               **overrides: Any) -> MockFrontend:
        """Listen at ``socket_path`` for a client-mode back-end (QEMU ``server=on``);
        then :meth:`accept`."""
        self = cls(options, **overrides)
        try:
            self.socket_path = os.fspath(socket_path)
            self.listener = Listener(self.socket_path)
        except BaseException:
            self.close()
            raise
        return self

    def accept(self, timeout: float | None = None, *, start: bool = True, read_config: bool = True) -> None:
        """Accept the back-end's connection, handshake and (with ``start``) start rings."""
        if self.listener is None:
            raise MockFrontendError("accept() needs listen()")
        sock = self.listener.accept(timeout if timeout is not None else self.options.timeout)
        self._attach(Endpoint(sock, FrontendReq, replies=True))
        self.handshake(read_config=read_config)
        if start:
            self.start()

    @staticmethod
    def _connect_endpoint(path: str, timeout: float) -> Endpoint:
        """Connect, retrying with a short back-off (the back-end may still be
        starting up); bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                return Endpoint.connect(path, FrontendReq, replies=True)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() + delay > deadline:
                    raise
                # waiting for another process to create its socket: nothing to poll on
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _attach(self, endpoint: Endpoint) -> None:
        self.fe = Frontend(endpoint, reply_timeout=self.options.reply_timeout)
        self.connections += 1
        self._regions_sent.clear()

    @property
    def frontend(self) -> Frontend:
        """The protocol client (send any request with ``.request(...)``)."""
        if self.fe is None:
            raise MockFrontendError("not connected")
        return self.fe

    @property
    def connected(self) -> bool:
        """Whether a connection is open."""
        return self.fe is not None

    # ============================================================ handshake
    def _wanted_protocol_features(self) -> PF:
        o = self.options
        want = PF(o.protocol_features)
        if not o.reply_ack:
            want &= ~PF.REPLY_ACK
        if not o.mq:
            want &= ~PF.MQ
        if not o.mem_slots:
            want &= ~PF.CONFIGURE_MEM_SLOTS
        if not o.backend_channel:
            want &= ~(PF.BACKEND_REQ | PF.BACKEND_SEND_FD)
        if not o.inflight:
            want &= ~PF.INFLIGHT_SHMFD
        return want

    def _features_to_ack(self, offered: int) -> int:
        o = self.options
        acked = offered & (VF.VERSION_1 | (VF.PROTOCOL_FEATURES if o.protocol else 0)
                           | (o.device_features & 0xFFFFFF))
        for flag, choice in ((VF.RING_EVENT_IDX, o.event_idx), (VF.RING_INDIRECT_DESC, o.indirect),
                             (VF.RING_PACKED, o.packed)):
            if choice is None:
                acked |= offered & flag
            elif choice:
                if not offered & flag:
                    raise MockFrontendError(f"the back-end does not offer {flag.name} (features {offered:#x})")
                acked |= flag
        return int(acked | o.force_features)

    def handshake(self, *, read_config: bool = True) -> None:
        """Everything QEMU 7.2 does when the device is realized (or reconnects):
        GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
        SET_BACKEND_REQ_FD, SET_OWNER, GET_FEATURES, SET_VRING_CALL + SET_VRING_ERR
        per ring, GET_CONFIG."""
        fe = self.frontend
        self.offered_features = fe.get_features()
        self.protocol_features = PF(0)
        if self.offered_features & VF.PROTOCOL_FEATURES and self.options.protocol:
            self.offered_protocol_features = fe.get_protocol_features()
            self.protocol_features = self.offered_protocol_features & self._wanted_protocol_features()
            if self.protocol_features & PF.BACKEND_SEND_FD and not self.protocol_features & PF.BACKEND_REQ:
                self.protocol_features &= ~PF.BACKEND_SEND_FD
            fe.set_protocol_features(self.protocol_features)
        if self.protocol_features & PF.MQ:
            self.queue_num = fe.get_queue_num()
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = fe.get_max_mem_slots()
        if self.protocol_features & PF.BACKEND_REQ:
            self.channel = fe.open_backend_channel(self.handler)
            self._channel_thread = self.channel.start()
        fe.set_owner()
        self.acked_features = self._features_to_ack(fe.get_features())
        self._setup_vrings()
        for v in self.vrings:
            fe.set_vring_call(v.index, v.call_peer.fileno())
            fe.set_vring_err(v.index, v.err_peer.fileno())
        if read_config and self.options.config_size and self.protocol_features & PF.CONFIG:
            self.config = fe.get_config(0, self.options.config_size)
        log.debug("handshake done: features %#x, protocol features %#x, %d queues",
                  self.acked_features, int(self.protocol_features), len(self.vrings))

    def _setup_vrings(self) -> None:
        """Create the queues (once: they survive reconnects, as guest RAM does)."""
        want = self.options.num_queues
        if want is None:
            want = self.queue_num if self.queue_num else 1
        if self.queue_num is not None and want > self.queue_num:
            raise MockFrontendError(f"{want} queues asked for, the back-end has {self.queue_num}")
        if self.vrings:
            if len(self.vrings) != want:
                raise MockFrontendError("the number of queues changed across a reconnect")
            return
        for i in range(want):
            size = self.options.queue_size_of(i)
            rb = _ring_bytes(size)
            ring = self.ram.allocate(rb + self.options.data_size, prefer=i)
            v = FrontendVring(i, size, ring, rb, ring + rb, self.options.data_size)
            self.vrings.append(v)
            self._poller.register(v.call.fileno(), 2 * i)
            self._poller.register(v.err.fileno(), 2 * i + 1)

    # ================================================================ start
    @property
    def packed(self) -> bool:
        """Whether the rings are packed (RING_PACKED acked)."""
        return bool(self.acked_features & VF.RING_PACKED)

    @property
    def event_idx(self) -> bool:
        """Whether EVENT_IDX was acked."""
        return bool(self.acked_features & VF.RING_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        """Whether INDIRECT_DESC was acked."""
        return bool(self.acked_features & VF.RING_INDIRECT_DESC)

    def _effective_features(self) -> int:
        f = self.acked_features
        if self.dirty_log is not None:
            f |= VF.LOG_ALL
        return f

    def start(self, bases: Sequence[int] | None = None, *, enable: bool | None = None) -> None:
        """Start every ring like QEMU's vhost_dev_start: SET_VRING_CALL,
        SET_FEATURES, (inflight), memory table, then per ring SET_VRING_NUM /
        BASE / ADDR / KICK, then SET_VRING_ENABLE 1.

        ``bases=None`` lays the rings out afresh (base 0); otherwise the existing
        drivers continue and ``bases[i]`` is sent in SET_VRING_BASE (e.g.
        :attr:`last_bases` after :meth:`stop`).
        """
        fe = self.frontend
        enable = self.options.enable if enable is None else enable
        for v in self.vrings:
            fe.set_vring_call(v.index, v.call_peer.fileno())
        fe.set_features(self._effective_features())
        if self.protocol_features & PF.INFLIGHT_SHMFD:
            self._set_inflight()
            fe.set_features(self._effective_features())
        elif self.options.set_features_twice:
            for v in self.vrings:
                fe.set_vring_call(v.index, v.call_peer.fileno())
            fe.set_features(self._effective_features())
        self.send_memory_table()
        if self.dirty_log is not None and self._log_fd is not None:
            fe.set_log_base(Log(self._log_size, 0), self._log_fd)
        for v in self.vrings:
            if bases is None or v.driver is None:
                self._new_driver(v)
                base = 0x80008000 if self.packed else 0
            else:
                base = bases[v.index]
            fe.set_vring_num(v.index, v.size)
            fe.set_vring_base(v.index, base)
            fe.set_vring_addr(self._vring_addr(v))
            fe.set_vring_kick(v.index, v.kick_peer.fileno())
            v.started = True
            v.failed = False
        if enable and self.acked_features & VF.PROTOCOL_FEATURES:
            for v in self.vrings:
                fe.set_vring_enable(v.index, True)

    def _new_driver(self, v: FrontendVring) -> None:
        v.driver = RingDriver.create(self.ram.memory, v.size, packed=self.packed, ring_gpa=v.ring_gpa,
                                     data_gpa=v.data_gpa, data_size=v.data_size, event_idx=self.event_idx)
        v.backlog.clear()
        v.outstanding = 0

    def _vring_addr(self, v: FrontendVring) -> VringAddr:
        drv = self._driver(v)
        uva = self.ram.gpa_to_uva
        logging_on = self.dirty_log is not None
        return VringAddr(v.index, _VRING_F_LOG if logging_on else 0, uva(drv.desc_gpa), uva(drv.device_gpa),
                         uva(drv.driver_gpa), drv.device_gpa if logging_on else 0)

    def enable(self, index: int | None = None, enable: bool = True) -> None:
        """SET_VRING_ENABLE for one ring (or all)."""
        for v in self.vrings if index is None else [self.vring(index)]:
            self.frontend.set_vring_enable(v.index, enable)

    def send_memory_table(self) -> None:
        """SET_MEM_TABLE with every region, or (CONFIGURE_MEM_SLOTS) ADD_MEM_REG for
        each region the back-end does not have yet."""
        fe = self.frontend
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            for r in self.ram.all_regions():
                if r.guest_phys_addr not in self._regions_sent:
                    fe.add_mem_reg(r.payload(), r.fd)
                    self._regions_sent.add(r.guest_phys_addr)
        else:
            fe.set_mem_table(self.ram.payloads(), self.ram.fds())

    def drop_inflight_area(self) -> None:
        """Forget the inflight area: the next :meth:`start` asks the back-end for a
        new (zeroed) one, as the QEMU on a live-migration destination does while
        the rings continue from the source's bases."""
        if self._inflight_fd is not None:
            os.close(self._inflight_fd)
        self._inflight_fd = None
        self.inflight = None

    def _set_inflight(self) -> None:
        fe = self.frontend
        if self._inflight_fd is None:
            size = max(v.size for v in self.vrings) if self.vrings else 1
            self.inflight, self._inflight_fd = fe.get_inflight_fd(len(self.vrings), size)
        assert self.inflight is not None
        fe.set_inflight_fd(self.inflight, self._inflight_fd)

    # ================================================================= stop
    def stop(self) -> list[int]:
        """Stop every ring like QEMU: SET_VRING_ENABLE 0 each, then GET_VRING_BASE
        each.  Returns (and keeps in :attr:`last_bases`) the bases."""
        fe = self.frontend
        if self.acked_features & VF.PROTOCOL_FEATURES:
            for v in self.vrings:
                fe.set_vring_enable(v.index, False)
        bases = [fe.get_vring_base(v.index) for v in self.vrings]
        for v in self.vrings:
            v.started = False
        self.last_bases = bases
        return bases

    def restart(self) -> None:
        """:meth:`start` again from :attr:`last_bases` (after :meth:`stop`)."""
        self.start(self.last_bases)

    # =========================================================== reconnect
    def used_bases(self) -> list[int]:
        """The SET_VRING_BASE values QEMU uses when GET_VRING_BASE is impossible (the
        back-end went away): the used index.  Reaps every used buffer first (kept
        for :meth:`reap`)."""
        bases = []
        for v in self.vrings:
            drv = v.driver
            if drv is None:
                bases.append(0)
                continue
            self._reap_into_backlog(v)
            if isinstance(drv, PackedDriver):
                pos = drv.next_used | drv.used_wrap << 15
                bases.append(pos | pos << 16)
            else:
                assert isinstance(drv, SplitDriver)
                bases.append(drv.used_idx())
        return bases

    def disconnect(self) -> None:
        """Drop the connection abruptly (as when QEMU dies): no GET_VRING_BASE.
        Chains in flight stay placed in guest RAM."""
        if self.channel is not None:
            self.channel.close()
            if self._channel_thread is not None:
                self._channel_thread.join(5)
            self.channel = None
            self._channel_thread = None
        if self.fe is not None:
            try:
                self.fe.endpoint.socket.shutdown(2)
            except OSError:
                pass
            self.fe.close()
            self.fe = None
        for v in self.vrings:
            v.started = False

    def reconnect(self, *, timeout: float | None = None, start: bool = True) -> None:
        """Reconnect and re-handshake like QEMU's ``reconnect=``: same handshake as
        at boot minus GET_CONFIG, then the rings restart from the used index
        (chains the back-end had not completed are processed again: rings with
        chains outstanding are kicked once started)."""
        self.disconnect()
        timeout = self.options.timeout if timeout is None else timeout
        if self.listener is not None:
            self.accept(timeout, start=False, read_config=False)
        else:
            if self.socket_path is None:
                raise MockFrontendError("cannot reconnect a front-end made from a socket")
            self._attach(self._connect_endpoint(self.socket_path, timeout))
            self.handshake(read_config=False)
        if start:
            # The used index as it is now: the old session may have completed chains
            # until it noticed the disconnect; once the new one answered the handshake
            # a (single-session) back-end is done with the old one.
            self.start(self.used_bases())
            # like vhost-user-blk: "kick right away to begin processing requests already in vring"
            for v in self.vrings:
                if v.outstanding:
                    self.kick(v.index)

    # ========================================================= memory hot plug
    def add_region(self, gpa: int, size: int) -> RamRegion:
        """Hot-add a region (ADD_MEM_REG; needs CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE again)."""
        region = self.ram.add_region(gpa, size)
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            self.frontend.add_mem_reg(region.payload(), region.fd)
            self._regions_sent.add(gpa)
        else:
            self.frontend.set_mem_table(self.ram.payloads(), self.ram.fds())
        return region

    def remove_region(self, gpa: int) -> None:
        """Hot-remove a region added with :meth:`add_region` (REM_MEM_REG, or SET_MEM_TABLE)."""
        region = next((r for r in self.ram.extra if r.guest_phys_addr == gpa), None)
        if region is None:
            raise MockFrontendError(f"no hot-added region at {gpa:#x}")
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            self.frontend.rem_mem_reg(region.payload())
            self._regions_sent.discard(gpa)
            self.ram.remove_region(gpa)
        else:
            self.ram.remove_region(gpa)
            self.frontend.set_mem_table(self.ram.payloads(), self.ram.fds())

    # ============================================================ dirty log
    def enable_dirty_log(self) -> DirtyLog:
        """Start dirty logging as QEMU does for migration: SET_LOG_BASE with a
        shm log, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG.
        Returns the log as this process sees it."""
        if not self.protocol_features & PF.LOG_SHMFD:
            raise MockFrontendError("the back-end did not negotiate LOG_SHMFD")
        if self.dirty_log is None:
            pages = (self.ram.top + DIRTY_LOG_PAGE_SIZE - 1) // DIRTY_LOG_PAGE_SIZE
            size = _align(max(1, (pages + 7) // 8), 4096)
            fd = create_shm_fd(size, "dirty-log")
            try:
                self.dirty_log = DirtyLog.from_fd(os.dup(fd), size)
            except BaseException:
                os.close(fd)
                raise
            self._log_fd, self._log_size = fd, size
        fe = self.frontend
        assert self._log_fd is not None
        fe.set_log_base(Log(self._log_size, 0), self._log_fd)
        fe.set_features(self._effective_features())
        for v in self.vrings:
            if v.driver is not None:
                fe.set_vring_addr(self._vring_addr(v))
        return self.dirty_log

    # ============================================================ data path
    def vring(self, index: int) -> FrontendVring:
        """Queue ``index``."""
        return self.vrings[index]

    def _driver(self, v: FrontendVring) -> RingDriver:
        if v.driver is None:
            raise MockFrontendError(f"queue {v.index} was never started")
        return v.driver

    def driver(self, index: int) -> RingDriver:
        """The ring driver of queue ``index`` (raw access for hostile tests)."""
        return self._driver(self.vring(index))

    def add(self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
            indirect: bool | None = None) -> int:
        """Place one chain (``readable`` buffers' contents, ``writable`` buffers'
        sizes) on queue ``index``; returns its token.  Not visible until :meth:`publish`."""
        v = self.vring(index)
        drv = self._driver(v)
        if indirect is None:
            indirect = self.options.use_indirect
        if indirect and not self.indirect:
            raise MockFrontendError("indirect descriptors were not negotiated")
        token = drv.add(readable, writable, indirect=indirect)
        v.outstanding += 1
        return token

    def kick(self, index: int) -> None:
        """Notify the back-end (kick fd, or in-band VRING_KICK when negotiated)."""
        v = self.vring(index)
        v.kicks += 1
        if self.protocol_features & PF.INBAND_NOTIFICATIONS:
            self.frontend.vring_kick(index)
        else:
            v.kick.notify()

    def publish(self, index: int, *, kick: bool = True, force_kick: bool = False) -> bool:
        """Make placed chains visible; kick if the ring asks for it (EVENT_IDX /
        NO_NOTIFY aware) or ``force_kick``.  Returns whether it kicked."""
        drv = self._driver(self.vring(index))
        drv.publish()
        needed = drv.kick_needed()
        if kick and (needed or force_kick):
            self.kick(index)
            return True
        return False

    def _reap_into_backlog(self, v: FrontendVring, read_data: bool = True) -> None:
        drv = v.driver
        if drv is None:
            return
        for token, length in drv.get_used():
            data = drv.read_written(token, length) if read_data and length else b""
            v.backlog.append(UsedBuffer(token, length, data))
            v.outstanding -= 1

    def reap(self, index: int, *, read_data: bool = True) -> list[UsedBuffer]:
        """Used buffers available now (no waiting)."""
        v = self.vring(index)
        self._reap_into_backlog(v, read_data)
        out, v.backlog = v.backlog, []
        return out

    def _check_err(self, v: FrontendVring) -> None:
        if v.err.consume():
            v.failed = True
        if v.failed:
            raise VringFailed(f"the back-end signalled the error fd of vring {v.index}", index=v.index)

    def _wait_events(self, timeout: float) -> None:
        """Wait for any call / err fd (bounded); record what fired."""
        for token, _ in self._poller.wait(timeout):
            v = self.vrings[token // 2]
            if token % 2:
                if v.err.consume():
                    v.failed = True
            elif v.call.consume():
                v.calls += 1

    def wait_used(self, index: int, count: int = 1, timeout: float | None = None, *,
                  read_data: bool = True) -> list[UsedBuffer]:
        """Block until at least ``count`` used buffers arrived on queue ``index``
        (polling its call fd); return every one reaped.  Raises
        :class:`TimeoutError`, or :class:`VringFailed` if the back-end signalled
        the queue's error fd."""
        v = self.vring(index)
        deadline = time.monotonic() + (self.options.timeout if timeout is None else timeout)
        self._reap_into_backlog(v, read_data)
        while len(v.backlog) < count:
            self._check_err(v)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"queue {index}: {len(v.backlog)} of {count} used buffers after the timeout")
            # the call fd wakes us; the cap re-checks the ring in case a notification
            # was (legitimately) suppressed while we re-armed EVENT_IDX
            self._wait_events(min(remaining, 0.2))
            self._reap_into_backlog(v, read_data)
        out, v.backlog = v.backlog, []
        return out

    def wait_err(self, index: int, timeout: float | None = None) -> bool:
        """Wait until the back-end signals queue ``index``'s error fd; False on timeout."""
        v = self.vring(index)
        deadline = time.monotonic() + (self.options.timeout if timeout is None else timeout)
        while not v.failed:
            if v.err.consume():
                v.failed = True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wait_events(min(remaining, 0.2))
        return True

    def request(self, index: int, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
                timeout: float | None = None, indirect: bool | None = None) -> UsedBuffer:
        """One round trip: place a chain, publish, kick, wait for that chain.
        Other used buffers reaped meanwhile stay for :meth:`reap`."""
        v = self.vring(index)
        token = self.add(index, readable, writable, indirect=indirect)
        self.publish(index)
        deadline = time.monotonic() + (self.options.timeout if timeout is None else timeout)
        while True:
            self._reap_into_backlog(v)
            for k, used in enumerate(v.backlog):
                if used.token == token:
                    del v.backlog[k]
                    return used
            self._check_err(v)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"queue {index}: chain {token} not used within the timeout")
            self._wait_events(min(remaining, 0.2))

    def transfer(self, index: int, requests: Iterable[tuple[Sequence[bytes], Sequence[int]]], *,
                 timeout: float | None = None, read_data: bool = True) -> list[UsedBuffer]:
        """Run many requests ``(readable, writable)`` through queue ``index`` in
        batches (as many as the ring and the data area hold), and return their
        used buffers in request order.  ``timeout`` bounds the wait for progress."""
        v = self.vring(index)
        drv = self._driver(v)
        reqs = list(requests)
        results: list[UsedBuffer | None] = [None] * len(reqs)
        by_token: dict[int, int] = {}
        budget = drv.data_size // 2
        in_flight_bytes: dict[int, int] = {}
        nxt = done = 0
        wait = self.options.timeout if timeout is None else timeout
        # keep results of chains placed before this call for reap()
        self._reap_into_backlog(v, read_data)
        earlier, v.backlog = v.backlog, []
        try:
            while done < len(reqs):
                placed = False
                while nxt < len(reqs):
                    readable, writable = reqs[nxt]
                    nbytes = sum(map(len, readable)) + sum(writable) + 16 * (len(readable) + len(writable))
                    ndesc = 1 if self.options.use_indirect else len(readable) + len(writable)
                    if drv.num_free < ndesc or (in_flight_bytes and sum(in_flight_bytes.values()) + nbytes > budget):
                        break
                    token = self.add(index, readable, writable)
                    by_token[token] = nxt
                    in_flight_bytes[token] = nbytes
                    nxt += 1
                    placed = True
                if placed:
                    self.publish(index)
                got = self.wait_used(index, 1, wait, read_data=read_data)
                for used in got:
                    k = by_token.pop(used.token, None)
                    if k is None:
                        earlier.append(used)
                        continue
                    in_flight_bytes.pop(used.token, None)
                    results[k] = used
                    done += 1
        finally:
            v.backlog = earlier + v.backlog
        return results  # type: ignore[return-value]

    # -------------------------------------------------------------- callbacks
    def on_used(self, index: int, callback: Callable[[int, list[UsedBuffer]], None] | None) -> None:
        """Call ``callback(index, used_buffers)`` from :meth:`process_events` when
        queue ``index`` has used buffers (None: stop)."""
        self.vring(index).callback = callback

    def process_events(self, timeout: float = 0.0) -> int:
        """Wait up to ``timeout`` for call / err fds, then hand used buffers to the
        queues' callbacks.  Returns the number of buffers delivered."""
        self._wait_events(timeout)
        n = 0
        for v in self.vrings:
            if v.callback is not None and v.driver is not None:
                used = self.reap(v.index)
                if used:
                    n += len(used)
                    v.callback(v.index, used)
        return n

    # ================================================================ misc
    def sync(self) -> None:
        """A round trip (GET_FEATURES): when it returns, the back-end has handled
        every request sent before."""
        self.frontend.get_features()

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG."""
        return self.frontend.get_config(offset, size)

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG."""
        self.frontend.set_config(offset, data)

    # ============================================================ lifetime
    def close(self) -> None:
        """Disconnect and release everything (fds, mappings, threads).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.disconnect()
        finally:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            for v in self.vrings:
                v.driver = None
                v.close()
            self._poller.close()
            if self.dirty_log is not None:
                self.dirty_log.close()
                self.dirty_log = None
            for attr in ("_log_fd", "_inflight_fd"):
                fd = getattr(self, attr)
                if fd is not None:
                    os.close(fd)
                    setattr(self, attr, None)
            self.ram.close()

    def __enter__(self) -> MockFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<MockFrontend {self.socket_path} features={self.acked_features:#x} "
                f"protocol={int(self.protocol_features):#x} queues={len(self.vrings)}>")


# ===================================================================== load
@dataclass
class LoadStats:
    """What :func:`run_load` measured."""

    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    kicks: int = 0
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second of the run (0 if it took no time)."""
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict, ``requests_per_second`` included."""
        d = dataclasses.asdict(self)
        d["requests_per_second"] = self.requests_per_second
        return d


def run_load(fe: MockFrontend, index: int = 0, *, count: int = 1000, readable: int = 64,
             writable: int = 64, batch: int = 32, timeout: float = 10.0) -> LoadStats:
    """Push ``count`` requests (``readable`` bytes out, ``writable`` bytes of room
    each) through queue ``index`` in batches of ``batch``; data is not read back."""
    payload = bytes(range(256)) * (readable // 256 + 1)
    req = ([payload[:readable]] if readable else [], [writable] if writable else [])
    stats = LoadStats()
    v = fe.vring(index)
    kicks0, calls0 = v.kicks, v.calls
    t0 = time.perf_counter()
    left = count
    while left:
        n = min(batch, left)
        used = fe.transfer(index, [req] * n, timeout=timeout, read_data=False)
        stats.requests += n
        stats.bytes_in += sum(u.length for u in used)
        left -= n
    stats.seconds = time.perf_counter() - t0
    stats.bytes_out = count * readable
    stats.kicks, stats.calls = v.kicks - kicks0, v.calls - calls0
    return stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vhostuser.testing.frontend",
                                description="Mock vhost-user front-end: connect to a back-end and load one queue.")
    p.add_argument("--socket-path", required=True, help="the back-end's socket")
    p.add_argument("--queue", type=int, default=0, help="queue to load (default 0)")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--count", type=int, default=10000, help="requests to send")
    p.add_argument("--readable", type=int, default=64, help="device-readable bytes per request")
    p.add_argument("--writable", type=int, default=64, help="device-writable bytes per request")
    p.add_argument("--batch", type=int, default=64, help="requests per batch")
    p.add_argument("--packed", action="store_true", help="use packed rings")
    p.add_argument("--no-event-idx", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    return p


def run_load_in_subprocess(socket_path: str | os.PathLike[str], *, count: int = 10000, readable: int = 64, writable: int = 64,
                           batch: int = 64, queue: int = 0, queue_size: int = 256, packed: bool = False,
                           timeout: float = 60.0) -> dict[str, Any]:
    """Run the load generator in a separate Python process (so it does not share
    the GIL with an in-process back-end); returns its :class:`LoadStats` as a dict."""
    import subprocess  # noqa: PLC0415

    cmd = [sys.executable, "-m", "vhostuser.testing.frontend", "--socket-path", os.fspath(socket_path),
           "--count", str(count), "--readable", str(readable), "--writable", str(writable),
           "--batch", str(batch), "--queue", str(queue), "--queue-size", str(queue_size)]
    if packed:
        cmd.append("--packed")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise MockFrontendError(f"load generator failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhostuser.testing.frontend``: print :class:`LoadStats` as JSON."""
    args = _parser().parse_args(argv)
    opts = FrontendOptions(queue_size=args.queue_size, packed=True if args.packed else False,
                           event_idx=False if args.no_event_idx else None, timeout=args.timeout)
    with MockFrontend.connect(args.socket_path, opts) as fe:
        stats = run_load(fe, args.queue, count=args.count, readable=args.readable, writable=args.writable,
                         batch=args.batch, timeout=args.timeout)
        fe.stop()
    json.dump(stats.as_dict(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
