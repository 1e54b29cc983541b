"""Packet hooks on the switch path, and ready-made seeded impairments.

A hook is a callable ``hook(packet: Packet) -> HookResult`` that the switch
calls for every frame entering it from a port (``Direction.INGRESS``) or
leaving it to a port (``Direction.EGRESS``).  What it returns decides the
frame's fate:

* ``None`` (or :data:`PASS`) - pass it on unchanged;
* :data:`DROP` (an empty tuple) - drop it;
* ``bytes`` - pass this frame instead (modify);
* :class:`Delay` - pass it (or a replacement) after a delay: a timer thread
  delivers it later, the worker never blocks;
* a list or tuple of the above - several frames (duplicate).

Hooks of one place run in the order they were added; every frame a hook
produces goes through the next one (delays add up).

Impairments (:class:`Loss`, :class:`Latency`, :class:`Reorder`,
:class:`Corrupt`, :class:`Duplicate`, :class:`RateLimit`) are hooks with a
``seed`` so a run can be repeated; :func:`parse_impairment` builds them from a
``--impair`` string.
"""
from __future__ import annotations

import enum
import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union


class Direction(str, enum.Enum):
    """Which way a frame crosses a port: into the switch from the port's guest, or out of it."""
    INGRESS = "ingress"  # from a port's guest into the switch
    EGRESS = "egress"    # from the switch out to a port's guest


@dataclass(frozen=True)
class Packet:
    """What a hook sees: the frame, the port it came in on (ingress) or goes out
    to (egress), the direction, and when (``time.monotonic()``)."""

    frame: bytes
    port: int
    direction: Direction
    time: float


@dataclass(frozen=True)
class Delay:
    """Deliver ``frame`` (None: the frame as it is) ``seconds`` later."""

    seconds: float
    frame: bytes | None = None


PASS = None
DROP: tuple[()] = ()
HookResult = Union[None, bytes, bytearray, Delay, Sequence[Union[bytes, bytearray, Delay]]]
Hook = Callable[[Packet], HookResult]


def apply_hooks(hooks: Sequence[Hook], frame: bytes, port: int, direction: Direction,
                now: float | None = None) -> list[tuple[bytes, float]]:
    """Run ``frame`` through ``hooks``: the resulting ``(frame, delay)`` list."""
    t = time.monotonic() if now is None else now
    items: list[tuple[bytes, float]] = [(frame, 0.0)]
    for hook in hooks:
        out: list[tuple[bytes, float]] = []
        for f, d in items:
            result = hook(Packet(f, port, direction, t + d))
            _collect(result, f, d, out)
        items = out
        if not items:
            break
    return items


def _collect(result: HookResult, frame: bytes, delay: float, out: list[tuple[bytes, float]]) -> None:
    if result is None:
        out.append((frame, delay))
    elif isinstance(result, (bytes, bytearray)):
        out.append((bytes(result), delay))
    elif isinstance(result, Delay):
        out.append((frame if result.frame is None else bytes(result.frame), delay + max(0.0, result.seconds)))
    elif isinstance(result, (list, tuple)):
        for item in result:
            if item is None:
                raise TypeError("a hook's list may hold bytes or Delay, not None")
            _collect(item, frame, delay, out)
    else:
        raise TypeError(f"a hook returned {type(result).__name__}: expected None, bytes, Delay or a list")


class Scheduler:
    """One timer thread running callbacks at their due time (FIFO for equal
    times), so delayed frames never block a worker.  Started on first use."""

    def __init__(self, name: str = "vhostuser-net-timer") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[..., object], tuple[object, ...]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def call_later(self, delay: float, fn: Callable[..., object], *args: object) -> None:
        """Call ``fn(*args)`` after ``delay`` seconds on the scheduler's thread (ignored once stopped)."""
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def pending(self) -> int:
        """Calls scheduled and not yet made."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._stopped:
                    return
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a failing delivery must not end the timer
                import logging

                logging.getLogger(__name__).exception("delayed frame delivery failed")

    def close(self) -> None:
        """Stop; frames still waiting are dropped."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


# ------------------------------------------------------------------ impairments
class _Seeded:
    def __init__(self, seed: int | None) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()  # hooks run on several workers

    def chance(self, percent: float) -> bool:
        with self.lock:
            return self.rng.random() * 100.0 < percent


def _check_percent(name: str, value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be a percentage between 0 and 100, got {value}")
    return value


class Loss(_Seeded):
    """Drop ``percent`` % of frames at random."""

    def __init__(self, percent: float, seed: int | None = None) -> None:
        super().__init__(seed)
        self.percent = _check_percent("loss", percent)
        self.dropped = 0

    def __call__(self, packet: Packet) -> HookResult:
        if self.chance(self.percent):
            self.dropped += 1
            return DROP
        return PASS


class Duplicate(_Seeded):
    """Send ``percent`` % of frames twice."""

    def __init__(self, percent: float, seed: int | None = None) -> None:
        super().__init__(seed)
        self.percent = _check_percent("duplicate", percent)

    def __call__(self, packet: Packet) -> HookResult:
        return [packet.frame, packet.frame] if self.chance(self.percent) else PASS


class Corrupt(_Seeded):
    """Flip one random bit after the Ethernet header in ``percent`` % of frames
    (the frame is still switched; the guest's checksums catch the damage)."""

    def __init__(self, percent: float, seed: int | None = None) -> None:
        super().__init__(seed)
        self.percent = _check_percent("corrupt", percent)

    def __call__(self, packet: Packet) -> HookResult:
        frame = packet.frame
        if len(frame) <= 14 or not self.chance(self.percent):
            return PASS
        with self.lock:
            pos = self.rng.randrange(14, len(frame))
            bit = self.rng.randrange(8)
        damaged = bytearray(frame)
        damaged[pos] ^= 1 << bit
        return bytes(damaged)


class Latency(_Seeded):
    """Delay every frame by ``ms`` ± ``jitter_ms`` (uniform); jitter reorders, as with netem."""

    def __init__(self, ms: float, jitter_ms: float = 0.0, seed: int | None = None) -> None:
        super().__init__(seed)
        if ms < 0 or jitter_ms < 0:
            raise ValueError("latency and jitter must not be negative")
        self.ms, self.jitter_ms = ms, jitter_ms

    def __call__(self, packet: Packet) -> HookResult:
        with self.lock:
            jitter = self.rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return Delay(max(0.0, self.ms + jitter) / 1000.0)


class Reorder(_Seeded):
    """Hold ``percent`` % of frames back by ``gap_ms``, so later frames overtake them."""

    def __init__(self, percent: float, gap_ms: float = 10.0, seed: int | None = None) -> None:
        super().__init__(seed)
        self.percent = _check_percent("reorder", percent)
        self.gap_ms = gap_ms

    def __call__(self, packet: Packet) -> HookResult:
        return Delay(self.gap_ms / 1000.0) if self.chance(self.percent) else PASS


class RateLimit:
    """A link of ``bits_per_second``: frames leave one after the other at that
    rate (a delay), and are dropped when more than ``max_queue_ms`` of them wait."""

    def __init__(self, bits_per_second: float, max_queue_ms: float = 100.0) -> None:
        if bits_per_second <= 0:
            raise ValueError("rate must be positive")
        self.rate = bits_per_second
        self.max_queue = max_queue_ms / 1000.0
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.dropped = 0

    def __call__(self, packet: Packet) -> HookResult:
        with self._lock:
            start = max(packet.time, self._free_at)
            if start - packet.time > self.max_queue:
                self.dropped += 1
                return DROP
            self._free_at = start + len(packet.frame) * 8 / self.rate
            wait = self._free_at - packet.time
        return Delay(wait) if wait > 0 else PASS


# ------------------------------------------------------------------ --impair
_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9}


def _rate(text: str) -> float:
    t = text.strip().lower().removesuffix("bit").removesuffix("bps").removesuffix("b")
    if t and t[-1] in _UNITS:
        return float(t[:-1]) * _UNITS[t[-1]]
    return float(t)


def _ms(text: str) -> float:
    t = text.strip().lower()
    if t.endswith("ms"):
        return float(t[:-2])
    if t.endswith("s"):
        return float(t[:-1]) * 1000.0
    return float(t)


def _pct(text: str) -> float:
    return float(text.strip().removesuffix("%"))


@dataclass
class ImpairmentSpec:
    """One ``--impair`` option: the hooks, and where they go."""

    hooks: list[Hook]
    port: int | None = None
    direction: Direction = Direction.EGRESS


IMPAIR_KEYS = ("loss", "duplicate", "corrupt", "reorder", "reorder-gap", "latency", "jitter", "rate",
               "seed", "port", "direction")


def parse_impairment(text: str) -> ImpairmentSpec:
    """``"loss=5%,latency=20ms,jitter=5ms,seed=1,port=0,direction=egress"`` ->
    hooks in the order loss, corrupt, duplicate, reorder, latency, rate."""
    values: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or key not in IMPAIR_KEYS:
            raise ValueError(f"--impair: expected key=value with key in {', '.join(IMPAIR_KEYS)}, got {item!r}")
        values[key] = value.strip()
    try:
        seed = int(values["seed"]) if "seed" in values else None
        hooks: list[Hook] = []
        if "loss" in values:
            hooks.append(Loss(_pct(values["loss"]), seed))
        if "corrupt" in values:
            hooks.append(Corrupt(_pct(values["corrupt"]), seed))
        if "duplicate" in values:
            hooks.append(Duplicate(_pct(values["duplicate"]), seed))
        if "reorder" in values:
            hooks.append(Reorder(_pct(values["reorder"]), _ms(values.get("reorder-gap", "10ms")), seed))
        if "latency" in values or "jitter" in values:
            hooks.append(Latency(_ms(values.get("latency", "0")), _ms(values.get("jitter", "0")), seed))
        if "rate" in values:
            hooks.append(RateLimit(_rate(values["rate"])))
        port = int(values["port"]) if "port" in values else None
        direction = Direction(values.get("direction", "egress").lower())
    except ValueError as exc:
        raise ValueError(f"--impair {text!r}: {exc}") from None
    if not hooks:
        raise ValueError(f"--impair {text!r}: no impairment given")
    return ImpairmentSpec(hooks, port, direction)
