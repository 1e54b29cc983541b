"""atheris harness: the sans-IO codec (:class:`vhostuser.protocol.codec.Decoder`).

One input = a byte stream from a hostile peer (after a 5-byte prefix: the
direction, which chunks carry an fd, two cut points), cut into chunks at those
points, with fds attached to some chunks.  The decoder may only return
messages, NEED_DATA/EOF or raise a :class:`~vhostuser.errors.RemoteProtocolError`;
every decoded message must encode again and decode to itself; every fd handed
to the decoder is closed by it or by us (checked with an fd count).  Any other
exception or an fd leak is a crash.

    python fuzz/codec_fuzz.py fuzz/corpus/codec -max_total_time=60
"""
from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from vhostuser.errors import RemoteProtocolError
    from vhostuser.protocol.codec import EOF, NEED_DATA, Decoder, Message, encode
    from vhostuser.protocol.message import BackendReq, FrontendReq

DIRECTIONS = [(FrontendReq, False), (FrontendReq, True), (BackendReq, False), (BackendReq, True)]
_DEVNULL = os.open(os.devnull, os.O_RDONLY)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _drain(dec: Decoder, out: list[Message]) -> bool:
    """Take every complete message; False once the stream is broken or ended."""
    while True:
        try:
            m = dec.next_message()
        except RemoteProtocolError:
            if dec.broken:
                return False
            continue
        if m is NEED_DATA:
            return True
        if m is EOF:
            return False
        out.append(m)  # type: ignore[arg-type]


def _roundtrip(m: Message, rtype: type, replies: bool) -> None:
    dec = Decoder(rtype, replies=replies)
    dec.receive_data(encode(Message(m.request, m.payload, m.flags, (-1,) * len(m.fds))), [os.dup(_DEVNULL) for _ in m.fds])
    again = dec.next_message()
    assert isinstance(again, Message), again
    assert (again.request, again.payload, again.flags, len(again.fds)) == (m.request, m.payload, m.flags, len(m.fds))
    again.close_fds()
    dec.close()


def test_one_input(data: bytes) -> None:
    # prefix: [0] direction (bits 0-1) and which chunks carry an fd (bits 4-7), [1..4] two cut points
    head = data[:5].ljust(5, b"\0")
    rtype, replies = DIRECTIONS[head[0] & 3]
    fd_chunks = head[0] >> 4
    cuts = sorted({int.from_bytes(head[1:3], "little"), int.from_bytes(head[3:5], "little")})
    stream = data[5:]
    before = _open_fds()
    dec = Decoder(rtype, replies=replies)
    msgs: list[Message] = []
    points = [0, *[c for c in cuts if 0 < c < len(stream)], len(stream)]
    alive = True
    for k, (a, b) in enumerate(zip(points, points[1:])):
        fds = [os.dup(_DEVNULL)] if fd_chunks >> (k % 4) & 1 else []
        dec.receive_data(stream[a:b], fds)
        if not (alive := _drain(dec, msgs)):
            break
    if alive:
        dec.receive_data(b"")
        _drain(dec, msgs)
    dec.close()
    for m in msgs:
        _roundtrip(m, rtype, replies)
        m.close_fds()
    assert _open_fds() == before, "fd leak"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
