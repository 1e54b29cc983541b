"""``ConsoleBackend``: the virtio-console device (VIRTIO 1.3 §5.3, device id 3).

Queues: 0 receiveq / 1 transmitq of port 0; with MULTIPORT 2 control receiveq /
3 control transmitq, then one receiveq/transmitq pair per further port (4/5 for
port 1, 6/7 for port 2...).  Each port's host side is a
:class:`~vhostuser.devices.console.host.HostEndpoint`.

Data flow, all on the daemon's worker thread (one lock, no device threads):

* **host -> guest**: the host fd is watched for readability only while the
  guest has receive buffers (``rx_starved`` is False), the port is open on the
  guest side (MULTIPORT) and the receiveq runs.  What is read (at most
  :data:`RX_STAGE` bytes ahead) goes into receive buffers at once; when the
  receiveq runs dry the device re-arms notifications (EVENT_IDX aware:
  ``enable_notification`` re-checks the ring, so a buffer added meanwhile is not
  missed) and stops reading until the guest kicks.  Nothing is dropped.
* **guest -> host**: transmit chains are copied to the port's output buffer and
  written without blocking; what the host does not take yet waits and the fd
  is watched for writability.  Above :attr:`ConsoleBackend.out_high` bytes the
  device stops taking transmit chains (they stay on the ring: the guest
  waits) until the host drains the buffer.  With no client attached to a
  listening port the output is kept up to :attr:`ConsoleBackend.backlog` bytes
  for the next client (older bytes are dropped, so an unattended console never
  hangs the guest, as QEMU does for a disconnected console chardev).
* **control** (MULTIPORT): DEVICE_READY -> DEVICE_ADD per port; PORT_READY ->
  CONSOLE_PORT (port 0) / PORT_NAME / PORT_OPEN (host side connected?);
  PORT_OPEN from the guest opens/closes the port; RESIZE on :meth:`set_size`.
  Malformed messages are logged and completed, never fatal.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ...errors import ConsoleConfigError, ConsoleControlError, DeviceError, QueueError
from ...sys_util.event import new_event_consumer_and_notifier
from ...virtqueue import DescriptorChain
from ...vring import VringState
from .control import (
    CONFIG_SIZE,
    CONTROL_RX_QUEUE,
    CONTROL_TX_QUEUE,
    EMERG_WR_OFFSET,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    ControlEvent,
    ControlMessage,
    num_queues,
    pack_config,
    queue_role,
    rx_queue,
    tx_queue,
)
from .host import HostEndpoint

if TYPE_CHECKING:
    from ...memory import GuestMemory

__all__ = ["ConsoleBackend", "Port", "RX_STAGE"]

log = logging.getLogger(__name__)

#: host -> guest: bytes read from the host per read (and at most read ahead of
#: the guest's receive buffers)
RX_STAGE = 4096
#: host reads per event before other work gets a turn (the fd stays readable)
_RX_READS_PER_EVENT = 16
#: transmit chains completed per used-ring update
_TX_BATCH = 64
#: largest control message read from the control transmitq
_CTRL_MAX = 4096
_WAKE_TOKEN = FIRST_DEVICE_TOKEN
_PORT_TOKEN_BASE = FIRST_DEVICE_TOKEN + 1


@dataclass(eq=False)
class Port:
    """One console port: its host side and the bytes in flight."""

    index: int
    host: HostEndpoint
    name: str | None = None
    is_console: bool = False
    #: host -> guest bytes read, not yet in a receive buffer
    inbuf: bytearray = field(default_factory=bytearray)
    #: guest -> host bytes not yet taken by the host side
    outbuf: bytearray = field(default_factory=bytearray)
    #: the receiveq had no buffer last time we looked (we wait for a kick)
    rx_starved: bool = False
    #: transmit chains are left on the ring until the output drains
    tx_paused: bool = False
    #: MULTIPORT state
    added: bool = False
    ready: bool = False
    guest_open: bool = False
    #: counters
    bytes_to_guest: int = 0
    bytes_to_host: int = 0
    dropped: int = 0

    def reset_guest_state(self) -> None:
        """The guest driver went away (device reset / front-end disconnect)."""
        self.rx_starved = False
        self.tx_paused = False
        self.added = self.ready = self.guest_open = False


def _complete(vring: VringState, used: list[tuple[DescriptorChain, int]]) -> None:
    """Return a batch of chains to the guest (unless the ring has failed meanwhile)."""
    if used and vring.failed is None:
        vring.add_used_batch(used)
        vring.signal_used_queue()


class _FdWatch:
    """Per-port fd registrations with the worker (read and/or write interest),
    through the backend's ``register_fd`` / ``modify_fd`` / ``unregister_fd``."""

    def __init__(self, backend: ConsoleBackend) -> None:
        self.backend = backend
        self.fds: dict[int, dict[int, int]] = {}  # port -> {fd: events}

    def apply(self, port: int, desired: dict[int, int]) -> None:
        desired = {fd: ev for fd, ev in desired.items() if ev}
        current = self.fds.setdefault(port, {})
        if desired == current:
            return
        backend = self.backend
        token = _PORT_TOKEN_BASE + port
        try:
            for fd in [fd for fd in current if fd not in desired]:
                backend.unregister_fd(fd)
                del current[fd]
            for fd, events in desired.items():
                if fd in current:
                    backend.modify_fd(fd, token, events)
                else:
                    backend.register_fd(fd, token, events=events)
                current[fd] = events
        except Exception as exc:  # noqa: BLE001
            # the daemon stopped (its poller is closed) or the fd went away
            log.debug("console port %d: watch change failed: %r", port, exc)

    def clear_all(self) -> None:
        for port in list(self.fds):
            self.apply(port, {})


class ConsoleBackend(VhostUserBackend):
    """A virtio-console device whose ports' host sides are ``hosts``.

    ``multiport`` (default: more than one host) offers VIRTIO_CONSOLE_F_MULTIPORT
    with ``max_nr_ports = len(hosts)``; port 0 is the console port.  ``names``
    are sent as PORT_NAME (``names[i]`` for port i; None: no name).  ``size``
    (cols, rows) offers VIRTIO_CONSOLE_F_SIZE.  EMERG_WRITE is always offered.
    """

    num_queues = 2
    max_queue_size = 1024

    def __init__(self, hosts: Sequence[HostEndpoint], *, multiport: bool | None = None,
                 names: Sequence[str | None] = (), size: tuple[int, int] | None = None,
                 max_queue_size: int = 1024, out_high: int = 256 * 1024, backlog: int = 64 * 1024) -> None:
        super().__init__()
        if not hosts:
            raise ConsoleConfigError("a console needs at least one port")
        if multiport is None:
            multiport = len(hosts) > 1
        if len(hosts) > 1 and not multiport:
            raise ConsoleConfigError("more than one port needs MULTIPORT")
        if len(names) > len(hosts):
            raise ConsoleConfigError(f"{len(names)} port names for {len(hosts)} ports")
        if max_queue_size < 1 or max_queue_size & (max_queue_size - 1) or max_queue_size > 32768:
            raise ConsoleConfigError("the queue size must be a power of two up to 32768")
        if out_high < 1 or backlog < 0:
            raise ConsoleConfigError("out_high must be positive and backlog >= 0")
        self.multiport = multiport
        self.num_queues = num_queues(len(hosts), multiport)  # per instance
        self.max_queue_size = max_queue_size  # per instance
        self.out_high = out_high
        self.backlog = backlog
        self.ports = [Port(i, h, names[i] if i < len(names) else None, is_console=(i == 0))
                      for i, h in enumerate(hosts)]
        self.size = size
        self.config_space = pack_config(*(size or (0, 0)), len(hosts) if multiport else 0)
        self._ctrl_out: deque[bytes] = deque()
        self._watch = _FdWatch(self)
        self._attached = False
        #: the vrings seen so far (they live as long as the daemon), by queue index
        self._vrings: dict[int, VringState] = {}
        self._closed = False
        self._pending_size: tuple[int, int] | None = None
        self._size_lock = threading.Lock()
        self._wake_consumer, self._wake_notifier = new_event_consumer_and_notifier()
        #: control messages that were malformed or unexpected (for tests / stats)
        self.bad_control_messages = 0

    # ------------------------------------------------------------ negotiation
    def features(self) -> int:
        bits = 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        if self.multiport:
            bits |= 1 << VIRTIO_CONSOLE_F_MULTIPORT
        if self.size is not None:
            bits |= 1 << VIRTIO_CONSOLE_F_SIZE
        return super().features() | bits

    @property
    def multiport_acked(self) -> bool:
        """The driver negotiated MULTIPORT (control queues in use)."""
        return bool(self.acked & (1 << VIRTIO_CONSOLE_F_MULTIPORT))

    def set_config(self, offset: int, data: bytes) -> None:
        """Only ``emerg_wr`` is writable: its low byte goes to port 0's host side
        (EMERG_WRITE; the driver may use it before the queues run)."""
        end = offset + len(data)
        if not data or offset < 0 or end > CONFIG_SIZE or not offset <= EMERG_WR_OFFSET < end:
            raise DeviceError(f"config write [{offset}, +{len(data)}) misses emerg_wr (the rest is read-only)")
        char = data[EMERG_WR_OFFSET - offset]
        with self._locked():
            port = self.ports[0]
            log.debug("emergency write %#04x", char)
            self._queue_output(port, bytes([char]))
            self._flush_out(port)
            self._update_interest(port)

    def update_memory(self, memory: GuestMemory) -> None:
        super().update_memory(memory)
        self._attach()

    def reset_device(self) -> None:
        super().reset_device()
        with self._locked():
            self._ctrl_out.clear()
            for port in self.ports:
                port.reset_guest_state()
                self._update_interest(port)

    # ------------------------------------------------------------ lifecycle
    def _locked(self):  # noqa: ANN202 - a lock
        """The worker lock (the device's state is the worker's): every vring's
        ``lock`` is it, as the console has one worker."""
        for vring in self._vrings.values():
            return vring.lock
        return threading.RLock()  # no ring seen yet: the worker never ran the device

    def _attach(self) -> None:
        """Start watching the host sides (once the daemon's worker exists; idempotent)."""
        if self._attached or self._closed or not self.fd_registry.bound:
            return
        with self._locked():
            if self._attached:
                return
            self._attached = True
            self.register_fd(self._wake_consumer.fileno(), _WAKE_TOKEN)
            for port in self.ports:
                log.info("console port %d: %s", port.index, port.host.describe())
                self._update_interest(port)

    def close(self) -> None:
        """Stop watching, restore the terminal, close sockets (after the daemon stopped)."""
        if self._closed:
            return
        self._closed = True
        with self._locked():
            if self._attached:
                self._watch.clear_all()
                try:
                    self.unregister_fd(self._wake_consumer.fileno())
                except Exception:  # noqa: BLE001 - the worker's poller may be closed already
                    pass
            for port in self.ports:
                # a last try to hand the guest's output over
                while port.outbuf and port.host.writable and not port.host.broken:
                    n = port.host.write(bytes(port.outbuf[:65536]))
                    if n <= 0:
                        break
                    del port.outbuf[:n]
                port.host.close()
            self._wake_consumer.close()
            self._wake_notifier.close()

    def set_size(self, cols: int, rows: int) -> None:
        """The host terminal was resized (thread- and signal-safe): update the
        config space and tell the driver (RESIZE with MULTIPORT, else a config
        change notification when F_SIZE was negotiated)."""
        with self._size_lock:
            self._pending_size = (cols, rows)
        if not self._wake_notifier.closed:
            self._wake_notifier.notify()

    def _apply_size(self) -> None:
        with self._size_lock:
            size, self._pending_size = self._pending_size, None
        if size is None or self.size is None or size == self.size:
            return
        self.size = size
        self.config_space = pack_config(*size, len(self.ports) if self.multiport else 0)
        if self.multiport_acked:
            if self.ports[0].ready:
                self._send_ctrl(ControlMessage.resize(0, *size))
        elif self.acked & (1 << VIRTIO_CONSOLE_F_SIZE) and self.backend_channel is not None:
            try:
                self.backend_channel.config_change()
            except Exception as exc:  # noqa: BLE001 - the front-end may not listen
                log.warning("config change notification failed: %s", exc)

    # ------------------------------------------------------------ events
    def vring_started(self, index: int, vring: VringState) -> None:
        self._vrings[index] = vring
        self._attach()
        self._queue_ready(index)

    def _queue_ready(self, index: int) -> None:
        """Queue ``index`` was kicked or started: do what it can now."""
        role, p = queue_role(index)
        if role == "ctrl-rx":
            self._flush_ctrl()
        elif role == "ctrl-tx":
            self._process_ctrl_tx()
        elif p < len(self.ports):
            port = self.ports[p]
            if role == "rx":
                port.rx_starved = False
            self._service(port)

    def vring_stopped(self, index: int, vring: VringState) -> None:
        role, p = queue_role(index)
        if p < 0 or p >= len(self.ports):
            return
        port = self.ports[p]
        if role == "tx":
            port.tx_paused = False
        self._update_interest(port)

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        self._vrings.update(vrings)
        self._attach()
        if device_event == _WAKE_TOKEN:
            self._wake_consumer.consume()
            self._apply_size()
            return
        if device_event >= _PORT_TOKEN_BASE:
            self._service(self.ports[device_event - _PORT_TOKEN_BASE])
            return
        self._queue_ready(device_event)

    def _service(self, port: Port) -> None:
        """Do everything that can be done for ``port`` now, then watch what it waits for."""
        host = port.host
        if host.accept():
            self._host_connection_changed(port, True)
        for _ in range(3):  # again if the client went away meanwhile (tx may resume)
            attached = host.connected
            self._flush_out(port)
            self._process_tx(port)
            self._pump_rx(port)
            if host.connected == attached:
                break
        self._update_interest(port)

    def _update_interest(self, port: Port) -> None:
        if not self._attached or self._closed:
            return
        self._watch.apply(port.index, port.host.interest(self._wants_read(port), bool(port.outbuf)))

    def _wants_read(self, port: Port) -> bool:
        if port.rx_starved or len(port.inbuf) >= RX_STAGE or not port.host.readable:
            return False
        return self._guest_accepts(port) and self._running(rx_queue(port.index)) is not None

    def _guest_accepts(self, port: Port) -> bool:
        """The guest takes data on this port (MULTIPORT: it opened the port)."""
        if self.multiport_acked:
            return port.guest_open
        return port.index == 0

    def _running(self, index: int) -> VringState | None:
        vring = self._vrings.get(index) if self.fd_registry.bound else None
        return vring if vring is not None and vring.is_running else None

    # ------------------------------------------------------ host -> guest
    def _pump_rx(self, port: Port) -> None:
        vring = self._running(rx_queue(port.index))
        if vring is None or not self._guest_accepts(port):
            return
        host = port.host
        used: list[tuple[DescriptorChain, int]] = []
        reads = 0
        try:
            while True:
                if not port.inbuf:
                    if port.rx_starved or not host.readable or reads >= _RX_READS_PER_EVENT:
                        break
                    reads += 1
                    data = host.read(RX_STAGE)
                    if data is None:
                        break
                    if not data:
                        self._drop_client(port)
                        break
                    port.inbuf += data
                chain = vring.pop_descriptor_chain()
                if chain is None:
                    if vring.enable_notification():
                        continue  # buffers arrived while we re-armed
                    port.rx_starved = True
                    break
                room = chain.writable_len
                if room == 0:
                    log.warning("console port %d: receive buffer without writable space; completed empty", port.index)
                    used.append((chain, 0))
                    continue
                n = chain.writer().write(bytes(port.inbuf[:room]))
                del port.inbuf[:n]
                port.bytes_to_guest += n
                used.append((chain, n))
        except QueueError as exc:
            vring.fail(exc)
            return
        finally:
            _complete(vring, used)

    # ------------------------------------------------------ guest -> host
    def _queue_output(self, port: Port, data: bytes) -> None:
        host = port.host
        if host.writable or host.keeps_backlog:
            port.outbuf += data
            if not host.writable and len(port.outbuf) > self.backlog:
                excess = len(port.outbuf) - self.backlog
                if not port.dropped:
                    log.warning("console port %d: nobody connected, dropping the oldest output beyond %d bytes",
                                port.index, self.backlog)
                port.dropped += excess
                del port.outbuf[:excess]
        else:
            port.dropped += len(data)

    def _flush_out(self, port: Port) -> None:
        host = port.host
        while port.outbuf and host.writable:
            n = host.write(bytes(port.outbuf[:65536]))
            if n <= 0:
                break
            del port.outbuf[:n]
            port.bytes_to_host += n
        if host.broken:
            self._drop_client(port)

    def _process_tx(self, port: Port) -> None:
        vring = self._running(tx_queue(port.index))
        if vring is None:
            return
        while True:
            self._process_tx_once(port, vring)
            # the last flush may have drained the buffer: then nothing (no write
            # interest) would wake a paused transmitq again
            if not port.tx_paused or len(port.outbuf) > self.out_high // 2 or vring.failed is not None:
                return

    def _process_tx_once(self, port: Port, vring: VringState) -> None:
        host = port.host
        if port.tx_paused:
            if host.writable and len(port.outbuf) > self.out_high // 2:
                return  # the host drains the buffer first (we watch it for writability)
            port.tx_paused = False
            log.debug("console port %d: transmitq resumed", port.index)
        used: list[tuple[DescriptorChain, int]] = []
        try:
            while True:
                if len(port.outbuf) >= self.out_high and host.writable:
                    self._flush_out(port)
                    if len(port.outbuf) >= self.out_high:
                        port.tx_paused = True  # chains wait on the ring for the host to drain
                        log.debug("console port %d: transmitq paused (%d bytes waiting)", port.index,
                                  len(port.outbuf))
                        break
                chain = vring.pop_descriptor_chain()
                if chain is None:
                    if vring.enable_notification():
                        continue
                    break
                if chain.readable_len == 0:
                    log.warning("console port %d: transmit buffer without readable data; completed", port.index)
                data = chain.reader().read_all()
                self._queue_output(port, data)
                used.append((chain, 0))
                if len(used) >= _TX_BATCH:
                    _complete(vring, used)
                    used = []
        except QueueError as exc:
            vring.fail(exc)
            return
        finally:
            _complete(vring, used)
        self._flush_out(port)

    # ------------------------------------------------------ host connections
    def _drop_client(self, port: Port) -> None:
        """The host input ended or the connection broke."""
        if self._attached:
            self._watch.apply(port.index, {})  # unwatch before the fd is closed
        was = port.host.connected
        port.host.drop_client()
        if was and not port.host.connected:
            self._host_connection_changed(port, False)
        self._update_interest(port)

    def _host_connection_changed(self, port: Port, connected: bool) -> None:
        log.info("console port %d: host side %s", port.index, "connected" if connected else "disconnected")
        if self.multiport_acked and port.ready:
            self._send_ctrl(ControlMessage(port.index, ControlEvent.PORT_OPEN, int(connected)))

    # ------------------------------------------------------ control queues
    def _send_ctrl(self, msg: ControlMessage) -> None:
        log.debug("control -> guest: %s", msg)
        self._ctrl_out.append(msg.pack())
        self._flush_ctrl()

    def _flush_ctrl(self) -> None:
        vring = self._running(CONTROL_RX_QUEUE)
        if vring is None or not self.multiport_acked:
            return
        used: list[tuple[DescriptorChain, int]] = []
        try:
            while self._ctrl_out:
                chain = vring.pop_descriptor_chain()
                if chain is None:
                    if vring.enable_notification():
                        continue
                    break
                msg = self._ctrl_out.popleft()
                if chain.writable_len < len(msg):
                    log.warning("control receive buffer of %d bytes cannot hold a %d-byte message; dropped",
                                chain.writable_len, len(msg))
                    used.append((chain, 0))
                    continue
                used.append((chain, chain.writer().write(msg)))
        except QueueError as exc:
            vring.fail(exc)
            return
        finally:
            _complete(vring, used)

    def _process_ctrl_tx(self) -> None:
        vring = self._running(CONTROL_TX_QUEUE)
        if vring is None:
            return
        used: list[tuple[DescriptorChain, int]] = []
        msgs: list[ControlMessage] = []
        try:
            while True:
                chain = vring.pop_descriptor_chain()
                if chain is None:
                    if vring.enable_notification():
                        continue
                    break
                data = chain.reader().read(_CTRL_MAX)
                used.append((chain, 0))
                try:
                    msgs.append(ControlMessage.unpack(data))
                except ConsoleControlError as exc:
                    self.bad_control_messages += 1
                    log.warning("control transmitq: %s; ignored", exc)
        except QueueError as exc:
            vring.fail(exc)
        finally:
            _complete(vring, used)
        for msg in msgs:
            self._handle_control(msg)

    def _handle_control(self, msg: ControlMessage) -> None:
        log.debug("control <- guest: %s", msg)
        if not self.multiport_acked:
            self.bad_control_messages += 1
            log.warning("control message %s without MULTIPORT; ignored", msg)
            return
        if msg.event == ControlEvent.DEVICE_READY:
            if msg.value != 1:
                log.error("the guest driver failed to initialise the console device")
                return
            for port in self.ports:
                if not port.added:
                    port.added = True
                    self._send_ctrl(ControlMessage(port.index, ControlEvent.DEVICE_ADD, 0))
            return
        if msg.event not in (ControlEvent.PORT_READY, ControlEvent.PORT_OPEN):
            self.bad_control_messages += 1
            log.warning("unexpected control message from the guest: %s; ignored", msg)
            return
        if msg.id >= len(self.ports) or not self.ports[msg.id].added:
            self.bad_control_messages += 1
            log.warning("control message %s for a port the device did not add; ignored", msg)
            return
        port = self.ports[msg.id]
        if msg.event == ControlEvent.PORT_READY:
            if msg.value != 1:
                log.error("the guest driver failed to add console port %d", port.index)
                return
            if port.ready:
                return
            port.ready = True
            if port.is_console:
                self._send_ctrl(ControlMessage(port.index, ControlEvent.CONSOLE_PORT, 1))
                if self.size is not None:
                    self._send_ctrl(ControlMessage.resize(port.index, *self.size))
            if port.name:
                self._send_ctrl(ControlMessage.name(port.index, port.name))
            self._send_ctrl(ControlMessage(port.index, ControlEvent.PORT_OPEN, int(port.host.connected)))
            return
        # PORT_OPEN: the guest opened / closed the port
        port.guest_open = bool(msg.value)
        log.info("console port %d %s by the guest", port.index, "opened" if port.guest_open else "closed")
        self._service(port)
