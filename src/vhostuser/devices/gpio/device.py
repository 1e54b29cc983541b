"""``GpioBackend``: the virtio-gpio device (id 41) over a :class:`~.chip.SimulatedChip`.

Queue 0 (requestq) answers GET_NAMES, GET/SET_DIRECTION, GET/SET_VALUE and
SET_IRQ_TYPE; queue 1 (eventq, VIRTIO_GPIO_F_IRQ) holds one buffer per line
whose interrupt is armed and returns it with status VALID when the interrupt
fires, INVALID when it is disabled.  An edge that comes while the line has no
buffer is latched and delivered with the next one (Linux re-queues the buffer
after handling the interrupt).  Everything runs on the one worker thread;
:meth:`GpioBackend.drive` (the host side: tests, the control socket) may be
called from any thread.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...backend import VhostUserBackend
from ...errors import QueueError
from ...fd_registry import FIRST_DEVICE_TOKEN
from ...vring import VringState
from .chip import GpioError, SimulatedChip

if TYPE_CHECKING:
    from .control import ControlServer
from .protocol import (
    CONFIG,
    EVENT_QUEUE,
    F_IRQ,
    IRQ_REQUEST,
    IRQ_RESPONSE,
    REQUEST,
    REQUEST_QUEUE,
    RESPONSE,
    IrqStatus,
    IrqType,
    MsgType,
    Status,
    pack_names,
)

log = logging.getLogger(__name__)


class GpioBackend(VhostUserBackend):
    """A virtio-gpio device for ``chip``."""

    num_queues = 2
    max_queue_size = 1024

    def __init__(self, chip: SimulatedChip, *, control_path: str | None = None) -> None:
        super().__init__()
        self.chip = chip
        names = pack_names(chip.names) if any(chip.names) else b""
        self._names = names
        self.config_space = CONFIG.pack(chip.ngpio, len(names))  # type: ignore[misc]
        self._lock = threading.RLock()
        self._event_vring: VringState | None = None
        #: line -> the event buffer (a descriptor chain) waiting for its interrupt
        self._pending: dict[int, Any] = {}
        #: lines whose edge came while they had no buffer
        self._latched: set[int] = set()
        self.requests = 0
        self.errors = 0
        self.interrupts = 0
        self.control: ControlServer | None = None
        if control_path is not None:
            from .control import ControlServer

            self.control = ControlServer(self, control_path)

    # ----------------------------------------------------------- negotiation
    def features(self) -> int:
        return super().features() | F_IRQ

    def queues_per_thread(self) -> Sequence[int]:
        return [0b11]

    # ------------------------------------------------------------- host side
    def drive(self, gpio: int, level: int) -> None:
        """Drive input ``gpio`` to ``level`` (0/1) from the host; raises its
        interrupt if that is an armed edge or level.  Any thread."""
        vring = self._event_vring
        with vring.lock if vring is not None else self._lock, self._lock:
            if self.chip.drive(gpio, level):
                self._fire(gpio)

    def _fire(self, gpio: int) -> None:
        chain = self._pending.pop(gpio, None)
        if chain is None:
            if self.chip.lines[gpio].irq_type & IrqType.EDGE_BOTH:
                self._latched.add(gpio)
            return
        self._latched.discard(gpio)
        self.interrupts += 1
        log.debug("line %d: interrupt", gpio)
        self._complete_event(chain, IrqStatus.VALID)

    def _complete_event(self, chain: Any, status: IrqStatus) -> None:
        vring = self._event_vring
        if vring is None or not vring.is_running:
            return
        chain.writer().write_u8(int(status))
        vring.add_used(chain, IRQ_RESPONSE.size)
        vring.signal_used_queue()

    # ---------------------------------------------------------------- rings
    def vring_started(self, index: int, vring: VringState) -> None:
        if index == EVENT_QUEUE:
            with self._lock:
                self._event_vring = vring
        try:
            self._serve(vring)
        except QueueError as exc:
            vring.fail(exc)

    def vring_stopped(self, index: int, vring: VringState) -> None:
        if index == EVENT_QUEUE:
            with self._lock:
                self._event_vring = None
                self._pending.clear()  # the buffers belong to the stopped ring

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if self.control is not None and device_event >= FIRST_DEVICE_TOKEN:
            with self._lock:
                self.control.handle(device_event)
            return
        if device_event not in vrings:
            log.warning("unexpected device event %d", device_event)
            return
        self._serve(vrings[device_event])

    def _serve(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        with self._lock:
            while True:
                vring.disable_notification()
                while chains := vring.pop_batch(64):
                    if vring.index == REQUEST_QUEUE:
                        vring.add_used_batch([(c, self.request(c)) for c in chains])
                    else:
                        for c in chains:
                            self._arm(vring, c)
                    vring.signal_used_queue()
                if not vring.enable_notification():
                    return

    # -------------------------------------------------------------- requestq
    def request(self, chain: Any) -> int:
        """Answer one requestq request; returns the used length."""
        self.requests += 1
        writable = chain.writable_len
        if writable < 1:
            self.errors += 1
            log.warning("gpio request without a writable status byte: returned unprocessed")
            return 0
        writer = chain.writer()
        if chain.readable_len != REQUEST.size:
            return self._error(writer, writable, f"request of {chain.readable_len} bytes, not {REQUEST.size}")
        rtype, gpio, value = chain.reader().read_obj(REQUEST)
        expect = 1 + len(self._names) if rtype == MsgType.GET_NAMES else RESPONSE.size
        if writable != expect:
            return self._error(writer, writable, f"type {rtype}: {writable}-byte response buffer, not {expect}")
        try:
            out = self._execute(rtype, gpio, value)
        except GpioError as exc:
            return self._error(writer, writable, f"type {rtype} line {gpio} value {value}: {exc}")
        writer.write(bytes([Status.OK]) + out)
        return 1 + len(out)

    def _error(self, writer: Any, writable: int, reason: str) -> int:
        self.errors += 1
        log.warning("gpio request failed: %s", reason)
        writer.write(bytes([Status.ERR]) + bytes(min(writable, RESPONSE.size) - 1))
        return min(writable, RESPONSE.size)

    def _execute(self, rtype: int, gpio: int, value: int) -> bytes:
        chip = self.chip
        if rtype == MsgType.GET_NAMES:
            if not self._names:
                raise GpioError("the lines have no names (gpio_names_size is 0)")
            return self._names
        if rtype == MsgType.GET_DIRECTION:
            return bytes([chip.line(gpio).direction])
        if rtype == MsgType.SET_DIRECTION:
            chip.set_direction(gpio, value)
            return b"\0"
        if rtype == MsgType.GET_VALUE:
            return bytes([chip.line(gpio).value])
        if rtype == MsgType.SET_VALUE:
            chip.set_value(gpio, value)
            return b"\0"
        if rtype == MsgType.SET_IRQ_TYPE:
            if not self.acked & F_IRQ:
                raise GpioError("SET_IRQ_TYPE without VIRTIO_GPIO_F_IRQ")
            chip.set_irq_type(gpio, value)
            if value == IrqType.NONE:
                self._latched.discard(gpio)
                chain = self._pending.pop(gpio, None)
                if chain is not None:
                    self._complete_event(chain, IrqStatus.INVALID)
            elif chip.lines[gpio].level_active():
                self._fire(gpio)
            return b"\0"
        raise GpioError(f"message type {rtype:#x} unknown")

    # ---------------------------------------------------------------- eventq
    def _arm(self, vring: VringState, chain: Any) -> None:
        if chain.readable_len != IRQ_REQUEST.size or chain.writable_len != IRQ_RESPONSE.size:
            self.errors += 1
            log.warning("eventq buffer with %d readable / %d writable bytes (not 2 / 1): returned %s",
                        chain.readable_len, chain.writable_len,
                        "INVALID" if chain.writable_len else "unused")
            if chain.writable_len:
                chain.writer().write_u8(IrqStatus.INVALID)
            vring.add_used(chain, 1 if chain.writable_len else 0)
            return
        (gpio,) = chain.reader().read_obj(IRQ_REQUEST)
        if gpio >= self.chip.ngpio or gpio in self._pending or self.chip.lines[gpio].irq_type == IrqType.NONE:
            self.errors += 1
            log.warning("eventq buffer for line %d (%s): INVALID", gpio,
                        "out of range" if gpio >= self.chip.ngpio else
                        "already has one" if gpio in self._pending else "interrupt not enabled")
            chain.writer().write_u8(IrqStatus.INVALID)
            vring.add_used(chain, IRQ_RESPONSE.size)
            return
        self._pending[gpio] = chain
        line = self.chip.lines[gpio]
        if gpio in self._latched or line.level_active():
            self._fire(gpio)

    # ------------------------------------------------------------- lifecycle
    def reset_device(self) -> None:
        super().reset_device()
        with self._lock:
            self._pending.clear()
            self._latched.clear()

    def close(self) -> None:
        """Close the control socket."""
        if self.control is not None:
            self.control.close()
            self.control = None
