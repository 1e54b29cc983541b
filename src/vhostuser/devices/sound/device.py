"""The virtio-snd device: control queue, event queue, paced tx/rx streams and
per-direction enable flags.

Streams: always one output stream (id 0) and one input stream (id 1).  Each
stream in START runs a pacing thread: it takes the I/O messages the worker
queued for it and returns one buffer's worth each time that much audio has
played (output) or been captured (input) at the negotiated rate.

The enable flags are a security boundary and are checked where the samples
move: a disabled output never writes to the host (the guest still gets its
buffers back on time), a disabled input returns silence and never reads the
host.  :meth:`SoundBackend.set_enabled` takes the I/O lock, so once it returns
no buffer filled under the old setting is still to be completed.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...backend import VhostUserBackend
from ...errors import QueueError
from ...virtqueue.chain import DescriptorChain
from ...vring import VringState
from .hosts import AudioHost, HostStream, NullHost
from .protocol import (
    CONFIG,
    CONTROL_QUEUE,
    EVENT_QUEUE,
    HDR,
    JACK_REMAP,
    PCM_HDR,
    PCM_SET_PARAMS,
    PCM_STATUS,
    QUERY_INFO,
    RATES,
    RX_QUEUE,
    TX_QUEUE,
    XFER,
    ChmapInfo,
    Code,
    Direction,
    Format,
    JackInfo,
    PcmParams,
    PcmState,
    StreamInfo,
    event,
    next_state,
    pcm_status,
    silence,
    status,
)

log = logging.getLogger(__name__)

OUTPUT_STREAM, INPUT_STREAM = 0, 1
#: states in which a stream has its host stream
_HOST_OPEN_STATES = (PcmState.PREPARE, PcmState.START, PcmState.STOP)
_LOCK_POLL = 0.02


class BadRequest(Exception):
    """A control request answered with a non-OK status."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class PcmStream:
    """One PCM stream: its state machine, parameters, host stream and held I/O messages."""

    id: int
    info: StreamInfo
    state: PcmState = PcmState.INITIAL
    params: PcmParams | None = None
    host: HostStream | None = None
    pending: deque[DescriptorChain] = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    #: bumped when the ring starts or stops: chains of an older session are stale
    session: int = 0
    #: how many held messages at the head already went to the host (output)
    played: int = 0
    #: frames moved / underruns, for tests and logs
    frames: int = 0
    xruns: int = 0

    @property
    def direction(self) -> Direction:
        """Output or input (from the stream's info)."""
        return self.info.direction


class SoundBackend(VhostUserBackend):
    """virtio-snd (device id 25) with one output and one input stream on ``host``."""

    num_queues = 4
    max_queue_size = 1024

    def __init__(self, host: AudioHost | None = None, *, output_enabled: bool = True,
                 input_enabled: bool = True) -> None:
        super().__init__()
        self.host = host or NullHost()
        self.streams = [PcmStream(OUTPUT_STREAM, StreamInfo(Direction.OUTPUT)),
                        PcmStream(INPUT_STREAM, StreamInfo(Direction.INPUT))]
        self.jacks = [JackInfo(Direction.OUTPUT, hda_reg_defconf=0x01014010),   # line out, green, rear
                      JackInfo(Direction.INPUT, hda_reg_defconf=0x01A19020)]    # mic in, pink, rear
        self.chmaps = [ChmapInfo(Direction.OUTPUT), ChmapInfo(Direction.INPUT)]
        self.config_space = CONFIG.pack(len(self.jacks), len(self.streams), len(self.chmaps))
        self.enabled = {Direction.OUTPUT: output_enabled, Direction.INPUT: input_enabled}
        #: held while a buffer's samples move and while a flag changes
        self.io_lock = threading.Lock()
        self.vrings: dict[int, VringState] = {}
        self.pending_events: deque[bytes] = deque(maxlen=256)

    # ------------------------------------------------------------ enable flags
    def set_enabled(self, direction: Direction, on: bool) -> None:
        """Enable or disable a direction at once (also for running streams).

        With a host that releases disabled streams (pulse), a disabled direction's
        server stream is closed (the host microphone is not even open) and opened
        again when enabled; otherwise input the host buffered meanwhile is flushed."""
        with self.io_lock:
            was = self.enabled[direction]
            self.enabled[direction] = on
            if on == was:
                return
            for s in self.streams:
                if s.direction != direction or s.params is None or s.state not in _HOST_OPEN_STATES:
                    continue
                if self._host_releases:
                    if on:
                        try:
                            self._open_host(s)
                        except OSError as exc:  # the stream goes on, as if still disabled
                            log.error("sound: cannot reopen host stream %d: %s", s.id, exc)
                    else:
                        self._close_host(s)
                elif on and direction == Direction.INPUT and s.host is not None:
                    try:  # audio the host captured while disabled must not leak later
                        s.host.flush()
                    except OSError as exc:
                        log.warning("sound: flushing host input failed: %s", exc)
        log.info("sound: %s %s", direction.name.lower(), "enabled" if on else "disabled")

    @property
    def _host_releases(self) -> bool:
        return bool(getattr(self.host, "release_when_disabled", False))

    def _open_host(self, s: PcmStream) -> None:
        """Open the host stream (call with io_lock held); OSError propagates."""
        assert s.params is not None
        if s.host is None:
            s.host = self.host.open(s.id, s.direction, s.params)

    def describe_enabled(self) -> str:
        """Which directions are enabled, e.g. ``output=on input=off`` (the control socket's answer)."""
        return " ".join(f"{d.name.lower()}={'on' if self.enabled[d] else 'off'}" for d in Direction)

    def command(self, line: str) -> str:
        """The control-socket protocol: ``QUERY``, ``SET output|input on|off`` -> one reply line."""
        words = line.split()
        if len(words) == 1 and words[0].upper() == "QUERY":
            return "OK " + self.describe_enabled()
        if len(words) == 3 and words[0].upper() == "SET" and words[1].lower() in ("output", "input") \
                and words[2].lower() in ("on", "off"):
            self.set_enabled(Direction[words[1].upper()], words[2].lower() == "on")
            return "OK " + self.describe_enabled()
        raise ValueError(f"bad command {line.strip()!r}: QUERY | SET output|input on|off")

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the pacing threads and close the host streams (the command and the fixtures call it at the end)."""
        for s in self.streams:
            self._stop_thread(s)
            self._close_host(s)

    def vring_started(self, index: int, vring: VringState) -> None:
        self.vrings[index] = vring
        if index == EVENT_QUEUE:
            self._flush_events(vring)
        for s in self.streams:
            if self._queue_of(s) == index:
                self._new_session(s)
                if s.state == PcmState.START:
                    self._start_thread(s)

    def vring_stopped(self, index: int, vring: VringState) -> None:
        for s in self.streams:
            if self._queue_of(s) == index:
                self._new_session(s)

    def _new_session(self, s: PcmStream) -> None:
        """Forget the chains of the last session: the ring restarts from its used
        index, so the driver's messages come again (a reconnect may skip vring_stopped)."""
        self._stop_thread(s, join=False)
        with s.cond:
            s.session += 1
            s.pending.clear()
            s.played = 0

    @staticmethod
    def _queue_of(s: PcmStream) -> int:
        return TX_QUEUE if s.direction == Direction.OUTPUT else RX_QUEUE

    # ------------------------------------------------------------ dispatch
    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState],
                     thread_id: int) -> None:
        vring = vrings[device_event]
        if device_event == CONTROL_QUEUE:
            self._control(vring)
        elif device_event == EVENT_QUEUE:
            self._flush_events(vring)
        elif device_event in (TX_QUEUE, RX_QUEUE):
            self._io(device_event, vring)

    # ------------------------------------------------------------ control queue
    def _control(self, vring: VringState) -> None:
        used = []
        while chain := vring.pop_descriptor_chain():
            reply = self.control_reply(chain.reader().read(chain.readable_len))
            if chain.writable_len < len(reply):
                log.warning("sound: control reply of %d bytes does not fit the %d-byte buffer",
                            len(reply), chain.writable_len)
                reply = status(Code.S_BAD_MSG) if chain.writable_len >= HDR.size else b""
            used.append((chain, chain.writer().write(reply)))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()

    def control_reply(self, request: bytes) -> bytes:
        """The reply to one control request: a status, then the items of an INFO query."""
        try:
            return status(Code.S_OK) + self._request(request)
        except BadRequest as exc:
            log.warning("sound: control request %s: %s", _code_name(request), exc)
            return status(exc.code)

    def _request(self, data: bytes) -> bytes:
        if len(data) < HDR.size:
            raise BadRequest(Code.S_BAD_MSG, f"request of {len(data)} bytes has no header")
        (code,) = HDR.unpack_from(data)
        if code in (Code.R_JACK_INFO, Code.R_PCM_INFO, Code.R_CHMAP_INFO):
            packed = {Code.R_JACK_INFO: [j.pack() for j in self.jacks],
                      Code.R_PCM_INFO: [s.info.pack() for s in self.streams],
                      Code.R_CHMAP_INFO: [c.pack() for c in self.chmaps]}[Code(code)]
            return self._query(data, packed)
        if code == Code.R_JACK_REMAP:
            return self._jack_remap(data)
        if code in (Code.R_PCM_SET_PARAMS, Code.R_PCM_PREPARE, Code.R_PCM_RELEASE, Code.R_PCM_START,
                    Code.R_PCM_STOP):
            return self._pcm(Code(code), data)
        raise BadRequest(Code.S_NOT_SUPP, f"unknown request code {code:#x}")

    @staticmethod
    def _unpack(layout, data: bytes):  # noqa: ANN001, ANN205
        if len(data) < layout.size:
            raise BadRequest(Code.S_BAD_MSG, f"request of {len(data)} bytes, needs {layout.size}")
        return layout.unpack_from(data)

    def _query(self, data: bytes, items: list[bytes]) -> bytes:
        _, start, count, size = self._unpack(QUERY_INFO, data)
        item_size = len(items[0]) if items else 0
        if start + count > len(items) or count == 0:
            raise BadRequest(Code.S_BAD_MSG, f"items {start}..{start + count} of {len(items)}")
        if size < item_size:
            raise BadRequest(Code.S_BAD_MSG, f"item size {size} smaller than {item_size}")
        return b"".join(i.ljust(size, b"\0") for i in items[start:start + count])

    def _jack_remap(self, data: bytes) -> bytes:
        _, jack_id, association, sequence = self._unpack(JACK_REMAP, data)
        if jack_id >= len(self.jacks):
            raise BadRequest(Code.S_BAD_MSG, f"no jack {jack_id}")
        jack = self.jacks[jack_id]
        if not jack.features & 1:
            raise BadRequest(Code.S_NOT_SUPP, f"jack {jack_id} cannot be remapped")
        jack.association, jack.sequence = association, sequence
        return b""

    def _pcm(self, code: Code, data: bytes) -> bytes:
        _, stream_id = self._unpack(PCM_HDR, data)
        if stream_id >= len(self.streams):
            raise BadRequest(Code.S_BAD_MSG, f"no stream {stream_id}")
        s = self.streams[stream_id]
        to = next_state(s.state, code)
        if to is None:
            raise BadRequest(Code.S_BAD_MSG, f"{code.name} in state {s.state.value} of stream {stream_id}")
        if code == Code.R_PCM_SET_PARAMS:
            s.params = self._params(s, data)
            with self.io_lock:
                self._close_host(s)
        elif code == Code.R_PCM_PREPARE:
            with self.io_lock:
                if self.enabled[s.direction] or not self._host_releases:
                    try:
                        self._open_host(s)
                    except OSError as exc:
                        raise BadRequest(Code.S_IO_ERR, f"host {self.host.name}: {exc}") from exc
        elif code == Code.R_PCM_START:
            s.state = to
            self._start_thread(s)
        elif code == Code.R_PCM_STOP:
            self._stop_thread(s)
        elif code == Code.R_PCM_RELEASE:
            self._stop_thread(s)
            self._complete_all(s)
            with self.io_lock:
                self._close_host(s)
        s.state = to
        log.debug("sound: stream %d -> %s", stream_id, to.value)
        return b""

    def _params(self, s: PcmStream, data: bytes) -> PcmParams:
        _, _, buffer_bytes, period_bytes, features, channels, fmt, rate = self._unpack(PCM_SET_PARAMS, data)
        info = s.info
        if features & ~info.features:
            raise BadRequest(Code.S_NOT_SUPP, f"features {features:#x} not offered ({info.features:#x})")
        if fmt not in {f.value for f in info.formats}:
            raise BadRequest(Code.S_NOT_SUPP, f"format {fmt}")
        if RATES.get(rate) not in info.rates:
            raise BadRequest(Code.S_NOT_SUPP, f"rate index {rate}")
        if not info.channels_min <= channels <= info.channels_max:
            raise BadRequest(Code.S_NOT_SUPP, f"{channels} channels")
        params = PcmParams(buffer_bytes, period_bytes, features, channels, Format(fmt), RATES[rate])
        if period_bytes == 0 or period_bytes % params.frame_bytes or buffer_bytes < period_bytes \
                or buffer_bytes % period_bytes or buffer_bytes > 16 << 20:
            raise BadRequest(Code.S_BAD_MSG, f"buffer {buffer_bytes} / period {period_bytes} bytes")
        return params

    def _close_host(self, s: PcmStream) -> None:
        if s.host is not None:
            try:
                s.host.close()
            except OSError as exc:
                log.warning("sound: closing host stream %d: %s", s.id, exc)
            s.host = None

    # ------------------------------------------------------------ I/O messages
    def _io(self, index: int, vring: VringState) -> None:
        direction = Direction.OUTPUT if index == TX_QUEUE else Direction.INPUT
        rejected = []
        while chain := vring.pop_descriptor_chain():
            reason = self._accept(chain, direction)
            if reason is not None:
                log.warning("sound: I/O message on queue %d refused: %s", index, reason)
                rejected.append((chain, self._finish(chain, direction, Code.S_BAD_MSG, b"")))
        if rejected:
            vring.add_used_batch(rejected)
            vring.signal_used_queue()

    def _accept(self, chain: DescriptorChain, direction: Direction) -> str | None:
        """Queue ``chain`` on its stream, or say why not."""
        if chain.writable_len < PCM_STATUS.size:
            return f"no room for the status ({chain.writable_len} writable bytes)"
        header = chain.reader().read(XFER.size)
        if len(header) < XFER.size:
            return "short xfer header"
        (stream_id,) = XFER.unpack(header)
        if stream_id >= len(self.streams) or self.streams[stream_id].direction != direction:
            return f"no {direction.name.lower()} stream {stream_id}"
        s = self.streams[stream_id]
        if s.state not in (PcmState.PREPARE, PcmState.START, PcmState.STOP) or s.params is None:
            return f"stream {stream_id} is in state {s.state.value}"
        size = self._payload_len(chain, direction)
        if size > s.params.buffer_bytes or size % s.params.frame_bytes:
            return f"{size} bytes of frames for a {s.params.buffer_bytes}-byte buffer of " \
                   f"{s.params.frame_bytes}-byte frames"
        with s.cond:
            s.pending.append(chain)
            s.cond.notify()
        return None

    @staticmethod
    def _payload_len(chain: DescriptorChain, direction: Direction) -> int:
        if direction == Direction.OUTPUT:
            return chain.readable_len - XFER.size
        return chain.writable_len - PCM_STATUS.size

    @staticmethod
    def _finish(chain: DescriptorChain, direction: Direction, code: int, data: bytes, latency: int = 0) -> int:
        """Write input frames (if any) and the status at the end; the used length
        (0 when not even the status fits)."""
        if chain.writable_len < PCM_STATUS.size:
            return 0
        writer = chain.writer()
        fill = chain.writable_len - PCM_STATUS.size
        written = writer.write(data[:fill].ljust(fill, b"\0")) if fill else 0
        return written + writer.write(pcm_status(code, latency))

    def _complete_all(self, s: PcmStream) -> None:
        """RELEASE: every held message goes back (input: silence)."""
        vring = self.vrings.get(self._queue_of(s))
        with s.cond:
            chains, s.pending = list(s.pending), deque()
            s.played = 0
        if not chains or vring is None or not vring.is_running:
            return
        fmt = s.params.format if s.params else Format.S16
        vring.add_used_batch([(c, self._finish(c, s.direction, Code.S_OK, silence(
            fmt, self._payload_len(c, s.direction)) if s.direction == Direction.INPUT else b"")) for c in chains])
        vring.signal_used_queue()

    # ------------------------------------------------------------ pacing
    def _start_thread(self, s: PcmStream) -> None:
        if s.thread is not None and s.thread.is_alive():
            return
        s.stop = threading.Event()
        s.thread = threading.Thread(target=self._pace, args=(s, s.stop, s.session), name=f"snd-stream{s.id}",
                                    daemon=True)
        s.thread.start()

    def _stop_thread(self, s: PcmStream, join: bool = True) -> None:
        s.stop.set()
        with s.cond:
            s.cond.notify_all()
        if join and s.thread is not None and s.thread is not threading.current_thread():
            s.thread.join(5)
        s.thread = None

    def _pace(self, s: PcmStream, stop: threading.Event, session: int) -> None:
        """The stream's clock: the head message is returned when its frames are due."""
        params = s.params
        assert params is not None
        period = params.seconds(params.period_bytes)
        deadline = time.monotonic()
        while not stop.is_set():
            with s.cond:
                if not s.pending:
                    s.cond.wait(period)
                if stop.is_set():
                    return
                if not s.pending:
                    self._underrun(s)
                    deadline = time.monotonic()
                    continue
                chain = s.pending[0]  # stays held until completed: a stop leaves it there
            try:
                if not self._play_or_capture(s, chain, deadline, stop, session):
                    return
            except (OSError, QueueError) as exc:
                log.error("sound: stream %d: %s", s.id, exc)
                with s.cond:
                    if s.session == session and s.pending and s.pending[0] is chain:
                        s.pending.popleft()
                        s.played = max(0, s.played - 1)
            deadline += params.seconds(self._payload_len(chain, s.direction))
            lag = time.monotonic() - deadline
            if lag > params.seconds(params.buffer_bytes):
                deadline = time.monotonic()  # far behind (a stalled host): do not burst to catch up

    @staticmethod
    def _acquire(s: PcmStream, vring: VringState, stop: threading.Event, session: int) -> bool:
        """Take the ring's lock, unless the stream stops first (the worker may hold
        the lock while it waits for this thread to end) or the chain is stale."""
        while not vring.lock.acquire(timeout=_LOCK_POLL):
            if stop.is_set():
                return False
        if stop.is_set() or not vring.is_running or s.session != session:  # guest memory may be gone
            vring.lock.release()
            return False
        return True

    def _write_ahead(self, s: PcmStream) -> None:
        """Output: every held message not yet played goes to the host now (call with
        the ring's lock held), so the host has the guest's whole buffer queued and
        does not run dry between two periods of a loaded machine."""
        with s.cond:
            todo = list(s.pending)[s.played:]
            s.played = len(s.pending)
        for chain in todo:
            frames = chain.reader()
            frames.read(XFER.size)
            data = frames.read(self._payload_len(chain, Direction.OUTPUT))
            with self.io_lock:
                if self.enabled[Direction.OUTPUT] and s.host is not None:
                    s.host.write(data)

    def _play_or_capture(self, s: PcmStream, chain: DescriptorChain, deadline: float,
                         stop: threading.Event, session: int) -> bool:
        """Return the head message once its frames have played / been captured.
        False if the stream stopped first (the chain stays held).

        Output goes to the host as soon as it is held (see :meth:`_write_ahead`);
        input is captured when the buffer's time is over.  Guest memory is only
        touched under the ring's lock."""
        assert s.params is not None
        vring = self.vrings.get(self._queue_of(s))
        if vring is None:
            return False
        nbytes = self._payload_len(chain, s.direction)
        if s.direction == Direction.OUTPUT:
            if not self._acquire(s, vring, stop, session):
                return False
            try:
                self._write_ahead(s)
            finally:
                vring.lock.release()
        if stop.wait(max(0.0, deadline + s.params.seconds(nbytes) - time.monotonic())):
            return False
        if not self._acquire(s, vring, stop, session):
            return False
        try:
            with self.io_lock:
                code = Code.S_OK
                host = s.host
                out = b""
                if s.direction == Direction.INPUT:
                    out = silence(s.params.format, nbytes)
                    if self.enabled[Direction.INPUT] and host is not None:
                        try:
                            out = host.read(nbytes)
                        except OSError as exc:
                            log.error("sound: host capture failed: %s", exc)
                            code = Code.S_IO_ERR
                latency = host.latency_bytes() if host is not None else 0
                with s.cond:
                    s.pending.popleft()
                    s.played = max(0, s.played - 1)
                vring.add_used(chain, self._finish(chain, s.direction, code, out, latency))
                s.frames += nbytes // s.params.frame_bytes
            vring.signal_used_queue()
        finally:
            vring.lock.release()
        return True

    def _underrun(self, s: PcmStream) -> None:
        """No message when one was due: an xrun; tell the driver if it asked for it."""
        s.xruns += 1
        assert s.params is not None
        if s.params.features & (1 << 4):  # VIRTIO_SND_PCM_F_EVT_XRUNS
            self.pending_events.append(event(Code.EVT_PCM_XRUN, s.id))
            vring = self.vrings.get(EVENT_QUEUE)
            if vring is not None and vring.lock.acquire(timeout=0.1):
                try:
                    self._flush_events(vring)
                finally:
                    vring.lock.release()

    # ------------------------------------------------------------ event queue
    def _flush_events(self, vring: VringState) -> None:
        if not vring.is_running:
            return
        used = []
        while self.pending_events and (chain := vring.pop_descriptor_chain()) is not None:
            used.append((chain, chain.writer().write(self.pending_events.popleft())))
        if used:
            vring.add_used_batch(used)
            vring.signal_used_queue()

    def jack_event(self, jack_id: int, connected: bool) -> None:
        """Plug or unplug a jack: JACK_CONNECTED / JACK_DISCONNECTED to the driver."""
        self.jacks[jack_id].connected = connected
        self.pending_events.append(event(Code.EVT_JACK_CONNECTED if connected else Code.EVT_JACK_DISCONNECTED,
                                         jack_id))
        vring = self.vrings.get(EVENT_QUEUE)
        if vring is not None:
            with vring.lock:
                self._flush_events(vring)


def _code_name(request: bytes) -> str:
    if len(request) < HDR.size:
        return "(no header)"
    (code,) = HDR.unpack_from(request)
    try:
        return Code(code).name
    except ValueError:
        return hex(code)
