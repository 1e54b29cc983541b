"""``VsockBackend``: the vhost-user-vsock device (virtio device id 19).

The glue between :class:`~vhostuser.devices.vsock.engine.VsockEngine` and the
daemon's rings:

* queue 0 (rx, device -> guest): filled with the engine's packets while it has
  some and the guest offers buffers.  With no buffer left the engine keeps its
  packets; its host sockets stop being polled once their read-ahead is full,
  so host writers block instead of data being dropped.  The guest's next rx
  kick (or :meth:`vring_started`) resumes.
* queue 1 (tx, guest -> device): each chain is one packet, header and payload
  spread over any number of descriptors.
* the event queue (2) stays in QEMU: a vhost-user-vsock back-end has two rings.
* config space: ``le64 guest_cid`` (QEMU 7.2 reads it with GET_CONFIG 0/8 and
  needs PROTOCOL_F_CONFIG, which the base class offers when ``config_space``
  is set).

Host sockets are polled by the worker thread (token ``FIRST_DEVICE_TOKEN + 1 +
fd``); sibling VMs wake this device through an event pair (token
``FIRST_DEVICE_TOKEN``).
"""
from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ...errors import ChainTooShort, VsockPacketError
from ...sys_util.event import new_event_consumer_and_notifier
from .engine import SiblingRegistry, VsockEngine, VsockEngineConfig
from .packet import HDR_SIZE, MAX_PKT_PAYLOAD, VIRTIO_VSOCK_F_SEQPACKET, VIRTIO_VSOCK_F_STREAM, VsockHeader

if TYPE_CHECKING:
    from ...memory import GuestMemory
    from ...vring import VringState

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
_SIBLING_TOKEN = FIRST_DEVICE_TOKEN
_FD_TOKEN_BASE = FIRST_DEVICE_TOKEN + 1
#: tx chains handled per tx kick before the rx side gets a turn
_TX_BATCH = 64


class _WorkerWatcher:
    """:class:`~vhostuser.devices.vsock.engine.FdWatcher` on the device's worker
    poller, through :meth:`VhostUserBackend.register_fd` / ``modify_fd`` /
    ``unregister_fd`` (token ``_FD_TOKEN_BASE + fd``)."""

    def __init__(self, backend: VsockBackend) -> None:
        self.backend = backend
        self._events: dict[int, int] = {}

    def set_interest(self, fd: int, events: int) -> None:
        prev = self._events.get(fd, 0)
        if events == prev:
            return
        token = _FD_TOKEN_BASE + fd
        if not events:
            del self._events[fd]
            try:
                self.backend.unregister_fd(fd)
            except (KeyError, ValueError, OSError, AttributeError) as exc:
                # the daemon already stopped its worker (and closed its poller)
                log.debug("unwatching fd %d: %r", fd, exc)
            return
        if prev:
            self.backend.modify_fd(fd, token, events)
        else:
            self.backend.register_fd(fd, token, events=events)
        self._events[fd] = events


class VsockBackend(VhostUserBackend):
    """A vhost-user-vsock device for one guest (hybrid vsock over AF_UNIX)."""

    num_queues = 2

    def __init__(self, config: VsockEngineConfig, *, registry: SiblingRegistry | None = None,
                 queue_size: int = 1024) -> None:
        super().__init__()
        self.max_queue_size = queue_size  # per instance (--queue-size)
        self.config_space = struct.pack("<Q", config.guest_cid)
        self._lock = threading.RLock()
        self._wake_consumer, self._wake_notifier = new_event_consumer_and_notifier()
        self.engine = VsockEngine(config, registry=registry, wakeup=self._wake_notifier.notify)
        self._watcher: _WorkerWatcher | None = None

    @property
    def device_features(self) -> int:  # type: ignore[override]
        bits = 1 << VIRTIO_VSOCK_F_STREAM
        if self.engine.config.seqpacket:
            bits |= 1 << VIRTIO_VSOCK_F_SEQPACKET
        return bits

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind the host listeners (idempotent; the CLI calls it before serving so
        that a bad ``uds-path`` fails early).  Polling starts once the daemon's
        worker exists (:meth:`attach`)."""
        with self._lock:
            self.engine.start()

    def attach(self) -> None:
        """Start the engine and hand its fds to the worker poller (idempotent;
        called automatically on the first memory table / ring start)."""
        with self._lock:
            if self._watcher is not None:
                return
            self.engine.start()
            self._watcher = _WorkerWatcher(self)
            self.register_fd(self._wake_consumer.fileno(), _SIBLING_TOKEN)
            self.engine.set_watcher(self._watcher)

    def close(self) -> None:
        """Close every socket and the sibling wake pair (after the daemon stopped)."""
        with self._lock:
            self.engine.close()
            self._wake_consumer.close()
            self._wake_notifier.close()

    # ------------------------------------------------------------ negotiation
    def acked_features(self, features: int) -> None:
        super().acked_features(features)
        with self._lock:
            self.engine.seqpacket_negotiated = bool(features >> VIRTIO_VSOCK_F_SEQPACKET & 1) \
                and self.engine.config.seqpacket

    def update_memory(self, memory: GuestMemory) -> None:
        super().update_memory(memory)
        if self.fd_registry.bound:
            self.attach()

    def reset_device(self) -> None:
        super().reset_device()
        with self._lock:
            self.engine.reset()

    # ------------------------------------------------------------ rings
    def vring_started(self, index: int, vring: VringState) -> None:
        self.attach()
        if index == RX_QUEUE:
            # host connections may have queued packets before the guest was ready
            with self._lock:
                self._process_rx(vring)

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        with self._lock:
            if device_event == TX_QUEUE:
                self._process_tx(vrings[TX_QUEUE], vrings[RX_QUEUE])
            elif device_event == RX_QUEUE:
                pass  # the guest added rx buffers: fall through to the rx pass
            elif device_event == _SIBLING_TOKEN:
                self._wake_consumer.consume()
            elif device_event >= _FD_TOKEN_BASE:
                self.engine.handle_fd_ready(device_event - _FD_TOKEN_BASE)
            self._process_rx(vrings[RX_QUEUE])

    def _process_tx(self, vring: VringState, rx_vring: VringState) -> None:
        engine = self.engine
        while True:
            chains = vring.pop_batch(_TX_BATCH)
            if not chains:
                if vring.enable_notification():
                    continue  # buffers arrived while notifications were off
                break
            used = []
            for chain in chains:
                used.append((chain, 0))
                try:
                    self._tx_chain(chain)
                except (VsockPacketError, ChainTooShort) as exc:
                    log.warning("vsock cid %d: dropping a malformed tx packet: %s", engine.guest_cid, exc)
            vring.add_used_batch(used)
            vring.signal_used_queue()
            # let rx (responses, credit updates) keep up with a busy tx queue
            self._process_rx(rx_vring)

    def _tx_chain(self, chain) -> None:  # noqa: ANN001 - a virtqueue DescriptorChain
        reader = chain.reader()
        hdr = VsockHeader.unpack(reader.read_exact(HDR_SIZE))
        if hdr.len > MAX_PKT_PAYLOAD:
            raise VsockPacketError(f"payload length {hdr.len} exceeds {MAX_PKT_PAYLOAD}")
        payload = reader.read_exact(hdr.len) if hdr.len else b""
        # the engine validates op and type, and answers a bad packet with RST
        self.engine.handle_tx_packet(hdr, payload)

    def _process_rx(self, vring: VringState | None) -> None:
        if vring is None or not vring.is_running:
            return
        engine = self.engine
        sent = False
        while engine.has_rx_work():
            chain = vring.pop_descriptor_chain()
            if chain is None:
                if vring.enable_notification():
                    continue
                break  # no rx buffers: wait for the guest's rx kick
            writer = chain.writer()
            room = writer.available_bytes
            if room < HDR_SIZE:
                log.warning("vsock cid %d: rx buffer of %d bytes is smaller than a header", engine.guest_cid, room)
                vring.add_used(chain, 0)
                sent = True
                continue
            pkt = engine.next_rx_packet(room - HDR_SIZE)
            if pkt is None:  # nothing fits after all (cannot happen with room > 0)
                vring.add_used(chain, 0)
                sent = True
                break
            hdr, payload = pkt
            writer.write(hdr.pack())
            if payload:
                writer.write(payload)
            vring.add_used(chain, writer.bytes_written)
            sent = True
        if sent:
            vring.signal_used_queue()
