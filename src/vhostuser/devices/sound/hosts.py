"""Host audio back-ends of the sound device (``--backend``).

A :class:`AudioHost` opens one :class:`HostStream` per prepared PCM stream:

* ``null`` - output is discarded, input is silence;
* ``file`` - output is written to a WAV file, input is read from one (silence
  after its end);
* ``pulse`` - a PulseAudio (or PipeWire's pipewire-pulse) server through
  :mod:`.pulse`, a thin cffi binding to ``libpulse-simple``.

The device paces the streams itself; a host stream only moves bytes.
"""
from __future__ import annotations

import logging
import os
import wave
from typing import Protocol

from .protocol import Direction, Format, PcmParams, silence

log = logging.getLogger(__name__)


class HostStream(Protocol):
    """One open host-side stream of a PCM stream."""

    def write(self, data: bytes) -> None:
        """Play output frames."""

    def read(self, nbytes: int) -> bytes:
        """Capture exactly ``nbytes`` of input frames."""

    def flush(self) -> None:
        """Drop what the host buffered (input: audio captured while we did not read)."""

    def latency_bytes(self) -> int:
        """How far the host is behind, in bytes (0 if unknown)."""

    def close(self) -> None:
        """Release the host stream."""
        ...


class AudioHost(Protocol):
    """Where sound goes to and comes from on the host (null, WAV file, PulseAudio)."""
    name: str

    def open(self, stream_id: int, direction: Direction, params: PcmParams) -> HostStream:
        """Open the host side of stream ``stream_id`` with ``params``."""
        ...


class _NullStream:
    def __init__(self, params: PcmParams) -> None:
        self.params = params
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)

    def read(self, nbytes: int) -> bytes:
        return silence(self.params.format, nbytes)

    def flush(self) -> None:
        pass

    def latency_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class NullHost:
    """Output goes nowhere, input is silence."""

    name = "null"

    def open(self, stream_id: int, direction: Direction, params: PcmParams) -> HostStream:
        """A stream that discards output and produces silence."""
        return _NullStream(params)


_WAV_WIDTH = {Format.U8: 1, Format.S16: 2, Format.S32: 4}


class _WavOut:
    def __init__(self, path: str, params: PcmParams) -> None:
        if params.format not in _WAV_WIDTH:
            raise OSError(f"the file back-end writes PCM WAV: {params.format.name} is not supported")
        self._wav = wave.open(path, "wb")
        self._wav.setnchannels(params.channels)
        self._wav.setsampwidth(_WAV_WIDTH[params.format])
        self._wav.setframerate(params.rate)

    def write(self, data: bytes) -> None:
        self._wav.writeframesraw(data)

    def read(self, nbytes: int) -> bytes:
        raise OSError("an output stream does not capture")

    def flush(self) -> None:
        pass

    def latency_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._wav.close()  # patches the header with the final length


class _WavIn:
    def __init__(self, path: str, params: PcmParams) -> None:
        self.params = params
        self._wav = wave.open(path, "rb")
        got = (self._wav.getnchannels(), self._wav.getsampwidth(), self._wav.getframerate())
        want = (params.channels, _WAV_WIDTH.get(params.format), params.rate)
        if got != want:
            self._wav.close()
            raise OSError(f"{path}: channels/sample width/rate {got} do not match the stream's {want}")

    def write(self, data: bytes) -> None:
        raise OSError("an input stream does not play")

    def read(self, nbytes: int) -> bytes:
        data = self._wav.readframes(nbytes // self.params.frame_bytes)
        return data + silence(self.params.format, nbytes - len(data))

    def flush(self) -> None:
        pass

    def latency_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._wav.close()


class FileHost:
    """Output to ``output_path`` (WAV, rewritten at every PREPARE), input from
    ``input_path`` (WAV with the stream's channels, width and rate)."""

    name = "file"

    def __init__(self, output_path: str | None = None, input_path: str | None = None) -> None:
        self.output_path = output_path
        self.input_path = input_path

    def open(self, stream_id: int, direction: Direction, params: PcmParams) -> HostStream:
        """A stream writing output to, or reading input from, the configured WAV file (silence without one)."""
        path = self.output_path if direction == Direction.OUTPUT else self.input_path
        if path is None:
            return _NullStream(params)
        if direction == Direction.OUTPUT:
            return _WavOut(os.fspath(path), params)
        return _WavIn(os.fspath(path), params)


def make_host(name: str, **options: str | None) -> AudioHost:
    """The host back-end called ``name`` (null, file, pulse)."""
    if name == "null":
        return NullHost()
    if name == "file":
        return FileHost(options.get("output_file"), options.get("input_file"))
    if name == "pulse":
        from .pulse import PulseHost

        return PulseHost(server=options.get("pulse_server"), sink=options.get("pulse_sink"),
                         source=options.get("pulse_source"))
    raise ValueError(f"unknown sound back-end {name!r} (null, file, pulse)")
