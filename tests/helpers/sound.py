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


def median_frequency(data: bytes, rate: int) -> float:
    """From the median distance between rising zero crossings: robust to the
    gaps a sound server inserts when a loaded machine feeds it late."""
    s = samples(data)
    rising = [i for i in range(1, len(s)) if s[i - 1] < 0 <= s[i]]
    gaps = sorted(b - a for a, b in zip(rising, rising[1:]))
    return rate / gaps[len(gaps) // 2] if gaps else 0.0


def median_block_rms(data: bytes, block: int = 480, floor: float = 1000.0) -> float:
    """The median RMS of the blocks (``block`` samples) louder than ``floor``."""
    s = samples(data)
    levels = sorted(r for r in (rms(s[i:i + block].tobytes()) for i in range(0, len(s) - block, block))
                    if r > floor)
    return levels[len(levels) // 2] if levels else 0.0


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

    def __init__(self, input_byte: bytes = b"\x07", *, release_when_disabled: bool = False) -> None:
        self.input_byte = input_byte
        self.release_when_disabled = release_when_disabled
        self.writes: list[tuple[float, bytes]] = []
        self.reads: list[float] = []
        self.flushes = 0
        self.closed = 0
        self.opened: list[tuple[int, Direction, PcmParams]] = []
        self.lock = threading.Lock()

    def open(self, stream_id: int, direction: Direction, params: PcmParams) -> RecordingStream:
        self.opened.append((stream_id, direction, params))
        return RecordingStream(self, direction, params)
