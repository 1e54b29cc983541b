"""virtio-input wire formats (VIRTIO 1.3 §5.8): the config space and events.

The driver writes ``select`` and ``subsel`` (SET_CONFIG) and reads ``size`` and
the union back (GET_CONFIG); :class:`InputConfig` answers every query the
Linux driver (``drivers/virtio/virtio_input.c``) makes at probe.  Sans-IO.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from . import codes

VIRTIO_ID_INPUT = 18
#: queue 0 carries events device -> driver, queue 1 status (LEDs) driver -> device
EVENT_QUEUE, STATUS_QUEUE = 0, 1
#: bytes of ``struct virtio_input_config``: select, subsel, size, 5 reserved, 128-byte union
CONFIG_SIZE = 136
UNION_OFFSET = 8
UNION_SIZE = 128

_EVENT = struct.Struct("<HHi")  # type, code, value (le32; relative motion is signed)
EVENT_SIZE = _EVENT.size


class ConfigSelect(enum.IntEnum):
    """``virtio_input_config_select`` (spec names)."""

    UNSET = 0x00
    ID_NAME = 0x01
    ID_SERIAL = 0x02
    ID_DEVIDS = 0x03
    PROP_BITS = 0x10
    EV_BITS = 0x11
    ABS_INFO = 0x12


@dataclass(frozen=True)
class InputEvent:
    """``struct virtio_input_event`` (the evdev event without its time stamp)."""

    type: int
    code: int
    value: int

    def pack(self) -> bytes:
        """``struct virtio_input_event`` bytes (8, little-endian)."""
        return _EVENT.pack(self.type, self.code, self.value)

    @classmethod
    def unpack(cls, data: bytes) -> InputEvent:
        """Parse a ``struct virtio_input_event``; :class:`ValueError` if ``data`` is too short."""
        if len(data) < EVENT_SIZE:
            raise ValueError(f"virtio_input_event needs {EVENT_SIZE} bytes, got {len(data)}")
        return cls(*_EVENT.unpack_from(data))


def syn() -> InputEvent:
    """EV_SYN / SYN_REPORT: the end of one group of events."""
    return InputEvent(codes.EV_SYN, codes.SYN_REPORT, 0)


@dataclass(frozen=True)
class AbsInfo:
    """``struct virtio_input_absinfo``."""

    min: int = 0
    max: int = 0
    fuzz: int = 0
    flat: int = 0
    res: int = 0

    def pack(self) -> bytes:
        """``struct virtio_input_absinfo`` bytes."""
        return struct.pack("<iiiii", self.min, self.max, self.fuzz, self.flat, self.res)


@dataclass(frozen=True)
class DevIds:
    """``struct virtio_input_devids``."""

    bustype: int = 0x06  # BUS_VIRTUAL
    vendor: int = 0
    product: int = 0
    version: int = 0

    def pack(self) -> bytes:
        """``struct virtio_input_devids`` bytes."""
        return struct.pack("<HHHH", self.bustype, self.vendor, self.product, self.version)


def bitmap(bits: set[int] | frozenset[int]) -> bytes:
    """The shortest little-endian byte bitmap with ``bits`` set (at most 128 bytes)."""
    if not bits:
        return b""
    out = bytearray(max(bits) // 8 + 1)
    for b in bits:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out[:UNION_SIZE])


def bits_of(data: bytes) -> set[int]:
    """The set bits of a byte bitmap (inverse of :func:`bitmap`)."""
    return {i * 8 + j for i, byte in enumerate(data) for j in range(8) if byte >> j & 1}


@dataclass
class InputConfig:
    """What the device tells the driver about itself."""

    name: str
    serial: str = ""
    devids: DevIds | None = field(default_factory=DevIds)
    properties: set[int] = field(default_factory=set)
    #: event type -> the codes it reports (EV_KEY -> keys, EV_REL -> axes, ...)
    events: dict[int, set[int]] = field(default_factory=dict)
    absinfo: dict[int, AbsInfo] = field(default_factory=dict)

    def payload(self, select: int, subsel: int) -> bytes:
        """The union's content for a query (empty: ``size`` 0, not supported)."""
        if select == ConfigSelect.ID_NAME:
            return self.name.encode()[:UNION_SIZE]
        if select == ConfigSelect.ID_SERIAL:
            return self.serial.encode()[:UNION_SIZE]
        if select == ConfigSelect.ID_DEVIDS:
            return self.devids.pack() if self.devids is not None else b""
        if select == ConfigSelect.PROP_BITS:
            return bitmap(self.properties) if subsel == 0 else b""
        if select == ConfigSelect.EV_BITS:
            if subsel in self.events and not self.events[subsel]:
                return b"\0"  # a type without codes (EV_REP): size 1, as QEMU's virtio-keyboard answers
            return bitmap(self.events.get(subsel, set()))
        if select == ConfigSelect.ABS_INFO:
            info = self.absinfo.get(subsel)
            return info.pack() if info is not None else b""
        return b""

    def space(self, select: int, subsel: int) -> bytes:
        """The whole 136-byte config space after the driver wrote ``select``/``subsel``."""
        data = self.payload(select, subsel)
        return bytes([select & 0xFF, subsel & 0xFF, len(data)]) + bytes(5) + data.ljust(UNION_SIZE, b"\0")

    def supports(self, ev_type: int, code: int) -> bool:
        """Whether the device reports event ``code`` of type ``ev_type``."""
        return code in self.events.get(ev_type, ())


def keyboard_config(name: str = "vhostuser virtio keyboard", serial: str = "") -> InputConfig:
    """A keyboard like QEMU's virtio-keyboard: keys, autorepeat, three LEDs."""
    return InputConfig(name, serial, events={
        codes.EV_KEY: set(codes.KEYS.values()),
        codes.EV_REP: set(),
        codes.EV_LED: {codes.LED_NUML, codes.LED_CAPSL, codes.LED_SCROLLL},
    })


def mouse_config(name: str = "vhostuser virtio mouse", serial: str = "") -> InputConfig:
    """A relative pointer like QEMU's virtio-mouse: five buttons, X/Y and wheel."""
    return InputConfig(name, serial, events={
        codes.EV_KEY: set(codes.BUTTONS.values()),
        codes.EV_REL: {codes.REL_X, codes.REL_Y, codes.REL_WHEEL},
    })


#: the absolute range of the tablet (QEMU's virtio-tablet uses 0..0x7fff too)
TABLET_MAX = 0x7FFF


def tablet_config(name: str = "vhostuser virtio tablet", serial: str = "") -> InputConfig:
    """An absolute pointer like QEMU's virtio-tablet: buttons and X/Y in 0..32767."""
    return InputConfig(name, serial, events={
        codes.EV_KEY: set(codes.BUTTONS.values()),
        codes.EV_ABS: {codes.ABS_X, codes.ABS_Y},
        codes.EV_REL: {codes.REL_WHEEL},
    }, absinfo={codes.ABS_X: AbsInfo(0, TABLET_MAX), codes.ABS_Y: AbsInfo(0, TABLET_MAX)})
