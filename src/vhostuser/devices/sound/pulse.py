"""PulseAudio host back-end: a thin cffi binding (ABI mode, no compiler) to
``libpulse-simple.so.0``, the blocking "simple" client API.

Why this and not a PyPI binding: the six functions the device needs
(``pa_simple_new/write/read/flush/get_latency/free``) are a stable C ABI shipped
by Debian's ``libpulse0`` and work against PulseAudio and PipeWire's
pipewire-pulse alike; cffi is already our one runtime dependency, so the pulse
back-end adds no Python package at all (the library is loaded only when
``--backend pulse`` is used).
"""
from __future__ import annotations

import threading

from cffi import FFI

from .protocol import Direction, Format, PcmParams

_CDEF = """
typedef struct pa_simple pa_simple;
typedef struct { int format; uint32_t rate; uint8_t channels; } pa_sample_spec;
typedef struct { uint32_t maxlength; uint32_t tlength; uint32_t prebuf; uint32_t minreq; uint32_t fragsize; }
    pa_buffer_attr;
pa_simple *pa_simple_new(const char *server, const char *name, int dir, const char *dev,
                         const char *stream_name, const pa_sample_spec *ss, const void *map,
                         const pa_buffer_attr *attr, int *error);
void pa_simple_free(pa_simple *s);
int pa_simple_write(pa_simple *s, const void *data, size_t bytes, int *error);
int pa_simple_read(pa_simple *s, void *data, size_t bytes, int *error);
int pa_simple_flush(pa_simple *s, int *error);
uint64_t pa_simple_get_latency(pa_simple *s, int *error);
const char *pa_strerror(int error);
"""

_PA_STREAM_PLAYBACK, _PA_STREAM_RECORD = 1, 2
#: virtio-snd format -> pa_sample_format_t (little-endian)
_PA_FORMAT = {Format.U8: 0, Format.S16: 3, Format.FLOAT: 5, Format.S32: 7}

_lock = threading.Lock()
_lib: tuple[FFI, object, object] | None = None


def _load() -> tuple[FFI, object, object]:
    global _lib
    with _lock:
        if _lib is None:
            ffi = FFI()
            ffi.cdef(_CDEF)
            simple = ffi.dlopen("libpulse-simple.so.0")
            core = ffi.dlopen("libpulse.so.0")  # pa_strerror lives here
            _lib = (ffi, simple, core)
        return _lib


class PulseError(OSError):
    """A PulseAudio call failed (the message has pa_strerror's text)."""
    pass


class PulseStream:
    """One playback or record stream on a PulseAudio server."""

    def __init__(self, server: str | None, device: str | None, direction: Direction, params: PcmParams,
                 name: str) -> None:
        self._ffi, self._simple, self._core = _load()
        ffi = self._ffi
        if params.format not in _PA_FORMAT:
            raise PulseError(f"PulseAudio: unsupported format {params.format.name}")
        spec = ffi.new("pa_sample_spec *", {"format": _PA_FORMAT[params.format], "rate": params.rate,
                                            "channels": params.channels})
        # keep the server's buffer near one guest buffer: latency stays what the guest expects
        attr = ffi.new("pa_buffer_attr *", {"maxlength": 0xFFFFFFFF, "tlength": params.buffer_bytes,
                                            "prebuf": 0xFFFFFFFF, "minreq": 0xFFFFFFFF,
                                            "fragsize": params.period_bytes})
        err = ffi.new("int *")
        self._pa = self._simple.pa_simple_new(  # type: ignore[attr-defined]
            server.encode() if server else ffi.NULL, b"vhostuser sound",
            _PA_STREAM_PLAYBACK if direction == Direction.OUTPUT else _PA_STREAM_RECORD,
            device.encode() if device else ffi.NULL, name.encode(), spec, ffi.NULL, attr, err)
        if self._pa == ffi.NULL:
            raise PulseError(f"PulseAudio: cannot open a stream: {self._error(err[0])}")
        self._err = err

    def _error(self, code: int) -> str:
        return self._ffi.string(self._core.pa_strerror(code)).decode()  # type: ignore[attr-defined]

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise PulseError(f"PulseAudio {what}: {self._error(self._err[0])}")

    def write(self, data: bytes) -> None:
        """Play output frames (blocks until PulseAudio took them)."""
        self._check(self._simple.pa_simple_write(self._pa, data, len(data), self._err), "write")  # type: ignore[attr-defined]

    def read(self, nbytes: int) -> bytes:
        """Record ``nbytes`` of input (blocks until they are there)."""
        buf = self._ffi.new("char[]", nbytes)
        self._check(self._simple.pa_simple_read(self._pa, buf, nbytes, self._err), "read")  # type: ignore[attr-defined]
        return bytes(self._ffi.buffer(buf, nbytes))

    def flush(self) -> None:
        """Drop what is buffered."""
        self._check(self._simple.pa_simple_flush(self._pa, self._err), "flush")  # type: ignore[attr-defined]

    def latency_bytes(self) -> int:
        """Bytes buffered in PulseAudio (not tracked: 0)."""
        return 0

    def close(self) -> None:
        """Free the PulseAudio stream (idempotent)."""
        if self._pa is not None:
            self._simple.pa_simple_free(self._pa)  # type: ignore[attr-defined]
            self._pa = None


class PulseHost:
    """Streams on the PulseAudio server ``server`` (None: the default, from the
    environment), playing to ``sink`` and recording from ``source`` (None: defaults)."""

    name = "pulse"
    #: a disabled direction's server stream is closed (the host microphone is not
    #: open while input is disabled) and opened again when it is enabled
    release_when_disabled = True

    def __init__(self, server: str | None = None, sink: str | None = None, source: str | None = None) -> None:
        _load()  # fail at start-up, not at the guest's first PREPARE
        self.server, self.sink, self.source = server, sink, source

    def open(self, stream_id: int, direction: Direction, params: PcmParams) -> PulseStream:
        """A PulseAudio playback or record stream for ``stream_id`` on the configured sink/source."""
        device = self.sink if direction == Direction.OUTPUT else self.source
        kind = "output" if direction == Direction.OUTPUT else "input"
        return PulseStream(self.server, device, direction, params, f"virtio-snd {kind} stream {stream_id}")
