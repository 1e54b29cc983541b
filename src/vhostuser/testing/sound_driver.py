"""A model of the Linux virtio-snd driver (``sound/virtio/``) on top of
:class:`~vhostuser.testing.frontend.MockFrontend`.

What it does, as the driver does it:

* :meth:`VirtioSndDriver.probe` - ``virtsnd_probe``: read the config
  (jacks, streams, chmaps), then ``virtsnd_build_devs``: JACK_INFO for all jacks,
  PCM_INFO for all streams, CHMAP_INFO for all channel maps (each one
  QUERY_INFO of every item, ``size`` = the item's struct size); then
  ``virtsnd_enable_event_vq`` fills the event queue with 8-byte buffers;
* a playback or capture run (:class:`PcmRun`), as ALSA drives
  ``virtio_pcm_ops.c``: ``hw_params`` -> PCM_SET_PARAMS, ``prepare`` ->
  PCM_PREPARE, ``trigger(START)`` -> every period of the buffer queued as an I/O
  message (tx: xfer header + frames readable, status writable; rx: xfer header
  readable, frames + status writable), then PCM_START; each completed period
  is requeued with the next one (``virtsnd_pcm_msg_complete``);
  ``trigger(STOP)`` -> PCM_STOP, ``sync_stop`` -> PCM_RELEASE and waiting for
  every message to come back.
"""
from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..devices.sound.protocol import (
    CHMAP_INFO,
    CONFIG,
    CONTROL_QUEUE,
    EVENT,
    EVENT_QUEUE,
    JACK_INFO,
    PCM_INFO,
    PCM_SET_PARAMS,
    PCM_STATUS,
    RATE_INDEX,
    RX_QUEUE,
    TX_QUEUE,
    XFER,
    Code,
    Direction,
    Format,
)
from .frontend import MockFrontend


@dataclass
class Probed:
    jacks: list[tuple] = field(default_factory=list)
    streams: list[tuple] = field(default_factory=list)
    chmaps: list[tuple] = field(default_factory=list)


class VirtioSndDriver:
    """The guest's virtio_snd driver for the device behind ``fe``."""

    def __init__(self, fe: MockFrontend, event_buffers: int = 16) -> None:
        self.fe = fe
        self.event_buffers = event_buffers
        self.probed = Probed()

    # ------------------------------------------------------------ control
    def control(self, request: bytes, reply_size: int = 0) -> tuple[int, bytes]:
        """One control message: (status code, payload after the status)."""
        used = self.fe.request(CONTROL_QUEUE, [request], [4 + reply_size])
        assert used.length >= 4, f"control reply of {used.length} bytes"
        (code,) = struct.unpack_from("<I", used.data)
        return code, used.data[4:used.length]

    def query(self, code: Code, count: int, item: struct.Struct) -> list[tuple]:
        """A control request ``code`` for ``count`` items of ``item``'s layout; the unpacked items (asserts the device answered S_OK)."""
        status, data = self.control(struct.pack("<IIII", code, 0, count, item.size), count * item.size)
        assert status == Code.S_OK, f"{code.name}: status {status:#x}"
        return [item.unpack_from(data, i * item.size) for i in range(count)]

    def probe(self) -> Probed:
        """Read the config and query the jacks, streams and channel maps, as the Linux driver does at probe; the result."""
        jacks, streams, chmaps = CONFIG.unpack(self.fe.get_config(0, CONFIG.size))
        if jacks:
            self.probed.jacks = self.query(Code.R_JACK_INFO, jacks, JACK_INFO)
        if streams:
            self.probed.streams = self.query(Code.R_PCM_INFO, streams, PCM_INFO)
        if chmaps:
            self.probed.chmaps = self.query(Code.R_CHMAP_INFO, chmaps, CHMAP_INFO)
        for _ in range(self.event_buffers):
            self.fe.add(EVENT_QUEUE, [], [EVENT.size])
        self.fe.publish(EVENT_QUEUE, force_kick=True)
        return self.probed

    def pcm(self, code: Code, stream_id: int) -> int:
        """Send the PCM control request ``code`` (prepare, start, stop, release) for ``stream_id``; the status code."""
        return self.control(struct.pack("<II", code, stream_id))[0]

    def set_params(self, stream_id: int, *, buffer_bytes: int, period_bytes: int, channels: int = 2,
                   fmt: Format = Format.S16, rate: int = 48000, features: int = 0) -> int:
        """VIRTIO_SND_R_PCM_SET_PARAMS for ``stream_id``; the status code."""
        return self.control(PCM_SET_PARAMS.pack(Code.R_PCM_SET_PARAMS, stream_id, buffer_bytes, period_bytes,
                                                features, channels, fmt, RATE_INDEX[rate]))[0]

    def events(self) -> list[tuple[int, int]]:
        """Events delivered so far (code, data); their buffers requeued."""
        used = self.fe.reap(EVENT_QUEUE)
        for _ in used:
            self.fe.add(EVENT_QUEUE, [], [EVENT.size])
        if used:
            self.fe.publish(EVENT_QUEUE)
        return [EVENT.unpack_from(u.data) for u in used if u.length >= EVENT.size]


@dataclass
class Completed:
    """One returned I/O message."""

    at: float            # time.monotonic() when the driver saw it
    status: int
    latency_bytes: int
    frames: bytes        # input: what the device captured


class PcmRun:
    """One stream from SET_PARAMS to RELEASE, driven period by period.

    ``source(n)`` gives the next ``n`` bytes of output frames (playback)."""

    def __init__(self, drv: VirtioSndDriver, stream_id: int, direction: Direction, *, rate: int = 48000,
                 channels: int = 2, fmt: Format = Format.S16, period_frames: int = 480, periods: int = 4,
                 source: Callable[[int], bytes] | None = None, features: int = 0) -> None:
        self.drv, self.fe = drv, drv.fe
        self.stream_id, self.direction = stream_id, direction
        self.frame_bytes = channels * {Format.U8: 1, Format.S16: 2, Format.S32: 4, Format.FLOAT: 4}[fmt]
        self.period_bytes = period_frames * self.frame_bytes
        self.periods = periods
        self.queue = TX_QUEUE if direction == Direction.OUTPUT else RX_QUEUE
        self.source = source or (lambda n: bytes(n))
        self.completed: list[Completed] = []
        self.outstanding = 0
        self.period_seconds = period_frames / rate
        self.status = {
            "set_params": drv.set_params(stream_id, buffer_bytes=self.period_bytes * periods,
                                         period_bytes=self.period_bytes, channels=channels, fmt=fmt, rate=rate,
                                         features=features)}

    def _queue_period(self) -> None:
        header = XFER.pack(self.stream_id)
        if self.direction == Direction.OUTPUT:
            self.fe.add(self.queue, [header, self.source(self.period_bytes)], [PCM_STATUS.size])
        else:
            self.fe.add(self.queue, [header], [self.period_bytes, PCM_STATUS.size])
        self.outstanding += 1

    def start(self) -> None:
        """prepare + trigger(START): PREPARE, every period queued, START."""
        self.status["prepare"] = self.drv.pcm(Code.R_PCM_PREPARE, self.stream_id)
        for _ in range(self.periods):
            self._queue_period()
        self.fe.publish(self.queue, force_kick=True)
        self.status["start"] = self.drv.pcm(Code.R_PCM_START, self.stream_id)

    def _take(self, used) -> None:  # noqa: ANN001
        now = time.monotonic()
        for u in used:
            self.outstanding -= 1
            data = u.data[:u.length]
            code, latency = PCM_STATUS.unpack(data[-PCM_STATUS.size:]) if len(data) >= 8 else (-1, 0)
            self.completed.append(Completed(now, code, latency, data[:-PCM_STATUS.size]))

    def pump(self, periods: int, timeout: float = 10.0) -> list[Completed]:
        """Wait for ``periods`` more completions, requeueing a period for each."""
        start = len(self.completed)
        deadline = time.monotonic() + timeout
        while len(self.completed) - start < periods:
            used = self.fe.wait_used(self.queue, 1, max(0.01, deadline - time.monotonic()))
            self._take(used)
            for _ in used:
                self._queue_period()
            self.fe.publish(self.queue)
        return self.completed[start:]

    def collect(self) -> list[Completed]:
        """Completions already in the used ring (no waiting), each period requeued.

        Called right after a host-side change returned, it separates what the
        device completed before the change from what it completes afterwards."""
        used = self.fe.reap(self.queue)
        start = len(self.completed)
        self._take(used)
        for _ in used:
            self._queue_period()
        if used:
            self.fe.publish(self.queue)
        return self.completed[start:]

    def stop(self) -> None:
        """trigger(STOP) then sync_stop: STOP, RELEASE, every message back."""
        self.status["stop"] = self.drv.pcm(Code.R_PCM_STOP, self.stream_id)
        self.status["release"] = self.drv.pcm(Code.R_PCM_RELEASE, self.stream_id)
        deadline = time.monotonic() + 5
        while self.outstanding and time.monotonic() < deadline:
            self._take(self.fe.wait_used(self.queue, 1, max(0.01, deadline - time.monotonic())))
