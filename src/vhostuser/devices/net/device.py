"""``NetBackend``: the vhost-user-net device (virtio device id 1), one port.

Rings: queue pair *k* is vring ``2k`` (RX, device -> guest) and ``2k+1`` (TX,
guest -> device); each pair has its own worker (``queues_per_thread``).
QEMU and DPDK's virtio-user emulate the control queue themselves, so it never
reaches a back-end and is not offered.

* **TX**: every chain is one frame behind a ``virtio_net_hdr`` (12 bytes with
  VERSION_1 or MRG_RXBUF); the header may be split over descriptors.  A
  chain shorter than the header, a frame shorter than an Ethernet header or
  longer than :data:`~.defs.MAX_FRAME_LEN`, or one asking for an offload
  that was not negotiated is dropped and counted (:attr:`NetStats.drops`).
  Good frames go to :attr:`NetBackend.on_tx` (the switch, a TAP, a test).
* **RX**: :meth:`NetBackend.deliver` may be called from any thread.  Frames
  wait in a bounded per-pair backlog (``rx_backlog`` frames; past it they are
  dropped and counted) until the pair's worker copies them into the guest's
  RX buffers: one chain per frame, or with MRG_RXBUF as many chains as the
  frame needs (``num_buffers``).  A guest that posts no RX buffers costs only
  its own backlog; the caller never blocks.

No offload is offered: frames carry complete checksums and are at most one
MTU (plus headers).  A host side that honours offloads (a TAP with
IFF_VNET_HDR) would add them.
"""
from __future__ import annotations

import collections
import logging
import struct
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ...errors import DeviceError
from ...protocol.message import VhostUserProtocolFeatures as PF
from ...sys_util.event import EventConsumer, EventNotifier, new_event_consumer_and_notifier
from .defs import (
    ETH_HLEN,
    HDR_LEN,
    MAX_FRAME_LEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    DropReason,
    NetFeature,
    VirtioNetHdr,
    format_mac,
    hdr_len_for,
    net_config,
    random_mac,
)

if TYPE_CHECKING:
    from ...virtqueue import DescriptorChain
    from ...vring import VringState

log = logging.getLogger(__name__)

#: token of pair k's wake event: FIRST_DEVICE_TOKEN + k
_WAKE_TOKEN = FIRST_DEVICE_TOKEN
#: TX chains popped per call
_TX_BATCH = 64
DEFAULT_RX_BACKLOG = 1024

FrameHandler = Callable[["NetBackend", bytes], None]


@dataclass
class NetStats:
    """Counters of one port (device view: TX = from the guest, RX = to the guest)."""

    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: DropReason, n: int = 1) -> None:
        """Count ``n`` frames dropped for ``reason``."""
        self.drops[reason.value] += n


class _Pair:
    """One queue pair's RX backlog, wake event and held RX chains."""

    def __init__(self, index: int, limit: int) -> None:
        self.index = index
        self.limit = limit
        self.lock = threading.Lock()
        self.backlog: collections.deque[bytes] = collections.deque()
        wake: tuple[EventConsumer, EventNotifier] = new_event_consumer_and_notifier()
        self.wake_consumer, self.wake_notifier = wake
        #: RX chains popped but not yet used (a frame too big for them, or an
        #: MRG_RXBUF frame waiting for more buffers); only the worker touches them
        self.held: list[DescriptorChain] = []
        #: the RX ring is started (frames are spread over the active pairs only)
        self.rx_active = False

    def close(self) -> None:
        self.wake_consumer.close()
        self.wake_notifier.close()


class NetBackend(VhostUserBackend):
    """A virtio-net device for one guest; frames leave through :attr:`on_tx`
    and enter with :meth:`deliver`."""

    def __init__(self, *, mac: bytes | None = None, queue_pairs: int = 1, queue_size: int = 1024,
                 rx_backlog: int = DEFAULT_RX_BACKLOG, mtu: int = 1500, name: str = "net",
                 on_tx: FrameHandler | None = None) -> None:
        super().__init__()
        if queue_pairs < 1:
            raise ValueError("queue_pairs must be at least 1")
        if rx_backlog < 1:
            raise ValueError("rx_backlog must be at least 1")
        self.name = name
        self.mac = mac if mac is not None else random_mac()
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.max_queue_size = queue_size
        self.mtu = mtu
        self.config_space = net_config(self.mac, max_virtqueue_pairs=queue_pairs, mtu=mtu)
        #: where frames the guest sends go (``on_tx(backend, frame)``); None drops them
        self.on_tx = on_tx
        self.stats = NetStats()
        self._pairs = [_Pair(k, rx_backlog) for k in range(queue_pairs)]
        self._hdr_len = HDR_LEN
        self._mrg_rxbuf = False
        for pair in self._pairs:
            self.register_fd(pair.wake_consumer.fileno(), _WAKE_TOKEN + pair.index, thread_id=pair.index)

    def __repr__(self) -> str:
        return f"<NetBackend {self.name} {format_mac(self.mac)}>"

    @property
    def device_features(self) -> int:  # type: ignore[override]
        # not NET_F_MTU: DPDK 22.11's virtio-user acks it but does not emulate the
        # config's mtu field (testpmd then reads garbage and crashes); NET_SET_MTU
        # is still accepted (protocol feature MTU)
        bits = 1 << NetFeature.MRG_RXBUF | 1 << NetFeature.MAC | 1 << NetFeature.STATUS
        if self.queue_pairs > 1:
            bits |= 1 << NetFeature.MQ
        return bits

    def protocol_features(self) -> PF:
        return super().protocol_features() | PF.RARP | PF.MTU

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: after a migration, broadcast a RARP from the guest's MAC
        (as QEMU does for a guest without GUEST_ANNOUNCE), so switches - ours
        included - learn where the MAC lives now."""
        if len(mac) != 6:
            raise DeviceError("SEND_RARP needs a 6-byte MAC")
        frame = rarp_frame(mac)
        log.info("%s: RARP for %s", self.name, format_mac(mac))
        if self.on_tx is not None:
            self.on_tx(self, frame)

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: the MTU the front-end gives the guest (QEMU's host_mtu)."""
        if not 68 <= mtu <= 65535:
            raise DeviceError(f"MTU {mtu} is outside 68..65535")
        self.mtu = mtu
        self.config_space = net_config(self.mac, max_virtqueue_pairs=self.queue_pairs, mtu=mtu)

    def queues_per_thread(self) -> Sequence[int]:
        return [0b11 << (2 * k) for k in range(self.queue_pairs)]

    def close(self) -> None:
        """Close the wake events (after the daemon stopped)."""
        for pair in self._pairs:
            pair.close()

    # ------------------------------------------------------------ negotiation
    def acked_features(self, features: int) -> None:
        super().acked_features(features)
        self._hdr_len = hdr_len_for(features)
        self._mrg_rxbuf = bool(features >> NetFeature.MRG_RXBUF & 1)

    def reset_device(self) -> None:
        super().reset_device()
        for pair in self._pairs:
            with pair.lock:
                stale = len(pair.backlog)
                pair.backlog.clear()
            if stale:
                self.stats.drop(DropReason.RX_NOT_READY, stale)

    # ------------------------------------------------------------ host side
    def deliver(self, frame: bytes) -> bool:
        """Queue ``frame`` (an Ethernet frame, no virtio header) for the guest.

        Thread-safe and never blocks.  Returns False (and counts a drop) when
        the backlog is full."""
        pair = self._pairs[0] if self.queue_pairs == 1 else self._pick_pair(frame)
        with pair.lock:
            if len(pair.backlog) >= pair.limit:
                self.stats.drop(DropReason.RX_BACKLOG_FULL)
                return False
            was_empty = not pair.backlog
            pair.backlog.append(frame)
        if was_empty:
            pair.wake_notifier.notify()
        return True

    def _pick_pair(self, frame: bytes) -> _Pair:
        active = [p for p in self._pairs if p.rx_active] or self._pairs[:1]
        return active[_flow_hash(frame) % len(active)]

    def rx_backlog(self) -> int:
        """Frames waiting for RX buffers, over all pairs."""
        return sum(len(p.backlog) for p in self._pairs)

    # ------------------------------------------------------------ rings
    def vring_started(self, index: int, vring: VringState) -> None:
        if index % 2 == 0:
            self._pairs[index // 2].rx_active = True
            self._fill_rx(self._pairs[index // 2], vring)

    def vring_stopped(self, index: int, vring: VringState) -> None:
        if index % 2 == 0:
            pair = self._pairs[index // 2]
            pair.rx_active = False
            pair.held.clear()

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event >= _WAKE_TOKEN:
            k = device_event - _WAKE_TOKEN
            self._pairs[k].wake_consumer.consume()
        else:
            k = device_event // 2
            if device_event % 2 == 1:
                self._process_tx(vrings[device_event])
        rx = vrings.get(2 * k)
        if rx is not None:
            self._fill_rx(self._pairs[k], rx)

    # ------------------------------------------------------------ TX
    def _process_tx(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        while True:
            chains = vring.pop_batch(_TX_BATCH)
            if not chains:
                if vring.enable_notification():
                    continue
                break
            sink = self.on_tx
            for chain in chains:
                frame = self._tx_frame(chain)
                if frame is not None and sink is not None:
                    sink(self, frame)
            # completed after forwarding: a used TX buffer means the frame is on its way
            vring.add_used_batch([(chain, 0) for chain in chains])
            vring.signal_used_queue()

    def _tx_frame(self, chain: DescriptorChain) -> bytes | None:
        """The frame of one TX chain, or None (counted) if it must be dropped."""
        stats = self.stats
        hlen = self._hdr_len
        total = chain.readable_len
        if total < hlen:
            stats.drop(DropReason.TX_SHORT)
            return None
        length = total - hlen
        if length < ETH_HLEN:
            stats.drop(DropReason.TX_RUNT)
            return None
        if length > MAX_FRAME_LEN:
            stats.drop(DropReason.TX_OVERSIZE)
            return None
        reader = chain.reader()
        hdr = reader.read_exact(hlen)  # may span descriptors
        if hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM or hdr[1] != VIRTIO_NET_HDR_GSO_NONE:
            stats.drop(DropReason.TX_OFFLOAD)  # none offered: the driver must not ask
            return None
        stats.tx_frames += 1
        stats.tx_bytes += length
        return reader.read(length)

    # ------------------------------------------------------------ RX
    def _fill_rx(self, pair: _Pair, vring: VringState) -> None:
        """Move backlog frames into the guest's RX buffers until either runs out."""
        if not vring.is_running:
            return
        used: list[tuple[DescriptorChain, int]] = []
        try:
            while True:
                with pair.lock:
                    if not pair.backlog:
                        break
                    frame = pair.backlog[0]
                chains = self._rx_chains(pair, vring, len(frame))
                if chains is None:
                    break  # no buffers: the guest's next RX kick resumes
                with pair.lock:
                    pair.backlog.popleft()
                if not chains:
                    self.stats.drop(DropReason.RX_TOO_BIG)
                    continue
                used += self._write_rx(chains, frame)
                self.stats.rx_frames += 1
                self.stats.rx_bytes += len(frame)
        finally:
            if used:
                vring.add_used_batch(used)
                vring.signal_used_queue()

    def _rx_chains(self, pair: _Pair, vring: VringState, length: int) -> list[DescriptorChain] | None:
        """Chains for a frame of ``length`` bytes (popped or held from before);
        None if the ring has too few buffers now (they stay held), [] if the
        frame cannot fit (the chain stays held for the next frame)."""
        need = self._hdr_len + length
        held = pair.held
        if not self._mrg_rxbuf:
            if not held and not self._pop_rx(vring, held):
                return None
            if held[0].writable_len < need:
                return []
            return [held.pop(0)]
        room = sum(c.writable_len for c in held)
        while room < need:
            if len(held) >= 0xFFFF:  # num_buffers is 16 bits
                return []
            if not self._pop_rx(vring, held):
                return None
            room += held[-1].writable_len
        taken: list[DescriptorChain] = []
        room = 0
        while room < need:
            chain = held.pop(0)
            taken.append(chain)
            room += chain.writable_len
        return taken

    @staticmethod
    def _pop_rx(vring: VringState, held: list[DescriptorChain]) -> bool:
        chain = vring.pop_descriptor_chain()
        if chain is None and vring.enable_notification():
            chain = vring.pop_descriptor_chain()
        if chain is None:
            return False
        held.append(chain)
        return True

    def _write_rx(self, chains: list[DescriptorChain], frame: bytes) -> list[tuple[DescriptorChain, int]]:
        hdr = VirtioNetHdr(num_buffers=len(chains) if self._mrg_rxbuf else 0).pack(self._hdr_len)
        if len(chains) == 1:
            chain = chains[0]
            writer = chain.writer()
            writer.write(hdr)
            writer.write(frame)
            return [(chain, len(hdr) + len(frame))]
        data = memoryview(hdr + frame)
        out = []
        pos = 0
        for chain in chains:
            n = min(chain.writable_len, len(data) - pos)
            chain.writer().write(data[pos:pos + n])
            out.append((chain, n))
            pos += n
        return out


def rarp_frame(mac: bytes) -> bytes:
    """A broadcast RARP request "who is ``mac``" from ``mac`` (RFC 903), as QEMU
    announces a migrated guest."""
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return b"\xff" * 6 + mac + b"\x80\x35" + body + bytes(60 - 14 - len(body))


def _flow_hash(frame: bytes) -> int:
    """Spread frames over RX queue pairs by their MAC pair (a flow stays on one pair)."""
    return hash(frame[:12])


__all__ = ["DEFAULT_RX_BACKLOG", "FrameHandler", "NetBackend", "NetStats"]
