"""Signals and a recording host back-end for the sound tests."""
from __future__ import annotations

import array
import math
import threading
import time

from vhostuser.devices.sound.protocol import Direction, PcmParams


def sine(freq: float, rate: int, amplitude: int = 10000, channels: int = 1):  # noqa: ANN201
    """A generator of S16 frame bytes: ``next_bytes(n)`` continues the wave."""
    pos = 0

    def next_bytes(n: int) -> bytes:
        nonlocal pos
        frames = n // (2 * channels)
        samples = array.array("h")
        for i in range(pos, pos + frames):
            v = int(amplitude * math.sin(2 * math.pi * freq * i / rate))
            samples.extend([v] * channels)
        pos += frames
        return samples.tobytes()
    return next_bytes


def samples(data: bytes) -> array.array:
    a = array.array("h")
    a.frombytes(data[: len(data) - len(data) % 2])
    return a


def rms(data: bytes) -> float:
    s = samples(data)
    return math.sqrt(sum(v * v for v in s) / len(s)) if s else 0.0


def frequency(data: bytes, rate: int) -> float:
    """Estimated from rising zero crossings (mono S16)."""
    s = samples(data)
    rising = [i for i in range(1, len(s)) if s[i - 1] < 0 <= s[i]]
    if len(rising) < 2:
        return 0.0
    return (len(rising) - 1) * rate / (rising[-1] - rising[0])


class RecordingStream:
    def __init__(self, host: RecordingHost, direction: Direction, params: PcmParams) -> None:
        self.host, self.direction, self.params = host, direction, params

    def write(self, data: bytes) -> None:
        self.host.writes.append((time.monotonic(), data))

    def read(self, nbytes: int) -> bytes:
        self.host.reads.append(time.monotonic())
        return self.host.input_byte * nbytes

    def flush(self) -> None:
        self.host.flushes += 1

    def latency_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.host.closed += 1


class RecordingHost:
    """A host that records every write with its time and captures a constant
    non-zero signal (so any leak of it is visible in a single sample)."""

    name = "recording"

    def __init__(self, input_byte: bytes = b"\x07") -> None:
        self.input_byte = input_byte
        self.writes: list[tuple[float, bytes]] = []
        self.reads: list[float] = []
        self.flushes = 0
        self.closed = 0
        self.opened: list[tuple[int, Direction, PcmParams]] = []
        self.lock = threading.Lock()

    def open(self, stream_id: int, direction: Direction, params: PcmParams) -> RecordingStream:
        self.opened.append((stream_id, direction, params))
        return RecordingStream(self, direction, params)
