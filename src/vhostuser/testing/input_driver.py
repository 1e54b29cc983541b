"""A model of the Linux virtio-input driver (``drivers/virtio/virtio_input.c``)
on top of :class:`~vhostuser.testing.frontend.MockFrontend`.

It plays the driver's part message by message:

* :meth:`VirtioInputDriver.probe` - ``virtinput_probe``: for each query
  ``virtinput_cfg_select`` writes ``select`` then ``subsel`` (SET_CONFIG, one
  byte each) and reads ``size`` (GET_CONFIG), then the union; the queries are
  ID_NAME, ID_SERIAL, ID_DEVIDS, PROP_BITS, EV_BITS for EV_REP, then EV_KEY,
  EV_REL, EV_ABS, EV_MSC, EV_SW, EV_LED, EV_SND, then ABS_INFO for every
  absolute axis; then ``virtinput_fill_evt`` fills the event queue with 8-byte
  writable buffers and kicks;
* :meth:`VirtioInputDriver.events` - ``virtinput_recv_events``: take used
  buffers, decode ``virtio_input_event`` and requeue each buffer;
* :meth:`VirtioInputDriver.send_status` - ``virtinput_send_status``: one
  8-byte readable buffer on the status queue.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from ..devices.input import codes
from ..devices.input.config import (
    EVENT_QUEUE,
    EVENT_SIZE,
    STATUS_QUEUE,
    UNION_OFFSET,
    AbsInfo,
    ConfigSelect,
    DevIds,
    InputEvent,
    bits_of,
)
from .frontend import MockFrontend

#: the EV_BITS subsels virtinput_probe asks for, in its order
PROBED_EV_TYPES = (codes.EV_KEY, codes.EV_REL, codes.EV_ABS, codes.EV_MSC, codes.EV_SW, codes.EV_LED, codes.EV_SND)


@dataclass
class ProbedDevice:
    """What the driver learnt at probe (what ``input_register_device`` gets)."""

    name: str = ""
    serial: str = ""
    devids: DevIds | None = None
    properties: set[int] = field(default_factory=set)
    events: dict[int, set[int]] = field(default_factory=dict)
    absinfo: dict[int, AbsInfo] = field(default_factory=dict)


class VirtioInputDriver:
    """The guest's virtio_input driver for one device behind ``fe``."""

    def __init__(self, fe: MockFrontend, *, event_buffers: int | None = None) -> None:
        self.fe = fe
        self.event_buffers = event_buffers or fe.vring(EVENT_QUEUE).size
        self.device = ProbedDevice()
        #: config requests made at probe, as (select, subsel, size)
        self.queries: list[tuple[int, int, int]] = []

    def cfg_select(self, select: int, subsel: int) -> int:
        """``virtinput_cfg_select``: write select, subsel; read size."""
        self.fe.set_config(0, bytes([select]))
        self.fe.set_config(1, bytes([subsel]))
        size = self.fe.get_config(2, 1)[0]
        self.queries.append((select, subsel, size))
        return size

    def _union(self, size: int) -> bytes:
        return self.fe.get_config(UNION_OFFSET, size) if size else b""

    def probe(self) -> ProbedDevice:
        """Read the device's config space the way the Linux driver does at probe (name, serial, ids, the event bits and axes); the result, also kept as ``self.device``."""
        d = self.device
        d.name = self._union(self.cfg_select(ConfigSelect.ID_NAME, 0)).decode(errors="replace")
        d.serial = self._union(self.cfg_select(ConfigSelect.ID_SERIAL, 0)).decode(errors="replace")
        size = self.cfg_select(ConfigSelect.ID_DEVIDS, 0)
        if size >= 8:
            d.devids = DevIds(*struct.unpack("<HHHH", self._union(8)))
        d.properties = bits_of(self._union(self.cfg_select(ConfigSelect.PROP_BITS, 0)))
        if self.cfg_select(ConfigSelect.EV_BITS, codes.EV_REP):
            d.events[codes.EV_REP] = set()
        for ev_type in PROBED_EV_TYPES:
            bits = bits_of(self._union(self.cfg_select(ConfigSelect.EV_BITS, ev_type)))
            if bits:
                d.events[ev_type] = bits
        for axis in sorted(d.events.get(codes.EV_ABS, ())):
            size = self.cfg_select(ConfigSelect.ABS_INFO, axis)
            # virtinput_cfg_abs reads min, max, res, fuzz, flat (it does not check size)
            d.absinfo[axis] = AbsInfo(*struct.unpack("<iiiii", self.fe.get_config(UNION_OFFSET, 20)))
            del size
        self.fill_events()
        return d

    def fill_events(self) -> None:
        """``virtinput_fill_evt``: one 8-byte writable buffer per slot, then one kick."""
        for _ in range(self.event_buffers):
            self.fe.add(EVENT_QUEUE, [], [EVENT_SIZE])
        self.fe.publish(EVENT_QUEUE, force_kick=True)

    def events(self, count: int = 1, timeout: float = 5.0) -> list[InputEvent]:
        """Wait for at least ``count`` events; every buffer goes back to the device."""
        got: list[InputEvent] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            used = self.fe.wait_used(EVENT_QUEUE, 1, max(0.01, deadline - time.monotonic()))
            for u in used:
                if u.length >= EVENT_SIZE:
                    got.append(InputEvent.unpack(u.data))
                self.fe.add(EVENT_QUEUE, [], [EVENT_SIZE])
            self.fe.publish(EVENT_QUEUE)
        return got

    def poll_events(self) -> list[InputEvent]:
        """Events already delivered (no waiting), buffers requeued."""
        used = self.fe.reap(EVENT_QUEUE)
        for _ in used:
            self.fe.add(EVENT_QUEUE, [], [EVENT_SIZE])
        if used:
            self.fe.publish(EVENT_QUEUE)
        return [InputEvent.unpack(u.data) for u in used if u.length >= EVENT_SIZE]

    def send_status(self, ev_type: int, code: int, value: int) -> None:
        """``virtinput_send_status`` and its reclaim (``virtinput_recv_status``)."""
        self.fe.request(STATUS_QUEUE, [InputEvent(ev_type, code, value).pack()], [])
