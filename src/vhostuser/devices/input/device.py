"""The virtio-input device: config queries, the event queue and the status queue.

The device is fed by an :class:`EventSource` (a host evdev device, a virtual
keyboard/mouse/tablet, or anything with a readable fd).  Events wait in a
bounded pending list until the driver has buffers on the event queue: they are
flushed when the driver kicks (new buffers) and when the source has new input.
The driver's status events (LEDs) go back to the source.

What the Linux driver (``drivers/virtio/virtio_input.c``) does, which this
device serves:

* probe: writes ``select``/``subsel`` and reads ``size`` and the union for
  ID_NAME, ID_SERIAL, ID_DEVIDS, PROP_BITS, EV_BITS (EV_REP, EV_KEY, EV_REL,
  EV_ABS, EV_MSC, EV_SW, EV_LED, EV_SND) and ABS_INFO per absolute axis;
* then fills the event queue with 8-byte writable buffers, one event each, and
  requeues each buffer after it reports the event to the input core;
* sends status events (EV_LED, ...) as 8-byte readable buffers on queue 1.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from typing import Protocol

from ...backend import FIRST_DEVICE_TOKEN, VhostUserBackend
from ...errors import DeviceError
from ...sys_util.poll import EVENT_ERROR
from ...vring import VringState
from .config import CONFIG_SIZE, EVENT_QUEUE, EVENT_SIZE, STATUS_QUEUE, InputConfig, InputEvent

log = logging.getLogger(__name__)

SOURCE_TOKEN = FIRST_DEVICE_TOKEN
#: events kept while the driver has no buffers; older ones are dropped beyond it
MAX_PENDING = 4096


class EventSource(Protocol):
    """The host side of an input device."""

    config: InputConfig

    def fileno(self) -> int:
        """Readable when :meth:`read_events` has something."""

    def read_events(self) -> list[InputEvent] | None:
        """New events (``None``: the source is gone for good)."""

    def write_status(self, event: InputEvent) -> None:
        """A status event from the driver (LEDs, sounds)."""

    def close(self) -> None:
        """Release the source."""


class InputBackend(VhostUserBackend):
    """virtio-input (device id 18) fed by ``source``."""

    num_queues = 2
    max_queue_size = 1024
    config_space = bytes(CONFIG_SIZE)  # offered; the content is computed per query

    def __init__(self, source: EventSource) -> None:
        super().__init__()
        self.source = source
        self.config = source.config
        self._select = 0
        self._subsel = 0
        self._config_lock = threading.Lock()
        self.pending: deque[InputEvent] = deque()
        #: events dropped because the driver took none for too long
        self.dropped = 0
        #: status events the driver sent (most recent last)
        self.status_events: list[InputEvent] = []
        self.register_fd(source.fileno(), SOURCE_TOKEN)

    def close(self) -> None:
        """Unregister and close the event source (the command and the fixtures call it at the end)."""
        self.unregister_fd(self.source.fileno())
        self.source.close()

    # ---------------------------------------------------------------- config
    def get_config(self, offset: int, size: int) -> bytes:
        with self._config_lock:
            space = self.config.space(self._select, self._subsel)
        if offset < 0 or size < 0 or offset + size > len(space):
            raise DeviceError(f"config read [{offset}, +{size}) outside the {len(space)}-byte config space")
        return space[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``select`` (offset 0) and ``subsel`` (offset 1); the rest is read-only."""
        with self._config_lock:
            for i, byte in enumerate(data, start=offset):
                if i == 0:
                    self._select = byte
                elif i == 1:
                    self._subsel = byte
                else:
                    raise DeviceError(f"config byte {i} is read-only (only select and subsel are writable)")

    # ---------------------------------------------------------------- events
    def push(self, events: list[InputEvent]) -> None:
        """Queue events for the driver (call from the worker, or hold the event vring's lock)."""
        self.pending.extend(events)
        excess = len(self.pending) - MAX_PENDING
        if excess > 0:
            for _ in range(excess):
                self.pending.popleft()
            self.dropped += excess
            log.warning("input: the driver takes no events; dropped %d old ones", excess)

    def flush(self, vring: VringState) -> int:
        """Hand pending events to the driver's buffers, one event per buffer; how many went."""
        if not vring.is_running:
            return 0
        used = []
        while self.pending:
            chain = vring.pop_descriptor_chain()
            if chain is None:
                break
            if chain.writable_len < EVENT_SIZE:
                log.warning("input: event buffer of %d bytes (needs %d): returned empty",
                            chain.writable_len, EVENT_SIZE)
                used.append((chain, 0))
                continue
            chain.writer().write(self.pending.popleft().pack())
            used.append((chain, EVENT_SIZE))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()
        return sum(1 for _, n in used if n)

    def _status(self, vring: VringState) -> None:
        used = []
        while chain := vring.pop_descriptor_chain():
            data = chain.reader().read(EVENT_SIZE)
            if len(data) < EVENT_SIZE:
                log.warning("input: status buffer of %d bytes (needs %d): ignored", len(data), EVENT_SIZE)
            else:
                event = InputEvent.unpack(data)
                self.status_events.append(event)
                del self.status_events[:-64]
                try:
                    self.source.write_status(event)
                except OSError as exc:
                    log.warning("input: the source refused status event %s: %s", event, exc)
            used.append((chain, 0))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()

    def vring_started(self, index: int, vring: VringState) -> None:
        if index == EVENT_QUEUE:
            self.flush(vring)

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        if device_event == SOURCE_TOKEN:
            events = self.source.read_events()
            if events is None or evset & EVENT_ERROR and not events:
                log.warning("input: the event source is gone; the device stays, silent")
                self.unregister_fd(self.source.fileno())
                return
            self.push(events)
        elif device_event == STATUS_QUEUE:
            self._status(vrings[STATUS_QUEUE])
            return
        if EVENT_QUEUE in vrings:
            self.flush(vrings[EVENT_QUEUE])
