"""Host sides of the input device.

* :class:`VirtualInput` - a built-in keyboard, mouse or tablet driven by calls
  (``type_text``, ``key``, ``move``, ``click``, ...) or by the control-socket
  line protocol of :meth:`VirtualInput.command`;
* :class:`EvdevInput` - a host evdev device (``/dev/input/eventN``) passed
  through: capabilities from the EVIOCG* ioctls, events forwarded, status
  events (LEDs) written back.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from ...sys_util import evdev
from ...sys_util.event import new_event_consumer_and_notifier
from . import codes
from .config import (
    AbsInfo,
    DevIds,
    InputConfig,
    InputEvent,
    keyboard_config,
    mouse_config,
    syn,
    tablet_config,
)

log = logging.getLogger(__name__)

KINDS = ("keyboard", "mouse", "tablet")

HELP = ("commands: type TEXT | key NAME | press NAME | release NAME | move DX DY (mouse) | "
        "move X Y (tablet, 0..32767) | click [left|right|middle] | button NAME down|up | wheel N | "
        "leds | help")


class VirtualInput:
    """A virtual keyboard, mouse or tablet; every action is one or more
    evdev groups ending in SYN_REPORT (as QEMU's virtio-input devices send them)."""

    def __init__(self, kind: str = "keyboard", *, name: str | None = None, serial: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown virtual input kind {kind!r} (one of {', '.join(KINDS)})")
        self.kind = kind
        make = {"keyboard": keyboard_config, "mouse": mouse_config, "tablet": tablet_config}[kind]
        self.config: InputConfig = make(name, serial) if name else make(serial=serial)
        self._lock = threading.Lock()
        self._queued: list[InputEvent] = []
        self._consumer, self._notifier = new_event_consumer_and_notifier()
        #: LED code -> on, as the driver last set it
        self.leds: dict[int, bool] = {}

    def fileno(self) -> int:
        """The fd that becomes readable when events are queued (the worker watches it)."""
        return self._consumer.fileno()

    def close(self) -> None:
        """Release the wake-up event."""
        self._consumer.close()
        self._notifier.close()

    # ------------------------------------------------------------ device side
    def read_events(self) -> list[InputEvent] | None:
        """The events queued since the last call."""
        self._consumer.consume()
        with self._lock:
            events, self._queued = self._queued, []
        return events

    def write_status(self, event: InputEvent) -> None:
        """Record a status event from the guest (LED states end up in ``self.leds``)."""
        if event.type == codes.EV_LED:
            self.leds[event.code] = bool(event.value)

    # ------------------------------------------------------------ host side
    def emit(self, events: Iterable[InputEvent]) -> None:
        """Queue raw events for the guest (thread-safe)."""
        with self._lock:
            self._queued.extend(events)
        self._notifier.notify()

    def _check(self, ev_type: int, code: int) -> None:
        if not self.config.supports(ev_type, code):
            raise ValueError(f"a virtual {self.kind} has no event type {ev_type:#x} code {code:#x}")

    def _key_events(self, code: int, value: int) -> list[InputEvent]:
        self._check(codes.EV_KEY, code)
        return [InputEvent(codes.EV_KEY, code, value), syn()]

    def press(self, key: str) -> None:
        """Press ``key`` (a key name, e.g. ``"a"``, ``"enter"``); ValueError for an unknown one."""
        self.emit(self._key_events(codes.key_code(key), 1))

    def release(self, key: str) -> None:
        """Release ``key``."""
        self.emit(self._key_events(codes.key_code(key), 0))

    def key(self, key: str) -> None:
        """Press and release one key."""
        code = codes.key_code(key)
        self.emit(self._key_events(code, 1) + self._key_events(code, 0))

    def type_text(self, text: str) -> None:
        """Type ``text`` on a US layout (Shift held for capitals and symbols)."""
        events: list[InputEvent] = []
        shift = codes.KEYS["LEFTSHIFT"]
        for ch in text:
            code, shifted = codes.char_keys(ch)
            if shifted:
                events += self._key_events(shift, 1)
            events += self._key_events(code, 1) + self._key_events(code, 0)
            if shifted:
                events += self._key_events(shift, 0)
        self.emit(events)

    def button(self, name: str, down: bool) -> None:
        """Press (``down``) or release the mouse button ``name``; ValueError for an unknown one."""
        code = codes.BUTTONS.get(name.lower())
        if code is None:
            raise ValueError(f"unknown button {name!r} (one of {', '.join(codes.BUTTONS)})")
        self.emit(self._key_events(code, int(down)))

    def click(self, name: str = "left") -> None:
        """Press and release the mouse button ``name``."""
        self.button(name, True)
        self.button(name, False)

    def move(self, x: int, y: int) -> None:
        """Relative motion (mouse) or an absolute position (tablet, 0..32767)."""
        if self.kind == "mouse":
            self.emit([InputEvent(codes.EV_REL, codes.REL_X, x), InputEvent(codes.EV_REL, codes.REL_Y, y), syn()])
        elif self.kind == "tablet":
            for v in (x, y):
                if not 0 <= v <= self.config.absinfo[codes.ABS_X].max:
                    raise ValueError(f"tablet position {v} outside 0..{self.config.absinfo[codes.ABS_X].max}")
            self.emit([InputEvent(codes.EV_ABS, codes.ABS_X, x), InputEvent(codes.EV_ABS, codes.ABS_Y, y), syn()])
        else:
            raise ValueError("a keyboard does not move")

    def wheel(self, clicks: int) -> None:
        """Turn the wheel by ``clicks`` (negative: towards the user)."""
        self._check(codes.EV_REL, codes.REL_WHEEL)
        self.emit([InputEvent(codes.EV_REL, codes.REL_WHEEL, clicks), syn()])

    def command(self, line: str) -> str:
        """One control-socket request -> one reply line (``OK ...`` or ValueError)."""
        verb, _, rest = line.strip().partition(" ")
        verb = verb.lower()
        args = rest.split()
        if verb == "type":
            self.type_text(rest)
        elif verb in ("key", "press", "release") and len(args) == 1:
            getattr(self, verb)(args[0])
        elif verb == "move" and len(args) == 2:
            self.move(*(_int(a) for a in args))
        elif verb == "click" and len(args) <= 1:
            self.click(*args)
        elif verb == "button" and len(args) == 2 and args[1] in ("down", "up"):
            self.button(args[0], args[1] == "down")
        elif verb == "wheel" and len(args) == 1:
            self.wheel(_int(args[0]))
        elif verb == "leds" and not args:
            names = {codes.LED_NUML: "num", codes.LED_CAPSL: "caps", codes.LED_SCROLLL: "scroll"}
            return "OK " + " ".join(f"{n}={'on' if self.leds.get(c) else 'off'}" for c, n in names.items())
        elif verb == "help":
            return "OK " + HELP
        else:
            raise ValueError(f"bad command {line.strip()!r}; {HELP}")
        return "OK"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


class EvdevInput:
    """A host evdev device passed through.  ``fd`` is an open evdev node
    (non-blocking, read-write for LEDs); ``ioctl`` answers the EVIOCG* requests
    (default: the kernel's)."""

    def __init__(self, fd: int, *, ioctl: evdev.Ioctl | None = None, grab: bool = False) -> None:
        self.fd = fd
        info = evdev.query_device(fd, ioctl)
        if grab:
            evdev.grab(fd, True, ioctl)
        self.info = info
        self.config = InputConfig(
            info.name, info.uniq, DevIds(info.bustype, info.vendor, info.product, info.version),
            set(info.properties), {t: set(c) for t, c in info.events.items()},
            {axis: AbsInfo(mn, mx, fuzz, flat, res) for axis, (_, mn, mx, fuzz, flat, res) in info.absinfo.items()})
        self._rest = b""

    @classmethod
    def open(cls, path: str, *, grab: bool = False) -> EvdevInput:
        """Open ``path`` (read-write if allowed, for LEDs) and read its capabilities."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return cls(fd, grab=grab)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"{path}: not a usable evdev device ({exc.strerror})") from exc
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        """The evdev device's fd (the worker watches it)."""
        return self.fd

    def read_events(self) -> list[InputEvent] | None:
        """The events the host device has produced since the last call (None at end of file)."""
        try:
            data = os.read(self.fd, 64 * evdev.EVENT_SIZE)
        except BlockingIOError:
            return []
        except OSError as exc:  # ENODEV: unplugged
            log.warning("evdev: read failed: %s", exc)
            return None
        if not data:
            return None
        records, self._rest = evdev.decode_events(self._rest + data)
        return [InputEvent(t, c, v) for t, c, v in records]

    def write_status(self, event: InputEvent) -> None:
        """Pass a status event from the guest (LED, ...) to the host device."""
        os.write(self.fd, evdev.encode_event(event.type, event.code, event.value))

    def close(self) -> None:
        """Close the evdev device."""
        os.close(self.fd)
