"""The sans-IO decoder/encoder: any split gives the same messages; invalid input
gives typed errors only, closes the rejected message's fds, never leaks."""
from __future__ import annotations

import os
import struct

import pytest
from conftest import check_no_fd_leak, fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol_payloads import PAYLOADS

from vhostuser.errors import (
    FdCountError,
    InvalidMessage,
    LocalProtocolError,
    MessageFramingError,
    ProtocolError,
    UnknownRequest,
)
from vhostuser.protocol import payloads as p
from vhostuser.protocol.codec import EOF, NEED_DATA, Decoder, Header, Message, encode
from vhostuser.protocol.message import BackendReq, FrontendReq, VhostUserHeaderFlag
from vhostuser.protocol.requests import BACKEND_REQUESTS, FRONTEND_REQUESTS, Reply

REPLY = 0x1 | VhostUserHeaderFlag.REPLY


@pytest.fixture(scope="module")
def fd_source():
    r, w = os.pipe()
    yield r
    os.close(r)
    os.close(w)


@st.composite
def request_message(draw: st.DrawFn, table=FRONTEND_REQUESTS) -> tuple[Message, int]:
    """A valid request (with placeholder fds -1) and its fd count."""
    spec = draw(st.sampled_from(list(table.values())))
    payload = draw(PAYLOADS[spec.payload])
    lo, hi = spec.fds.allowed(payload)
    nfds = draw(st.integers(lo, hi))
    flags = 0x1 | draw(st.sampled_from([0, VhostUserHeaderFlag.NEED_REPLY]))
    return Message(spec.request, payload, flags, (-1,) * nfds), nfds


def with_real_fds(msgs: list[Message], source: int) -> list[Message]:
    return [Message(m.request, m.payload, m.flags, tuple(os.dup(source) for _ in m.fds)) for m in msgs]


def decode_chunks(chunks: list[tuple[bytes, list[int]]], dec: Decoder | None = None) -> list[Message]:
    dec = dec or Decoder(FrontendReq)
    out = []
    for data, fds in chunks:
        dec.receive_data(data, fds)
        while (m := dec.next_message()) is not NEED_DATA:
            out.append(m)
    dec.receive_data(b"")
    assert dec.next_message() is EOF
    return out


def chunk_stream(msgs: list[Message], cuts: set[int]) -> list[tuple[bytes, list[int]]]:
    """Split the encoded stream at ``cuts`` plus every message start; fds ride with the start."""
    stream = b""
    fd_at: dict[int, list[int]] = {}
    for m in msgs:
        fd_at[len(stream)] = list(m.fds)
        stream += encode(m)
    points = sorted({0, len(stream)} | {c for c in cuts if 0 < c < len(stream)} | {k for k, v in fd_at.items() if v})
    return [(stream[a:b], fd_at.get(a, [])) for a, b in zip(points, points[1:])]


def close_all(msgs: list[Message]) -> None:
    for m in msgs:
        m.close_fds()


@settings(max_examples=fuzz_examples(150), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(request_message(), min_size=1, max_size=6), cuts=st.sets(st.integers(0, 3000), max_size=20))
def test_any_split_gives_the_same_messages(fd_source, data, cuts) -> None:
    msgs = with_real_fds([m for m, _ in data], fd_source)
    try:
        whole = decode_chunks(chunk_stream(msgs, set()))
        split = decode_chunks(chunk_stream(msgs, cuts))
        assert whole == msgs
        assert split == msgs
    finally:
        close_all(msgs)


@settings(max_examples=fuzz_examples(30), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(request_message(), min_size=1, max_size=3))
def test_byte_by_byte_and_header_body_apart(fd_source, data) -> None:
    msgs = with_real_fds([m for m, _ in data], fd_source)
    try:
        stream_len = sum(len(encode(m)) for m in msgs)
        assert decode_chunks(chunk_stream(msgs, set(range(stream_len)))) == msgs
        cuts, pos = set(), 0
        for m in msgs:
            cuts.add(pos + 12)
            pos += len(encode(m))
        assert decode_chunks(chunk_stream(msgs, cuts)) == msgs
    finally:
        close_all(msgs)


@settings(max_examples=fuzz_examples(60))
@given(data=st.lists(request_message(BACKEND_REQUESTS), min_size=1, max_size=4), cuts=st.sets(st.integers(0, 500)))
def test_backend_requests_split(data, cuts) -> None:
    r, w = os.pipe()
    try:
        msgs = with_real_fds([m for m, _ in data], r)
        assert decode_chunks(chunk_stream(msgs, cuts), Decoder(BackendReq)) == msgs
        close_all(msgs)
    finally:
        os.close(r)
        os.close(w)


def _drain(dec: Decoder) -> list[Message]:
    """Pull messages until NEED_DATA/EOF/fatal error; non-fatal errors are skipped."""
    got = []
    while True:
        try:
            m = dec.next_message()
        except MessageFramingError:
            return got
        except ProtocolError as exc:
            assert not getattr(exc, "fatal", False)
            continue
        if m is NEED_DATA or m is EOF:
            return got
        got.append(m)


@settings(max_examples=fuzz_examples(300))
@given(chunks=st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 3)), max_size=8),
       replies=st.booleans(), backend=st.booleans())
def test_random_bytes_only_protocol_errors_and_no_leak(chunks, replies, backend) -> None:
    with check_no_fd_leak():
        dec = Decoder(BackendReq if backend else FrontendReq, replies=replies)
        got: list[Message] = []
        for data, nfds in chunks:
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)] if data else []
            try:
                dec.receive_data(data, fds)
            except MessageFramingError:
                pass
            got += _drain(dec)
        dec.receive_data(b"")
        got += _drain(dec)
        dec.close()
        close_all(got)


@settings(max_examples=fuzz_examples(100), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(request_message(), min_size=1, max_size=4), cut=st.integers(0, 2000))
def test_truncated_stream(fd_source, data, cut) -> None:
    with check_no_fd_leak():
        msgs = with_real_fds([m for m, _ in data], fd_source)
        chunks = chunk_stream(msgs, set())
        stream = b"".join(c for c, _ in chunks)
        cut = min(cut, len(stream))
        dec = Decoder(FrontendReq)
        got, fed = [], set()
        for i, (chunk, fds) in enumerate(chunks):
            start = sum(len(c) for c, _ in chunks[:i])
            if start >= cut:
                break
            dec.receive_data(chunk[: cut - start], fds)
            fed.update(fds)
        dec.receive_data(b"")
        try:
            while (m := dec.next_message()) is not EOF:
                got.append(m)
        except MessageFramingError:
            assert 0 < cut < len(stream)
        assert got == msgs[: len(got)]
        close_all(got)
        dec.close()
        # the decoder closed the fds it was given but did not hand out; the rest are ours
        for m in msgs[len(got):]:
            for fd in m.fds:
                if fd not in fed:
                    os.close(fd)


# ------------------------------------------------------------------ validation
def raw(request: int, flags: int, body: bytes, size: int | None = None) -> bytes:
    return Header(request, flags, len(body) if size is None else size).pack() + body


def feed(dec: Decoder, data: bytes, nfds: int = 0) -> list[int]:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    dec.receive_data(data, fds)
    return fds


def assert_closed(fds: list[int]) -> None:
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


GOOD = encode(Message(FrontendReq.SET_VRING_NUM, p.VringState(0, 256)))


@pytest.mark.parametrize("data, nfds, error, fatal", [
    (raw(1, 0x2, b""), 0, MessageFramingError, True),                                # version 2
    (raw(1, 0x1 | 0x10, b""), 0, MessageFramingError, True),                         # reserved flag bit
    (raw(5, 0x1, b"", size=0x1001), 1, MessageFramingError, True),                   # over 4 KiB
    (raw(99, 0x1, bytes(8)), 1, UnknownRequest, False),                              # unknown code
    (raw(0, 0x1, b""), 0, UnknownRequest, False),                                    # code 0
    (raw(2, 0x1, bytes(4)), 0, InvalidMessage, False),                               # SET_FEATURES, 4 bytes
    (raw(9, 0x1, bytes(8)), 0, InvalidMessage, False),                               # SET_VRING_ADDR too short
    (raw(5, 0x1, struct.pack("=II", 9, 0) + bytes(9 * 32)), 9, InvalidMessage, False),  # 9 regions
    (raw(5, 0x1, struct.pack("=II", 2, 0) + bytes(64)), 1, FdCountError, False),     # 2 regions, 1 fd
    (raw(12, 0x1, struct.pack("=Q", 0)), 0, FdCountError, False),                    # KICK without fd or NOFD
    (raw(12, 0x1, struct.pack("=Q", 0x100)), 1, FdCountError, False),                # NOFD but an fd
    (raw(3, 0x1, b""), 2, FdCountError, False),                                      # SET_OWNER with fds
    (raw(24, 0x1, struct.pack("=III", 0, 57, 0) + bytes(8)), 0, InvalidMessage, False),  # config size mismatch
    (raw(8, REPLY, bytes(8)), 0, InvalidMessage, False),                             # REPLY flag on a request
])
def test_rejections(no_fd_leak, data, nfds, error, fatal) -> None:
    dec = Decoder(FrontendReq)
    fds = feed(dec, data, nfds)
    with pytest.raises(error) as info:
        dec.next_message()
    assert info.value.fatal is fatal
    assert_closed(fds)
    if fatal:
        assert dec.broken
        with pytest.raises(MessageFramingError):
            dec.next_message()
    else:
        assert info.value.header.request == struct.unpack_from("=I", data)[0]
        dec.receive_data(GOOD)
        assert dec.next_message() == Message(FrontendReq.SET_VRING_NUM, p.VringState(0, 256))
    dec.close()


def test_eof_mid_message_is_framing_error(no_fd_leak) -> None:
    dec = Decoder(FrontendReq)
    fds = feed(dec, GOOD[:15], 1)
    dec.receive_data(b"")
    with pytest.raises(MessageFramingError):
        dec.next_message()
    assert_closed(fds)


def test_fds_arriving_with_header_attach_to_that_message(no_fd_leak) -> None:
    kick = encode(Message(FrontendReq.SET_VRING_KICK, p.vring_fd_u64(0, True), fds=(0,)))
    dec = Decoder(FrontendReq)
    dec.receive_data(GOOD[:5])
    fds = feed(dec, GOOD[5:] + kick[:3], 1)  # a chunk that ends one message and starts the next
    assert dec.next_message() == Message(FrontendReq.SET_VRING_NUM, p.VringState(0, 256))
    assert dec.next_message() is NEED_DATA
    dec.receive_data(kick[3:])
    m = dec.next_message()
    assert m.request is FrontendReq.SET_VRING_KICK and m.fds == tuple(fds)
    m.close_fds()


def test_replies() -> None:
    dec = Decoder(FrontendReq, replies=True)
    dec.receive_data(raw(24, REPLY, b""))  # an empty GET_CONFIG reply = failure
    assert dec.next_message().payload == p.Empty()
    dec.receive_data(raw(24, REPLY, p.Config(0, b"abcd").pack()))
    assert dec.next_message().payload == p.Config(0, b"abcd")
    dec.receive_data(raw(6, REPLY, bytes(8)) + raw(6, REPLY, bytes(16)))  # SET_LOG_BASE: u64 or log
    assert dec.next_message().payload == p.U64(0)
    assert dec.next_message().payload == p.Log(0, 0)
    dec.receive_data(raw(8, REPLY, bytes(8)))  # an ack for an ACK-type request
    assert dec.next_message() == Message(FrontendReq.SET_VRING_NUM, p.U64(0), REPLY)
    dec.receive_data(raw(8, 0x1, bytes(8)))  # not a reply
    with pytest.raises(InvalidMessage):
        dec.next_message()


def test_encode_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Message(FrontendReq.SET_FEATURES, p.VringState(0, 0)))
    with pytest.raises(LocalProtocolError):
        encode(Message(FrontendReq.SET_VRING_CALL, p.vring_fd_u64(0, True)))  # fd missing
    with pytest.raises(LocalProtocolError):
        encode(Message(FrontendReq.SET_OWNER, p.Empty(), 0x3))
    with pytest.raises(LocalProtocolError):
        encode(Message(FrontendReq.GET_FEATURES, p.VringState(), REPLY))


def test_table_is_complete() -> None:
    assert [int(r) for r in FRONTEND_REQUESTS] == list(range(1, 45))
    assert [int(r) for r in BACKEND_REQUESTS] == list(range(1, 11))
    always = {r.name for r, s in FRONTEND_REQUESTS.items() if s.reply is Reply.ALWAYS}
    assert {"GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_VRING_BASE", "SET_LOG_BASE", "GET_INFLIGHT_FD"} <= always
    assert FrontendReq.SET_SLAVE_REQ_FD is FrontendReq.SET_BACKEND_REQ_FD
