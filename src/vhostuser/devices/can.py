"""virtio-can (device id 36): a CAN controller for the guest.

Three queues (virtio spec 1.4, "CAN Device"): the driver sends frames on
``txq`` (0) as ``virtio_can_tx_out`` + a one-byte result, receives them in the
writable buffers it keeps on ``rxq`` (1) as ``virtio_can_rx``, and starts and
stops the controller on ``controlq`` (2).  The 2-byte config space holds
``status``; its ``VIRTIO_CAN_S_CTRL_BUSOFF`` bit reports a bus-off.

The controller starts STOPPED: frames sent then are refused
(``VIRTIO_CAN_RESULT_NOT_OK``) and frames arriving are dropped.  Where the
frames go is a :class:`CanLink`:

* :class:`VirtualCanBus` — a bus in this process shared by several back-ends
  (one per VM, ``--socket-count``): a frame one VM sends reaches every other
  started VM on the bus;
* :class:`SocketCanLink` — a host SocketCAN interface (``can0``, ``vcan0``);
  a bus-off error frame from the host controller becomes a guest bus-off.

Bus-off (:meth:`CanBackend.bus_off`, or :meth:`VirtualCanBus.bus_off`): the
controller stops, ``status`` gets the BUSOFF bit and the front-end is told with
a config-change message; the guest restarts it with ``SET_CTRL_MODE_START``.

Bad requests get ``VIRTIO_CAN_RESULT_NOT_OK`` and a log line: short headers,
a wrong ``msg_type``, undefined or unnegotiated flag bits (FD, RTR), an
out-of-range ``can_id`` or length, a payload shorter than ``length``.  Chains
without room for the result byte are returned with length 0 (logged).
"""
from __future__ import annotations

import argparse
import collections
import logging
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ..sys_util.event import new_event_consumer_and_notifier
from ..sys_util.socketcan import CAN_EFF_FLAG, CAN_EFF_MASK, CAN_ERR_FLAG, CAN_RTR_FLAG, CAN_SFF_MASK
from ..sys_util.socketcan import HostCanFrame, open_can_socket
from ..virtqueue.chain import DescriptorChain
from ..vring import VringState

log = logging.getLogger(__name__)

VIRTIO_ID_CAN = 36
TXQ, RXQ, CTRLQ = 0, 1, 2

VIRTIO_CAN_F_CAN_CLASSIC = 0
VIRTIO_CAN_F_CAN_FD = 1
VIRTIO_CAN_F_RTR_FRAMES = 2
VIRTIO_CAN_F_LATE_TX_ACK = 3

VIRTIO_CAN_S_CTRL_BUSOFF = 1 << 0

VIRTIO_CAN_RESULT_OK = 0
VIRTIO_CAN_RESULT_NOT_OK = 1

VIRTIO_CAN_TX = 0x0001
VIRTIO_CAN_RX = 0x0101
VIRTIO_CAN_SET_CTRL_MODE_START = 0x0201
VIRTIO_CAN_SET_CTRL_MODE_STOP = 0x0202

VIRTIO_CAN_FLAGS_EXTENDED = 0x8000
VIRTIO_CAN_FLAGS_FD = 0x4000
VIRTIO_CAN_FLAGS_RTR = 0x2000
_VALID_FLAGS = VIRTIO_CAN_FLAGS_EXTENDED | VIRTIO_CAN_FLAGS_FD | VIRTIO_CAN_FLAGS_RTR

#: msg_type, length, reserved_classic_dlc, padding, reserved_xl_priority, flags, can_id
HEADER = struct.Struct("<HHBBHII")
#: the lengths a CAN FD frame can have
CANFD_LENGTHS = frozenset([*range(9), 12, 16, 20, 24, 32, 48, 64])

_RX_TOKEN = FIRST_DEVICE_TOKEN       # frames queued for this VM by another thread
_HOST_TOKEN = FIRST_DEVICE_TOKEN + 1  # the SocketCAN socket is readable


@dataclass(frozen=True)
class CanFrame:
    """One CAN or CAN FD frame: an 11-bit (or, ``extended``, 29-bit) id and up
    to 8 (or, ``fd``, 64) bytes; ``rtr`` is a remote request with ``rtr_length``."""

    can_id: int
    data: bytes = b""
    extended: bool = False
    fd: bool = False
    rtr: bool = False
    rtr_length: int = 0

    @property
    def flags(self) -> int:
        """``flags`` as virtio-can encodes them."""
        return ((VIRTIO_CAN_FLAGS_EXTENDED if self.extended else 0) | (VIRTIO_CAN_FLAGS_FD if self.fd else 0)
                | (VIRTIO_CAN_FLAGS_RTR if self.rtr else 0))

    @property
    def length(self) -> int:
        """Bytes of data (an RTR frame: the length it requests)."""
        return self.rtr_length if self.rtr else len(self.data)

    def pack(self, msg_type: int = VIRTIO_CAN_RX) -> bytes:
        """``virtio_can_rx`` (or, with ``VIRTIO_CAN_TX``, ``virtio_can_tx_out``)."""
        return HEADER.pack(msg_type, self.length, 0, 0, 0, self.flags, self.can_id) + (b"" if self.rtr else self.data)

    @classmethod
    def unpack(cls, raw: bytes) -> CanFrame:
        """Parse a ``virtio_can_rx`` / ``tx_out`` (no validation: see :meth:`CanBackend.check_tx`)."""
        _t, length, _d, _p, _x, flags, can_id = HEADER.unpack_from(raw)
        rtr = bool(flags & VIRTIO_CAN_FLAGS_RTR)
        return cls(can_id, b"" if rtr else bytes(raw[HEADER.size:HEADER.size + length]),
                   extended=bool(flags & VIRTIO_CAN_FLAGS_EXTENDED), fd=bool(flags & VIRTIO_CAN_FLAGS_FD),
                   rtr=rtr, rtr_length=length if rtr else 0)

    # SocketCAN keeps the frame kind in can_id's top bits
    def to_host(self) -> HostCanFrame:
        """The frame as SocketCAN carries it (frame kind in ``can_id``'s top bits)."""
        can_id = self.can_id | (CAN_EFF_FLAG if self.extended else 0) | (CAN_RTR_FLAG if self.rtr else 0)
        return HostCanFrame(can_id, bytes(self.rtr_length) if self.rtr else self.data, fd=self.fd)

    @classmethod
    def from_host(cls, frame: HostCanFrame) -> CanFrame:
        """A frame received from SocketCAN, as the driver sees it."""
        extended = bool(frame.can_id & CAN_EFF_FLAG)
        rtr = bool(frame.can_id & CAN_RTR_FLAG)
        can_id = frame.can_id & (CAN_EFF_MASK if extended else CAN_SFF_MASK)
        return cls(can_id, b"" if rtr else frame.data, extended=extended, fd=frame.fd, rtr=rtr,
                   rtr_length=len(frame.data) if rtr else 0)


class CanLink:
    """Where a :class:`CanBackend`'s frames go and come from."""

    #: :meth:`transmit` returns once the frame is on the bus (VIRTIO_CAN_F_LATE_TX_ACK)
    late_tx_ack = False

    def attach(self, backend: CanBackend) -> None:
        """``backend`` uses this link (called once, from its constructor)."""

    def detach(self, backend: CanBackend) -> None:
        """``backend`` is closing."""

    def transmit(self, backend: CanBackend, frame: CanFrame) -> bool:
        """Send ``frame`` from ``backend``; False if it could not be sent."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the link holds."""


class VirtualCanBus(CanLink):
    """A CAN bus inside this process: every started controller on it receives
    what the others send (not its own frames, like a real controller).  A
    frame is on the bus when :meth:`transmit` returns."""

    late_tx_ack = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.members: list[CanBackend] = []

    def attach(self, backend: CanBackend) -> None:
        with self._lock:
            self.members.append(backend)

    def detach(self, backend: CanBackend) -> None:
        with self._lock:
            if backend in self.members:
                self.members.remove(backend)

    def transmit(self, backend: CanBackend, frame: CanFrame) -> bool:
        with self._lock:
            others = [m for m in self.members if m is not backend]
        for other in others:
            other.deliver(frame)
        return True

    def bus_off(self, index: int) -> None:
        """Put member ``index``'s controller into bus-off (fault injection)."""
        self.members[index].bus_off()


class SocketCanLink(CanLink):
    """A host SocketCAN interface; frames from the host reach the guest.

    ``sock`` replaces the raw CAN socket (any datagram socket carrying the
    kernel's frame layout, e.g. for tests on a system without SocketCAN)."""

    def __init__(self, interface: str, *, sock: socket.socket | None = None) -> None:
        self.interface = interface
        self.sock: socket.socket = sock if sock is not None else open_can_socket(interface)
        self.sock.setblocking(False)

    def attach(self, backend: CanBackend) -> None:
        backend.register_fd(self.sock.fileno(), _HOST_TOKEN)

    def detach(self, backend: CanBackend) -> None:
        backend.unregister_fd(self.sock.fileno())

    def transmit(self, backend: CanBackend, frame: CanFrame) -> bool:
        try:
            self.sock.send(frame.to_host().pack())
        except OSError as exc:
            log.warning("can %s: transmit failed: %s", self.interface, exc)
            return False
        return True

    def receive(self, backend: CanBackend) -> None:
        """Hand every frame waiting on the socket to ``backend``."""
        while True:
            try:
                raw = self.sock.recv(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("can %s: receive failed: %s", self.interface, exc)
                return
            try:
                frame = HostCanFrame.unpack(raw)
            except ValueError as exc:
                log.warning("can %s: %s", self.interface, exc)
                continue
            if frame.can_id & CAN_ERR_FLAG:
                if frame.is_bus_off:
                    backend.bus_off()
                continue
            backend.deliver(CanFrame.from_host(frame))

    def close(self) -> None:
        self.sock.close()


class CanBackend(VhostUserBackend):
    """A virtio-can controller on ``link`` (a new :class:`VirtualCanBus` if None)."""

    num_queues = 3
    max_queue_size = 1024
    device_features = (1 << VIRTIO_CAN_F_CAN_CLASSIC) | (1 << VIRTIO_CAN_F_CAN_FD) | (1 << VIRTIO_CAN_F_RTR_FRAMES)

    def __init__(self, link: CanLink | None = None, *, rx_backlog: int = 1024) -> None:
        super().__init__()
        self.link = link if link is not None else VirtualCanBus()
        self.status = 0
        self.config_space = struct.pack("<H", 0)
        #: the controller participates in bus communication (START seen, no bus-off since)
        self.started = False
        self._lock = threading.Lock()
        self._pending: collections.deque[CanFrame] = collections.deque(maxlen=rx_backlog)
        self._rx_consumer, self._rx_notifier = new_event_consumer_and_notifier()
        self.register_fd(self._rx_consumer.fileno(), _RX_TOKEN)
        self._vrings: dict[int, VringState] = {}
        #: counters: frames sent to the link, delivered to the guest, dropped, refused
        self.stats = collections.Counter[str]()
        self.link.attach(self)

    def close(self) -> None:
        """Leave the bus / close the host link (the command and the fixtures call it at the end)."""
        self.unregister_fd(self._rx_consumer.fileno())
        self._rx_consumer.close()
        self._rx_notifier.close()
        self.link.detach(self)
        self.link.close()

    def features(self) -> int:
        """LATE_TX_ACK is offered when the link knows a frame is on the bus (the
        virtual bus; a SocketCAN send only queues the frame in the host kernel)."""
        late = (1 << VIRTIO_CAN_F_LATE_TX_ACK) if self.link.late_tx_ack else 0
        return super().features() | late

    # ------------------------------------------------------------ config
    def _set_status(self, status: int) -> None:
        self.status = status
        self.config_space = struct.pack("<H", status)

    def _has(self, bit: int) -> bool:
        return bool(self.acked & (1 << bit))

    # ------------------------------------------------------------ host side
    def deliver(self, frame: CanFrame) -> None:
        """A frame from the bus for this controller (any thread)."""
        with self._lock:  # the state STOP / reset / bus-off change under this lock
            if not self.started:
                self.stats["rx_dropped_stopped"] += 1
                return
            self._pending.append(frame)
        self._rx_notifier.notify()

    def bus_off(self) -> None:
        """The controller went bus-off: it stops and the guest is told."""
        log.warning("can: controller bus-off")
        with self._lock:
            self.started = False
            self._set_status(self.status | VIRTIO_CAN_S_CTRL_BUSOFF)
            self._pending.clear()
        if self.backend_channel is not None:
            try:
                self.backend_channel.config_change()
            except Exception as exc:  # noqa: BLE001 - the front-end may be gone
                log.warning("can: config change notification failed: %s", exc)

    # ------------------------------------------------------------ device
    def reset_device(self) -> None:
        """Front-end reset or gone: the controller is STOPPED again, no bus-off."""
        super().reset_device()
        with self._lock:
            self.started = False
            self._set_status(0)
            self._pending.clear()

    def vring_started(self, index: int, vring: VringState) -> None:
        self._vrings[index] = vring
        if index == RXQ:
            self._rx_notifier.notify()

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event == TXQ:
            self._serve(vrings[TXQ], self._transmit)
        elif device_event == CTRLQ:
            self._serve(vrings[CTRLQ], self._control)
        elif device_event == RXQ:
            self._fill_rx(vrings[RXQ])
        elif device_event == _RX_TOKEN:
            self._rx_consumer.consume()
            vring = vrings[RXQ] if RXQ in vrings else self._vrings.get(RXQ)
            if vring is not None:
                self._fill_rx(vring)
        elif device_event == _HOST_TOKEN and isinstance(self.link, SocketCanLink):
            self.link.receive(self)

    def _serve(self, vring: VringState, handler: object) -> None:
        if not vring.is_running:
            return
        used = []
        while (chain := vring.pop_descriptor_chain()) is not None:
            used.append((chain, self._answer(chain, handler)))  # type: ignore[arg-type]
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()

    @staticmethod
    def _answer(chain: DescriptorChain, handler: object) -> int:
        """Run ``handler(request bytes) -> result`` and write the result byte."""
        if chain.writable_length < 1:
            log.warning("can: request without room for its result byte (%d readable bytes) ignored",
                        chain.readable_length)
            return 0
        request = chain.reader().read(min(chain.readable_length, HEADER.size + 64))
        result = handler(request)  # type: ignore[operator]
        chain.writer().write(bytes([result]))
        return 1

    def _control(self, request: bytes) -> int:
        if len(request) < 2:
            log.warning("can: control request of %d bytes (need 2)", len(request))
            return VIRTIO_CAN_RESULT_NOT_OK
        (msg_type,) = struct.unpack_from("<H", request)
        if msg_type == VIRTIO_CAN_SET_CTRL_MODE_START:
            with self._lock:
                self.started = True
                self._set_status(self.status & ~VIRTIO_CAN_S_CTRL_BUSOFF)
            return VIRTIO_CAN_RESULT_OK
        if msg_type == VIRTIO_CAN_SET_CTRL_MODE_STOP:
            with self._lock:
                self.started = False
                self._pending.clear()
            return VIRTIO_CAN_RESULT_OK
        log.warning("can: unknown control message type %#06x", msg_type)
        return VIRTIO_CAN_RESULT_NOT_OK

    def check_tx(self, request: bytes) -> CanFrame | str:
        """The frame in a ``virtio_can_tx_out``, or why it is refused."""
        if len(request) < HEADER.size:
            return f"tx request of {len(request)} bytes, shorter than its {HEADER.size}-byte header"
        msg_type, length, _d, _p, _x, flags, can_id = HEADER.unpack_from(request)
        if msg_type != VIRTIO_CAN_TX:
            return f"tx request with msg_type {msg_type:#06x}"
        if flags & ~_VALID_FLAGS:
            return f"undefined flags {flags:#x}"
        fd, rtr = bool(flags & VIRTIO_CAN_FLAGS_FD), bool(flags & VIRTIO_CAN_FLAGS_RTR)
        if fd and not self._has(VIRTIO_CAN_F_CAN_FD):
            return "CAN FD frame but VIRTIO_CAN_F_CAN_FD not negotiated"
        if not fd and not self._has(VIRTIO_CAN_F_CAN_CLASSIC):
            return "classic CAN frame but VIRTIO_CAN_F_CAN_CLASSIC not negotiated"
        if rtr and (fd or not self._has(VIRTIO_CAN_F_RTR_FRAMES)):
            return "RTR frame not allowed (FD, or VIRTIO_CAN_F_RTR_FRAMES not negotiated)"
        limit = CAN_EFF_MASK if flags & VIRTIO_CAN_FLAGS_EXTENDED else CAN_SFF_MASK
        if can_id > limit:
            return f"can_id {can_id:#x} out of range (max {limit:#x})"
        if (fd and length not in CANFD_LENGTHS) or (not fd and length > 8):
            return f"length {length} invalid for a {'CAN FD' if fd else 'classic CAN'} frame"
        if not rtr and len(request) < HEADER.size + length:
            return f"payload of {len(request) - HEADER.size} bytes, length says {length}"
        if not self.started:
            return "controller is stopped"
        return CanFrame.unpack(request)

    def _transmit(self, request: bytes) -> int:
        frame = self.check_tx(request)
        if isinstance(frame, str):
            log.warning("can: refused frame: %s", frame)
            self.stats["tx_refused"] += 1
            return VIRTIO_CAN_RESULT_NOT_OK
        if not self.link.transmit(self, frame):
            self.stats["tx_failed"] += 1
            return VIRTIO_CAN_RESULT_NOT_OK
        self.stats["tx"] += 1
        return VIRTIO_CAN_RESULT_OK

    def _accepts(self, frame: CanFrame) -> bool:
        """The guest negotiated this kind of frame."""
        if frame.fd:
            return self._has(VIRTIO_CAN_F_CAN_FD)
        return self._has(VIRTIO_CAN_F_CAN_CLASSIC) and (not frame.rtr or self._has(VIRTIO_CAN_F_RTR_FRAMES))

    def _fill_rx(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        used = []
        with self._lock:
            while self._pending:
                frame = self._pending[0]
                if not self._accepts(frame):
                    self._pending.popleft()
                    self.stats["rx_dropped_unsupported"] += 1
                    continue
                chain = vring.pop_descriptor_chain()
                if chain is None:
                    break
                self._pending.popleft()
                packed = frame.pack()
                if chain.writable_length < len(packed):
                    log.warning("can: rx buffer of %d bytes too small for a %d-byte frame: frame dropped",
                                chain.writable_length, len(packed))
                    self.stats["rx_dropped_small_buffer"] += 1
                    used.append((chain, 0))
                    continue
                used.append((chain, chain.writer().write(packed)))
                self.stats["rx"] += 1
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()


# --------------------------------------------------------------------- command
DESCRIPTION = """virtio-can vhost-user back-end (device id 36).

Gives each guest a CAN / CAN FD controller.  With --can-devices, each socket's
controller is a host SocketCAN interface (one per socket, rust-vmm's syntax:
"can0 can1"); without it, all sockets share one virtual CAN bus in this process.
QEMU 7.2 has no virtio-can front-end; a newer QEMU's generic vhost-user-device-pci
(virtio-id=36, num_vqs=3, config_size=2) can drive it.

Flags follow rust-vmm's vhost-device-can."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vhostuser can`` options: the back-end conventions' flags plus the device's own."""
    from .common import add_backend_arguments

    add_backend_arguments(parser)
    parser.add_argument("-d", "--can-devices", metavar="'IF0 IF1 ...'", default=None,
                        help="host SocketCAN interfaces, one per socket (default: a virtual bus between the sockets)")


def interfaces(spec: str | None, count: int) -> Sequence[str] | None:
    """The host interfaces of ``--can-devices`` (None: use the virtual bus)."""
    if spec is None:
        return None
    names = spec.split()
    if len(names) != count:
        raise ValueError(f"--can-devices names {len(names)} interfaces for {count} socket(s)")
    return names


def run(args: argparse.Namespace) -> int:
    """Serve ``vhostuser can`` as parsed into ``args`` until SIGTERM/SIGINT; the exit status."""
    import sys

    from .common import capabilities, serve_backends

    try:
        names = interfaces(args.can_devices, args.socket_count)
    except ValueError as exc:
        print(f"vhostuser can: {exc}", file=sys.stderr)
        return 2
    bus = VirtualCanBus()

    def make(i: int) -> CanBackend:
        return CanBackend(SocketCanLink(names[i]) if names is not None else bus)

    return serve_backends("can", args, make, capabilities("can"))
