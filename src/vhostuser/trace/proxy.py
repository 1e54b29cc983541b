"""The relaying proxy behind ``vhostuser trace``.

:class:`TraceProxy` listens where the front-end expects the back-end's socket,
and for every front-end connection (a *session*) connects to the real back-end.
Each message is framed from the byte stream, a copy is decoded with the library's
codec (:class:`~vhostuser.protocol.Decoder`, duplicated fds), and the original
bytes and fds are forwarded unchanged.  The one exception is
SET_BACKEND_REQ_FD: its socket is replaced by one end of a socketpair, so the
back-end channel is relayed (and traced) too.

Everything runs on one thread around a :class:`~vhostuser.sys_util.Poller`;
sessions may overlap and follow one another (reconnects).  Every fd the proxy
receives is closed exactly once, also on errors.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MessageFramingError, RemoteProtocolError
from ..protocol.codec import EOF, NEED_DATA, Decoder, Header, Message, close_fds
from ..protocol.message import HEADER_SIZE, BackendReq, FrontendReq
from ..protocol.payloads import U64
from ..protocol.requests import Reply
from ..sys_util import MAX_FDS, FdInfo, Poller, describe_fd, recv_with_fds, send_with_fds
from .events import TraceEvent, feature_names, flag_names, payload_fields, protocol_feature_names
from .rings import RingView
from .rules import Finding, SpecChecker
from .session import Pending, SessionState

__all__ = ["TraceProxy", "TraceOptions"]

log = logging.getLogger(__name__)

#: a header announcing more than this is not framed any more: the rest is relayed raw
_MAX_FRAME = 1 << 20
_RECV_SIZE = 65536
_FEATURE_REQS = {FrontendReq.GET_FEATURES, FrontendReq.SET_FEATURES}
_PROTOCOL_REQS = {FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.SET_PROTOCOL_FEATURES}
_NOTIFY_REQS = {FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL}


@dataclass
class TraceOptions:
    """How the proxy behaves."""

    #: run the spec checks (:mod:`.rules`)
    check: bool = False
    #: device type, for naming device feature bits (blk, net, rng, vsock, console, scsi)
    device: str | None = None
    #: seconds to keep trying to connect to the back-end for each session
    connect_timeout: float = 5.0
    #: stop after this many sessions ended (None: run until :meth:`TraceProxy.stop`)
    max_sessions: int | None = None
    #: map the guest memory the front-end shares (needed by the ring checks)
    map_memory: bool = False
    #: interpose kick/call fds and report ring activity (:mod:`.rings`)
    rings: bool = False
    #: answer the first REPLY_ACK of one of these front-end requests (e.g.
    #: ``("SET_MEM_TABLE", "ADD_MEM_REG")``) with a failure in the back-end's stead,
    #: to see how the front-end handles a NACK
    nack: tuple[str, ...] = ()


@dataclass
class _Fds:
    start: int
    end: int
    fds: list[int]


class _Direction:
    """One direction of one channel: frames messages, decodes a copy, forwards the original."""

    def __init__(self, session: _Session, channel: str, direction: str, src: socket.socket, dst: socket.socket,
                 decoder: Decoder) -> None:
        self.session = session
        self.channel = channel
        self.dir = direction
        self.src = src
        self.dst = dst
        self.decoder = decoder
        self.buf = bytearray()
        self.pos = 0
        self.batches: list[_Fds] = []
        self.raw = False  # framing lost: relay bytes as they come

    @property
    def bytes_needed(self) -> int:
        """What to read next: the rest of the current header or message, never more, so
        that one read never spans two messages and their fds cannot be misattributed
        (a stream socket may return the bytes before an fd-carrying message together
        with it)."""
        if self.raw:
            return _RECV_SIZE
        if len(self.buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self.buf)
        size = Header.unpack(bytes(self.buf[:HEADER_SIZE])).size
        return max(1, min(HEADER_SIZE + size - len(self.buf), _RECV_SIZE))

    def take(self, data: bytes, fds: list[int]) -> list[tuple[bytes, list[int]]]:
        """Add received bytes; return the complete messages (raw bytes and their fds)."""
        if self.raw:
            return [(data, fds)]
        start = self.pos + len(self.buf)
        self.buf += data
        if fds:
            self.batches.append(_Fds(start, start + len(data), fds))
        out: list[tuple[bytes, list[int]]] = []
        while len(self.buf) >= HEADER_SIZE:
            size = Header.unpack(bytes(self.buf[:HEADER_SIZE])).size
            if size > _MAX_FRAME:
                self.raw = True
                rest = bytes(self.buf)
                all_fds = [fd for b in self.batches for fd in b.fds]
                self.buf.clear()
                self.batches.clear()
                out.append((rest, all_fds))
                break
            end = HEADER_SIZE + size
            if len(self.buf) < end:
                break
            raw = bytes(self.buf[:end])
            out.append((raw, self._fds_for(self.pos, self.pos + end)))
            del self.buf[:end]
            self.pos += end
        return out

    def _fds_for(self, start: int, end: int) -> list[int]:
        taken: list[int] = []
        keep: list[_Fds] = []
        for b in self.batches:
            if b.start >= end:
                keep.append(b)
            elif b.start <= start or b.end <= end:
                taken += b.fds
            else:
                b.start = end
                keep.append(b)
        self.batches = keep
        return taken

    def close(self) -> None:
        for b in self.batches:
            close_fds(b.fds)
        self.batches.clear()
        self.decoder.close()


@dataclass
class _Session:
    state: SessionState
    front: socket.socket
    back: socket.socket
    directions: list[_Direction] = field(default_factory=list)
    channel_socks: list[socket.socket] = field(default_factory=list)
    closed: bool = False
    rings: RingView | None = None


class TraceProxy:
    """Relay vhost-user sessions from ``listen_path`` to ``backend_path``, reporting
    every message to ``sink`` as a :class:`TraceEvent`.

    Use :meth:`serve` (blocking) or :meth:`start` (a thread) and :meth:`stop`;
    as a context manager the thread is started and stopped.
    """

    def __init__(self, listen_path: str, backend_path: str, sink: Callable[[TraceEvent], None],
                 options: TraceOptions | None = None) -> None:
        self.listen_path = listen_path
        self.backend_path = backend_path
        self.sink = sink
        self.options = options or TraceOptions()
        self.t0 = time.monotonic()
        self.sessions: list[SessionState] = []
        self._seq = 0
        self._poller = Poller()
        self._tokens: dict[int, Callable[[], None]] = {}
        self._next_token = 1
        self._active: dict[int, _Session] = {}
        self._ended = 0
        self._stop = threading.Event()
        self._drop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deferred: list[TraceEvent] = []
        #: findings of severity ``error`` so far (``--check``)
        self.error_findings = 0
        #: every finding so far
        self.findings: list[Finding] = []
        #: (session, seq, request name) of the reply the tracer turned into a NACK (``nack`` option)
        self.injected_nack: tuple[int, int, str] | None = None
        self._checker = SpecChecker(self._on_finding) if self.options.check else None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(listen_path)
            self.listener.listen(16)
        except BaseException:
            self.listener.close()
            self._poller.close()
            raise
        self._register(self.listener, self._accept)

    # ------------------------------------------------------------ public
    def serve(self) -> None:
        """Relay until :meth:`stop` (or ``max_sessions`` sessions ended)."""
        self._emit(TraceEvent("listen", text=f"listening on {self.listen_path}, back-end {self.backend_path}"))
        try:
            while not self._stop.is_set():
                for token, _events in self._poller.wait(0.5):
                    handler = self._tokens.get(token)
                    if handler is not None:
                        handler()
                if self._drop.is_set():
                    self._drop.clear()
                    for s in list(self._active.values()):
                        self._emit(TraceEvent("close", text="the tracer closes the session (back-end closing "
                                              "mid-session)"), s.state)
                        self._close_session(s)
                if self.options.max_sessions is not None and self._ended >= self.options.max_sessions:
                    break
        finally:
            self._shutdown()

    def start(self) -> TraceProxy:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.serve, name="vhostuser-trace", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close every session (the thread is joined)."""
        self._stop.set()
        if self._thread is not None:
            if not self._poller.closed:
                try:
                    self._poller.wake()
                except (OSError, ValueError):
                    pass
            self._thread.join(timeout)
            self._thread = None

    def drop_sessions(self) -> None:
        """Close every open session at once, as a back-end that goes away would (thread-safe)."""
        self._drop.set()
        if not self._poller.closed:
            self._poller.wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the serving thread to end (``max_sessions``); True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> TraceProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------- plumbing
    def _register(self, sock: socket.socket, handler: Callable[[], None]) -> None:
        token = self._next_token
        self._next_token += 1
        self._tokens[token] = handler
        self._poller.register(sock, token)

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self._poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def _emit(self, ev: TraceEvent, session: SessionState | None = None) -> TraceEvent:
        self._seq += 1
        now = time.monotonic()
        ev.seq = self._seq
        ev.t = round(now - self.t0, 6)
        ev.ts = round(time.time(), 6)
        if session is not None:
            ev.session = session.number
        try:
            self.sink(ev)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the relay
            log.exception("trace sink failed")
        return ev

    def _on_finding(self, f: Finding, st: SessionState) -> None:
        self.findings.append(f)
        if f.severity == "error":
            self.error_findings += 1
        self._deferred.append(TraceEvent("finding", who=f.who, rule=f.rule.id, section=f.rule.section,
                                         severity=f.rule.severity, text=f.message, about=f.about,
                                         session=st.number))

    def _flush_findings(self, st: SessionState) -> None:
        deferred, self._deferred = self._deferred, []
        for ev in deferred:
            self._emit(ev, st)

    def _connect_backend(self) -> socket.socket:
        deadline = time.monotonic() + self.options.connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.backend_path)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN) or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)  # the back-end is not listening yet: nothing to wait on

    # --------------------------------------------------------- sessions
    def _accept(self) -> None:
        try:
            front, _ = self.listener.accept()
        except OSError:
            return
        number = len(self.sessions) + 1
        state = SessionState(number, time.monotonic(), device=self.options.device,
                             map_memory=self.options.map_memory or self.options.check or self.options.rings)
        self.sessions.append(state)
        self._emit(TraceEvent("connect", text="front-end connected"), state)
        try:
            back = self._connect_backend()
        except OSError as exc:
            self._emit(TraceEvent("error", text=f"cannot connect to the back-end {self.backend_path}: {exc}"), state)
            front.close()
            state.ended = time.monotonic()
            self._ended += 1
            return
        self._emit(TraceEvent("connect", text="connected to the back-end"), state)
        s = _Session(state, front, back)
        if self.options.rings:
            s.rings = RingView(state, lambda ev: self._emit(ev, state), self._register, self._unregister)
        self._active[number] = s
        self._add_direction(s, "main", "F->B", front, back, Decoder(FrontendReq))
        self._add_direction(s, "main", "B->F", back, front, Decoder(FrontendReq, replies=True))

    def _add_direction(self, s: _Session, channel: str, direction: str, src: socket.socket, dst: socket.socket,
                       decoder: Decoder) -> None:
        d = _Direction(s, channel, direction, src, dst, decoder)
        s.directions.append(d)
        self._register(src, lambda: self._readable(d))

    def _readable(self, d: _Direction) -> None:
        s = d.session
        if s.closed:
            return
        try:
            data, fds = recv_with_fds(d.src, d.bytes_needed, MAX_FDS)
        except OSError as exc:
            data, fds = b"", []
            self._emit(TraceEvent("error", channel=d.channel, dir=d.dir, text=f"receive failed: {exc}"), s.state)
        if not data:
            close_fds(fds)
            self._eof(d)
            return
        for raw, msg_fds in d.take(data, fds):
            try:
                self._relay(d, raw, msg_fds)
            except OSError as exc:
                self._emit(TraceEvent("error", channel=d.channel, dir=d.dir, text=f"forwarding failed: {exc}"),
                           s.state)
                self._close_session(s)
                return
            if s.closed:
                return

    def _eof(self, d: _Direction) -> None:
        s = d.session
        self._emit(TraceEvent("eof", channel=d.channel, dir=d.dir,
                              text=("front-end" if d.dir == "F->B" else "back-end") + " closed"), s.state)
        if d.channel == "main":
            self._close_session(s)
            return
        # the back-end channel: close both of its sockets, the session goes on
        for other in [x for x in s.directions if x.channel == "backend"]:
            self._unregister(other.src)
            other.close()
            s.directions.remove(other)
        for sock in s.channel_socks:
            sock.close()
        s.channel_socks.clear()

    def _close_session(self, s: _Session) -> None:
        if s.closed:
            return
        s.closed = True
        st = s.state
        for d in s.directions:
            self._unregister(d.src)
            d.close()
        for sock in (s.front, s.back, *s.channel_socks):
            sock.close()
        if s.rings is not None:
            st.ring_notifications = s.rings.stats()
            s.rings.close()
        st.ended = time.monotonic()
        if self._checker is not None:
            self._checker.end(st)
            self._flush_findings(st)
        st.close_memory()
        self._emit(TraceEvent("close", text="session closed"), st)
        self._emit(TraceEvent("summary", data=st.summary()), st)
        self._active.pop(st.number, None)
        self._ended += 1

    def _shutdown(self) -> None:
        for s in list(self._active.values()):
            self._close_session(s)
        self._unregister(self.listener)
        self.listener.close()
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass
        self._poller.close()

    # ------------------------------------------------------- messages
    def _relay(self, d: _Direction, raw: bytes, fds: list[int]) -> None:
        s = d.session
        st = s.state
        info = [describe_fd(fd) for fd in fds]
        header = Header.unpack(raw[:HEADER_SIZE]) if len(raw) >= HEADER_SIZE else None
        ev = TraceEvent("reply" if header is not None and header.is_reply else "request", channel=d.channel,
                        dir=d.dir, fds=[_fd_json(i) for i in info] or None)
        if header is not None:
            ev.code, ev.flags, ev.size = header.request, header.flags, header.size
            ev.flag_names = flag_names(header.flags)
            ev.request = _request_name(d.decoder, header.request)
        msg = self._decode(d, raw, fds, ev) if header is not None and not d.raw else None
        forward = fds
        substitute: list[Any] = []
        try:
            if msg is not None:
                forward = self._observe(d, msg, ev, info, fds, substitute)
                raw = self._maybe_nack(d, msg, raw, ev)
            self._send(d.dst, raw, forward)
        finally:
            close_fds(fds)
            for sock in substitute:
                sock.close()
            if msg is not None:
                msg.close_fds()
        self._emit(ev, st)
        self._flush_findings(st)

    def _decode(self, d: _Direction, raw: bytes, fds: list[int], ev: TraceEvent) -> Message | None:
        st = d.session.state
        who = "frontend" if d.dir == "F->B" else "backend"
        try:
            d.decoder.receive_data(raw, [os.dup(fd) for fd in fds])
            result = d.decoder.next_message()
        except MessageFramingError as exc:
            d.decoder = Decoder(d.decoder.request_type, replies=d.decoder.replies)
            self._decode_error(st, who, ev, str(exc))
            return None
        except RemoteProtocolError as exc:
            self._decode_error(st, who, ev, str(exc))
            return None
        if result is NEED_DATA or result is EOF or not isinstance(result, Message):
            self._decode_error(st, who, ev, "incomplete message")
            return None
        return result

    def _decode_error(self, st: SessionState, who: str, ev: TraceEvent, text: str) -> None:
        ev.error = text
        st.errors.append(text)
        if self._checker is not None:
            self._checker.decode_error(st, who, text, self._seq + 1)

    def _observe(self, d: _Direction, msg: Message, ev: TraceEvent, info: list[FdInfo], fds: list[int],
                 substitute: list[Any]) -> list[int]:
        """Record a decoded message; returns the fds to forward."""
        s = d.session
        st = s.state
        now = time.monotonic()
        seq = self._seq + 1  # the seq this message's event will get
        ev.payload = payload_fields(msg.payload) or None
        ev.decoded = _decoded(msg, st.device)
        forward = fds
        pend = st.pending[d.channel]
        if not msg.is_reply:
            if d.channel == "main":
                if self._checker is not None:
                    self._checker.request(st, msg, seq, info)
                st.apply_request(msg, now, info)
                if msg.request is FrontendReq.SET_BACKEND_REQ_FD and len(fds) == 1:
                    forward = self._interpose_channel(s, fds[0], substitute)
                elif s.rings is not None and msg.request in _NOTIFY_REQS and len(fds) == 1 \
                        and isinstance(msg.payload, U64):
                    forward = self._interpose_notifier(s.rings, msg.request, msg.payload.value & 0xFF, fds[0],
                                                       substitute)
            else:
                st.counts[f"backend:{msg.request.name}"] += 1
            may, must = st.expects_reply(msg)
            if may:
                pend.append(Pending(seq, msg.request, now, must, msg.payload))
            return forward
        match = next((p for p in pend if p.request is msg.request), None)
        if d.channel == "main" and self._checker is not None:
            self._checker.reply(st, msg, seq, match)
        if match is not None:
            ev.reply_to = match.seq
            ev.latency_ms = round((now - match.t) * 1000, 3)
            # replies come in order: earlier requests still waiting were skipped
            st.pending[d.channel] = [p for p in pend if p.seq > match.seq]
        if msg.spec.reply is Reply.ACK and isinstance(msg.payload, U64):
            ev.nack = msg.payload.value != 0
        if d.channel == "main":
            st.apply_reply(msg, match)
        elif ev.nack:
            st.nacks.append(f"backend:{msg.request.name}={msg.payload.value:#x}")  # type: ignore[attr-defined]
        return forward

    def _interpose_channel(self, s: _Session, front_chan_fd: int, substitute: list[Any]) -> list[int]:
        """Relay the back-end channel: the back-end gets our socketpair end instead of the front-end's socket."""
        for sock in s.channel_socks:
            sock.close()
        s.channel_socks.clear()
        try:
            fe = socket.socket(fileno=os.dup(front_chan_fd))
        except OSError:
            return [front_chan_fd]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        substitute.append(theirs)
        s.channel_socks += [fe, ours]
        self._add_direction(s, "backend", "B->F", ours, fe, Decoder(BackendReq))
        self._add_direction(s, "backend", "F->B", fe, ours, Decoder(BackendReq, replies=True))
        return [theirs.fileno()]

    def _maybe_nack(self, d: _Direction, msg: Message, raw: bytes, ev: TraceEvent) -> bytes:
        """The ``nack`` option: turn the first success ack of that request into a failure."""
        if (not self.options.nack or self.injected_nack is not None or d.channel != "main"
                or not msg.is_reply or msg.request.name not in self.options.nack
                or msg.spec.reply is not Reply.ACK or len(raw) != HEADER_SIZE + 8):
            return raw
        self.injected_nack = (d.session.state.number, self._seq + 1, msg.request.name)
        ev.nack = True
        ev.text = "the tracer answers this request with a failure (--nack)"
        ev.payload = {"value": 1}
        return raw[:HEADER_SIZE] + struct.pack("<Q", 1)

    @staticmethod
    def _interpose_notifier(rings: RingView, request: FrontendReq | BackendReq, index: int, front_fd: int,
                            substitute: list[Any]) -> list[int]:
        """``--rings``: the back-end gets the proxy's notifier fd for this vring's kick/call."""
        try:
            if request is FrontendReq.SET_VRING_KICK:
                ours: Any = rings.interpose_kick(index, front_fd)
            else:
                ours = rings.interpose_call(index, front_fd)
        except OSError as exc:
            log.warning("cannot interpose vring %d's %s fd (%s): relayed as is", index, request.name, exc)
            return [front_fd]
        substitute.append(ours)  # closed once sent: the back-end has its own copy
        return [ours.fileno()]

    @staticmethod
    def _send(sock: socket.socket, raw: bytes, fds: list[int]) -> None:
        view = memoryview(raw)
        sent = send_with_fds(sock, [view], fds)
        while sent < len(view):
            view = view[sent:]
            sent = send_with_fds(sock, [view])


def _fd_json(info: FdInfo) -> dict[str, object]:
    d: dict[str, object] = {"kind": info.kind}
    if info.size is not None:
        d["size"] = info.size
    return d


def _request_name(decoder: Decoder, code: int) -> str:
    try:
        return decoder.request_type(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


def _decoded(msg: Message, device: str | None) -> dict[str, list[str]] | None:
    if isinstance(msg.payload, U64) and isinstance(msg.request, FrontendReq):
        if msg.request in _FEATURE_REQS:
            return {"value": feature_names(msg.payload.value, device)}
        if msg.request in _PROTOCOL_REQS:
            return {"value": protocol_feature_names(msg.payload.value)}
    return None
