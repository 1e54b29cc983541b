"""Linux evdev: read a ``/dev/input/event*`` device's identity and capabilities
with the ``EVIOCG*`` ioctls (``include/uapi/linux/input.h``), read its events
and write events back (LEDs).

Every function takes the ioctl to call (default :func:`fcntl.ioctl`), so a test
can answer the requests of a fake device without a kernel one.
"""
from __future__ import annotations

import fcntl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EvdevInfo", "query_device", "grab", "decode_events", "encode_event",
           "EVENT_SIZE", "eviocgname", "eviocguniq", "eviocgid", "eviocgprop", "eviocgbit", "eviocgabs",
           "EVIOCGRAB"]

Ioctl = Callable[[int, int, bytes], bytes]

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("E") << 8 | nr


def eviocgid() -> int:
    return _ioc(_IOC_READ, 0x02, 8)          # struct input_id


def eviocgname(length: int) -> int:
    return _ioc(_IOC_READ, 0x06, length)


def eviocguniq(length: int) -> int:
    return _ioc(_IOC_READ, 0x08, length)


def eviocgprop(length: int) -> int:
    return _ioc(_IOC_READ, 0x09, length)


def eviocgbit(ev_type: int, length: int) -> int:
    return _ioc(_IOC_READ, 0x20 + ev_type, length)


def eviocgabs(axis: int) -> int:
    return _ioc(_IOC_READ, 0x40 + axis, 24)  # struct input_absinfo: 6 x s32


EVIOCGRAB = _ioc(_IOC_WRITE, 0x90, struct.calcsize("i"))

#: ``struct input_event``: struct timeval, u16 type, u16 code, s32 value
_EVENT = struct.Struct("@llHHi")
EVENT_SIZE = _EVENT.size
_BITS_LEN = 96  # KEY_MAX (0x2ff) / 8 + 1 bytes: big enough for every event type's bitmap
_EV_MAX = 0x1F
_EV_ABS = 0x03


@dataclass
class EvdevInfo:
    """What the ioctls told us about a device."""

    name: str
    uniq: str
    bustype: int
    vendor: int
    product: int
    version: int
    properties: set[int] = field(default_factory=set)
    events: dict[int, set[int]] = field(default_factory=dict)
    #: axis -> (value, min, max, fuzz, flat, resolution)
    absinfo: dict[int, tuple[int, int, int, int, int, int]] = field(default_factory=dict)


def _bits(data: bytes) -> set[int]:
    return {i * 8 + j for i, byte in enumerate(data) for j in range(8) if byte >> j & 1}


def _string(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def query_device(fd: int, ioctl: Ioctl | None = None) -> EvdevInfo:
    """Identity, properties, supported events and absolute axes of evdev ``fd``."""
    call: Ioctl = ioctl or fcntl.ioctl  # type: ignore[assignment]
    bustype, vendor, product, version = struct.unpack("<HHHH", call(fd, eviocgid(), bytes(8)))
    name = _string(call(fd, eviocgname(256), bytes(256)))
    try:
        uniq = _string(call(fd, eviocguniq(256), bytes(256)))
    except OSError:  # ENOENT: the device has no unique id
        uniq = ""
    props = _bits(call(fd, eviocgprop(_BITS_LEN), bytes(_BITS_LEN)))
    types = _bits(call(fd, eviocgbit(0, _BITS_LEN), bytes(_BITS_LEN)))
    events = {t: _bits(call(fd, eviocgbit(t, _BITS_LEN), bytes(_BITS_LEN)))
              for t in sorted(types) if 0 < t <= _EV_MAX}
    absinfo = {axis: struct.unpack("<iiiiii", call(fd, eviocgabs(axis), bytes(24)))
               for axis in sorted(events.get(_EV_ABS, ()))}
    return EvdevInfo(name, uniq, bustype, vendor, product, version, props, events, absinfo)  # type: ignore[arg-type]


def grab(fd: int, on: bool = True, ioctl: Ioctl | None = None) -> None:
    """EVIOCGRAB: take the device for ourselves (the host stops seeing its events)."""
    call = ioctl or fcntl.ioctl
    call(fd, EVIOCGRAB, struct.pack("i", 1 if on else 0))  # type: ignore[operator]


def decode_events(data: bytes) -> tuple[list[tuple[int, int, int]], bytes]:
    """Whole ``struct input_event`` records in ``data`` as (type, code, value), and the rest."""
    whole = len(data) - len(data) % EVENT_SIZE
    return [rec[2:] for rec in _EVENT.iter_unpack(data[:whole])], data[whole:]


def encode_event(ev_type: int, code: int, value: int) -> bytes:
    """One ``struct input_event`` (time zero: the kernel stamps what it forwards)."""
    return _EVENT.pack(0, 0, ev_type, code, value)

