"""The virtio-vsock packet header codec."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.devices.vsock.engine import parse_connect_line
from vhostuser.devices.vsock.packet import HDR_SIZE, Op, SockType, VsockHeader, parse_packet
from vhostuser.errors import VsockPacketError

u16, u32, u64 = (st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))

headers = st.builds(VsockHeader, src_cid=u64, dst_cid=u64, src_port=u32, dst_port=u32, len=u32,
                    type=u16, op=u16, flags=u32, buf_alloc=u32, fwd_cnt=u32)


@given(headers)
def test_pack_unpack_round_trip(hdr: VsockHeader) -> None:
    raw = hdr.pack()
    assert len(raw) == HDR_SIZE == 44
    assert VsockHeader.unpack(raw) == hdr
    buf = bytearray(50)
    hdr.pack_into(buf, 3)
    assert VsockHeader.unpack(memoryview(buf)[3:]) == hdr


def test_wire_layout_is_little_endian() -> None:
    hdr = VsockHeader(src_cid=3, dst_cid=2, src_port=0x1234, dst_port=80, len=5, type=SockType.STREAM,
                      op=Op.RW, flags=0, buf_alloc=65536, fwd_cnt=7)
    assert hdr.pack() == struct.pack("<QQIIIHHIII", 3, 2, 0x1234, 80, 5, 1, 5, 0, 65536, 7)


@given(st.binary(max_size=HDR_SIZE - 1))
def test_short_header_is_rejected(data: bytes) -> None:
    with pytest.raises(VsockPacketError):
        VsockHeader.unpack(data)


def test_out_of_range_field_is_a_typed_error() -> None:
    with pytest.raises(VsockPacketError):
        VsockHeader(1, 2, 2**32, 0, 0, 1, 1).pack()


def _hdr(**kw: int) -> VsockHeader:
    base = dict(src_cid=3, dst_cid=2, src_port=1, dst_port=2, len=0, type=1, op=Op.REQUEST)
    base.update(kw)
    return VsockHeader(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("hdr", [
    _hdr(op=0), _hdr(op=8), _hdr(type=3), _hdr(type=0), _hdr(op=Op.RW, len=(1 << 20) + 1),
    _hdr(op=Op.REQUEST, len=4),
])
def test_validate_rejects_bad_fields(hdr: VsockHeader) -> None:
    with pytest.raises(VsockPacketError):
        hdr.validate()


@given(st.binary(max_size=200))
def test_parse_packet_never_crashes(data: bytes) -> None:
    try:
        hdr, payload = parse_packet(data)
    except VsockPacketError:
        return
    assert len(payload) == hdr.len


def test_parse_packet_length_mismatch() -> None:
    raw = _hdr(op=Op.RW, len=10).pack() + b"abc"
    with pytest.raises(VsockPacketError, match="len=10"):
        parse_packet(raw)
    hdr, payload = parse_packet(_hdr(op=Op.RW, len=3).pack() + b"abc")
    assert payload == b"abc" and hdr.op == Op.RW


def test_reply_swaps_addresses() -> None:
    hdr = _hdr(src_port=1000, dst_port=22)
    rst = hdr.reply(Op.RST)
    assert (rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port, rst.op, rst.len) == (2, 3, 22, 1000, Op.RST, 0)


@pytest.mark.parametrize("line, port", [(b"CONNECT 1234\n", 1234), (b"connect 5\n", 5), (b"Connect  7 \r\n", 7)])
def test_connect_line(line: bytes, port: int) -> None:
    assert parse_connect_line(line) == port


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"HELLO 1\n", b"CONNECT 1 2\n",
                                  b"CONNECT 99999999999\n", b"CONNECT -1\n", b"\xff\xfe\n"])
def test_bad_connect_line(line: bytes) -> None:
    with pytest.raises(VsockPacketError):
        parse_connect_line(line)
