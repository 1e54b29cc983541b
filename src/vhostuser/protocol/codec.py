"""Sans-IO vhost-user codec: :class:`Decoder` (bytes + fds in, typed messages out)
and :func:`encode` (typed message out to bytes).

The model is h11: you feed the decoder whatever the socket gave you, in any
split, and ask it for the next message::

    dec = Decoder(FrontendReq)                # back-end side: requests from the front-end
    dec.receive_data(data, fds)               # fds that arrived with these bytes
    msg = dec.next_message()                  # a Message, NEED_DATA, or EOF

vhost-user senders attach fds to the first bytes of a message, so fds that arrive
with a chunk belong to the first message that starts inside that chunk (or, if
none starts there, to the message in progress).

All validation of the wire format happens here, against the table in
:mod:`.requests`.  Errors are typed (see :mod:`vhostuser.errors`); the fds of a
rejected message are closed before the error is raised.  Errors raised by the
decoder carry ``exc.header`` (the :class:`Header`) when the header was readable.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import (
    FdCountError,
    InvalidMessage,
    LocalProtocolError,
    MessageFramingError,
    RemoteProtocolError,
    UnknownRequest,
)
from .message import HEADER_SIZE, MAX_MSG_SIZE, VERSION, VERSION_MASK, BackendReq, FrontendReq, VhostUserHeaderFlag
from .payloads import U64, Empty, Payload
from .requests import NO_FDS as NO_FDS_RULE
from .requests import Reply, RequestSpec, spec_for

__all__ = ["Header", "Message", "Decoder", "encode", "NEED_DATA", "EOF", "close_fds"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("=III")
_KNOWN_FLAGS = int(VERSION_MASK | VhostUserHeaderFlag.REPLY | VhostUserHeaderFlag.NEED_REPLY)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: :meth:`Decoder.next_message` needs more bytes.
NEED_DATA = _Sentinel("NEED_DATA")
#: :meth:`Decoder.next_message`: the peer closed the stream cleanly between messages.
EOF = _Sentinel("EOF")


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd in ``fds``, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(frozen=True)
class Header:
    """The 12-byte message header."""

    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        """Wire bytes."""
        return _HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse 12 wire bytes."""
        return cls(*_HEADER.unpack(data))

    @property
    def need_reply(self) -> bool:
        """NEED_REPLY is set."""
        return bool(self.flags & VhostUserHeaderFlag.NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        """REPLY is set."""
        return bool(self.flags & VhostUserHeaderFlag.REPLY)


@dataclass(frozen=True)
class Message:
    """One vhost-user message: a request (or a reply to it), its typed payload and fds.

    Whoever holds a received ``Message`` owns its fds (see :meth:`close_fds`).
    """

    request: FrontendReq | BackendReq
    payload: Payload = field(default_factory=Empty)
    flags: int = VERSION
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        """This is a reply (REPLY flag)."""
        return bool(self.flags & VhostUserHeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        """The sender asked for a REPLY_ACK (NEED_REPLY flag)."""
        return bool(self.flags & VhostUserHeaderFlag.NEED_REPLY)

    @property
    def spec(self) -> RequestSpec:
        """The table entry of this message's request."""
        return spec_for(self.request)

    def close_fds(self) -> None:
        """Close the fds this message carries."""
        close_fds(self.fds)

    def header(self, size: int) -> Header:
        """The header for a payload of ``size`` bytes."""
        return Header(int(self.request), self.flags, size)


def _payload_types(spec: RequestSpec, is_reply: bool) -> tuple[type[Payload], ...]:
    if not is_reply:
        return (spec.payload,)
    if spec.reply is Reply.ALWAYS:
        return spec.reply_payloads
    return (U64,)


def encode(msg: Message) -> bytes:
    """The wire bytes of ``msg`` (its fds are sent alongside by the caller).

    Raises :class:`LocalProtocolError` if ``msg`` breaks the protocol: a payload
    type or fd count the table does not allow, a payload over 4 KiB, a bad flag.
    """
    spec = spec_for(msg.request)
    if msg.flags & ~_KNOWN_FLAGS or msg.flags & VERSION_MASK != VERSION:
        raise LocalProtocolError(f"{spec.name}: invalid header flags {msg.flags:#x}", request=msg.request)
    allowed = _payload_types(spec, msg.is_reply)
    if not isinstance(msg.payload, allowed):
        what = "reply" if msg.is_reply else "request"
        raise LocalProtocolError(
            f"{spec.name} {what}: payload {type(msg.payload).__name__} is not one of "
            f"{', '.join(t.__name__ for t in allowed)}", request=msg.request)
    rule = spec.reply_fds if msg.is_reply and spec.reply is Reply.ALWAYS else (NO_FDS_RULE if msg.is_reply else spec.fds)
    problem = rule.check(msg.payload, len(msg.fds))
    if problem:
        raise LocalProtocolError(f"{spec.name}: expected {problem}", request=msg.request)
    body = msg.payload.pack()
    if len(body) > MAX_MSG_SIZE:
        raise LocalProtocolError(f"{spec.name}: payload of {len(body)} bytes exceeds {MAX_MSG_SIZE}", request=msg.request)
    return msg.header(len(body)).pack() + body


@dataclass
class _FdBatch:
    start: int  # stream offset of the chunk the fds came with
    end: int
    fds: list[int]


class Decoder:
    """Incremental decoder of one direction of a vhost-user stream.

    ``request_type`` is :class:`FrontendReq` on the main socket and
    :class:`BackendReq` on the back-end channel.  ``replies`` says whether this
    side receives replies (a front-end on the main socket, a back-end on its
    channel) or requests.

    A well-framed but invalid message (unknown code, bad payload, wrong fd count)
    raises and is skipped: the decoder stays usable.  A framing error
    (:class:`MessageFramingError`) leaves it broken; every later call raises again.
    """

    def __init__(self, request_type: type[FrontendReq] | type[BackendReq] = FrontendReq, *, replies: bool = False):
        self.request_type = request_type
        self.replies = replies
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._batches: list[_FdBatch] = []
        self._eof = False
        self._error: MessageFramingError | None = None
        self._header: Header | None = None

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed bytes (and the fds received with them).  ``b""`` means EOF.

        The decoder owns ``fds`` from now on.
        """
        if self._eof or self._error is not None:
            close_fds(fds)
            if data:
                raise MessageFramingError("data received after EOF or a framing error")
            return
        if not data:
            self._eof = True
            close_fds(fds)
            return
        start = self._pos + len(self._buf)
        self._buf += data
        if fds:
            self._batches.append(_FdBatch(start, start + len(data), list(fds)))

    @property
    def bytes_needed(self) -> int:
        """How many more bytes complete the current header or message (at least 1)."""
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        size = _HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER_SIZE + min(size, MAX_MSG_SIZE) - len(self._buf))

    @property
    def broken(self) -> bool:
        """A framing error happened; the stream cannot be decoded any further."""
        return self._error is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered but not yet returned as a message."""
        return len(self._buf)

    def close(self) -> None:
        """Close every fd still held (call when the connection goes away)."""
        for b in self._batches:
            close_fds(b.fds)
        self._batches.clear()
        self._buf.clear()

    # ----------------------------------------------------------------- output
    def next_message(self) -> Message | _Sentinel:
        """The next complete message, :data:`NEED_DATA` or :data:`EOF`.

        Raises a :class:`RemoteProtocolError` subclass for an invalid message.
        """
        if self._error is not None:
            raise self._error
        if len(self._buf) < HEADER_SIZE:
            if self._eof:
                if self._buf:
                    self._fail(f"EOF inside a message header ({len(self._buf)} bytes)")
                self.close()
                return EOF
            return NEED_DATA
        header = Header.unpack(bytes(self._buf[:HEADER_SIZE]))
        self._check_header(header)
        end = HEADER_SIZE + header.size
        if len(self._buf) < end:
            if self._eof:
                self._fail(f"EOF inside a message body ({len(self._buf) - HEADER_SIZE} of {header.size} bytes)", header)
            return NEED_DATA
        body = bytes(self._buf[HEADER_SIZE:end])
        fds = self._take_fds(self._pos, self._pos + end)
        del self._buf[:end]
        self._pos += end
        return self._decode(header, body, fds)

    # -------------------------------------------------------------- internals
    def _fail(self, text: str, header: Header | None = None) -> None:
        err = MessageFramingError(text)
        err.header = header  # type: ignore[attr-defined]
        self._error = err
        self.close()
        log.warning("vhost-user framing error: %s", text)
        raise err

    def _check_header(self, header: Header) -> None:
        if header.flags & VERSION_MASK != VERSION:
            self._fail(f"unsupported protocol version {header.flags & VERSION_MASK} (flags {header.flags:#x})", header)
        if header.flags & ~_KNOWN_FLAGS:
            self._fail(f"reserved header flag bits set (flags {header.flags:#x})", header)
        if header.size > MAX_MSG_SIZE:
            self._fail(f"message size {header.size} exceeds the {MAX_MSG_SIZE}-byte limit", header)

    def _take_fds(self, start: int, end: int) -> list[int]:
        """fds belonging to the message occupying stream bytes [start, end)."""
        taken: list[int] = []
        keep: list[_FdBatch] = []
        for b in self._batches:
            if b.start >= end:
                keep.append(b)
            elif b.start <= start or b.end <= end:
                taken += b.fds  # the chunk starts this message, or lies within it
            else:
                b.start = end  # the chunk also starts the next message: its fds go there
                keep.append(b)
        self._batches = keep
        return taken

    def _decode(self, header: Header, body: bytes, fds: list[int]) -> Message:
        try:
            return self._decode_or_raise(header, body, fds)
        except RemoteProtocolError as exc:
            close_fds(fds)
            exc.header = header  # type: ignore[attr-defined]
            raise

    def _decode_or_raise(self, header: Header, body: bytes, fds: list[int]) -> Message:
        try:
            request = self.request_type(header.request)
        except ValueError:
            raise UnknownRequest(
                f"unknown {self.request_type.__name__} request code {header.request}") from None
        spec = spec_for(request)
        name = f"{request.name}{' reply' if self.replies else ''}"
        if header.is_reply != self.replies:
            raise InvalidMessage(
                f"{request.name}: {'a reply was expected' if self.replies else 'unexpected REPLY flag on a request'}",
                request=request)
        types = _payload_types(spec, self.replies)
        ptype = next((t for t in types if t.fits(header.size)), None)
        if ptype is None:
            raise InvalidMessage(
                f"{name}: payload size {header.size} does not fit {' or '.join(t.__name__ for t in types)}",
                request=request)
        try:
            payload = ptype.unpack(body)
        except InvalidMessage as exc:
            raise InvalidMessage(f"{name}: {exc}", request=request) from None
        rule = spec.reply_fds if self.replies and spec.reply is Reply.ALWAYS else (
            NO_FDS_RULE if self.replies else spec.fds)
        problem = rule.check(payload, len(fds))
        if problem:
            raise FdCountError(f"{name}: expected {problem}", request=request)
        return Message(request, payload, header.flags, tuple(fds))
