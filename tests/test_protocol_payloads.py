"""Every payload type packs and unpacks to itself; bad sizes and values are typed errors."""
from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.errors import InvalidMessage, LocalProtocolError
from vhostuser.protocol import payloads as p
from vhostuser.protocol.message import MAX_MEM_TABLE_REGIONS, MAX_MSG_SIZE

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

region = st.builds(p.MemoryRegion, u64, u64, u64, u64)


@st.composite
def config(draw: st.DrawFn) -> p.Config:
    size = draw(st.integers(0, 256))
    offset = draw(st.integers(0, p.MAX_CONFIG_SIZE - size))
    return p.Config(offset, draw(st.binary(min_size=size, max_size=size)), draw(u32))


#: one strategy per payload type (also used by the codec tests)
PAYLOADS: dict[type[p.Payload], st.SearchStrategy[p.Payload]] = {
    p.Empty: st.just(p.Empty()),
    p.U64: st.builds(p.U64, u64),
    p.VringState: st.builds(p.VringState, u32, u32),
    p.VringAddr: st.builds(p.VringAddr, u32, u32, u64, u64, u64, u64),
    p.MemoryRegion: region,
    p.MemoryTable: st.builds(p.MemoryTable, st.lists(region, max_size=MAX_MEM_TABLE_REGIONS).map(tuple)),
    p.SingleMemoryRegion: st.builds(p.SingleMemoryRegion, region),
    p.Log: st.builds(p.Log, u64, u64),
    p.IotlbMsg: st.builds(p.IotlbMsg, u64, u64, u64, u8, u8),
    p.Config: config(),
    p.VringArea: st.builds(p.VringArea, u64, u64, u64),
    p.Inflight: st.builds(p.Inflight, u64, u64, u16, u16),
    p.SharedObject: st.builds(p.SharedObject, st.uuids()),
    p.DeviceStateTransfer: st.builds(p.DeviceStateTransfer, u32, u32),
    p.ShmemConfig: st.builds(p.ShmemConfig, st.lists(u64, max_size=p.MAX_SHMEM_REGIONS).map(tuple)),
    p.ShmemMap: st.builds(p.ShmemMap, u8, u64, u64, u64, u64),
    p.Opaque: st.builds(p.Opaque, st.binary(max_size=MAX_MSG_SIZE)),
}


def test_every_payload_type_has_a_strategy() -> None:
    assert set(PAYLOADS) == set(p.payload_types())


@pytest.mark.parametrize("ptype", list(PAYLOADS), ids=lambda t: t.__name__)
@given(data=st.data())
def test_round_trip(ptype: type[p.Payload], data: st.DataObject) -> None:
    value = data.draw(PAYLOADS[ptype])
    wire = value.pack()
    assert ptype.fits(len(wire))
    if ptype.SIZE is not None:
        assert len(wire) == ptype.SIZE
    assert ptype.unpack(wire) == value


def test_wire_layouts_match_the_spec() -> None:
    assert p.VringAddr(1, 0, 0x10, 0x20, 0x30, 0x40).pack() == struct.pack("=IIQQQQ", 1, 0, 0x10, 0x20, 0x30, 0x40)
    table = p.MemoryTable((p.MemoryRegion(0, 0xA0000, 0x7F00, 0), p.MemoryRegion(0xC0000, 0x1000, 0x8000, 0xC0000)))
    assert len(table.pack()) == 72  # 2 regions, as in the QEMU 7.2 trace
    assert p.SingleMemoryRegion(p.MemoryRegion(1, 2, 3, 4)).pack() == bytes(8) + struct.pack("=QQQQ", 1, 2, 3, 4)
    assert len(p.Config(0, bytes(57)).pack()) == 69  # GET_CONFIG of virtio-blk, as in the trace
    assert len(p.Inflight(1, 2, 3, 4).pack()) == 24
    assert len(p.IotlbMsg().pack()) == 32
    assert len(p.ShmemConfig((1, 0, 2)).pack()) == 8 + 8 * 256
    assert p.ShmemConfig((1, 0, 2)).nregions == 2
    assert p.ShmemMap(3, 1, 2, 3, 1).pack()[:8] == b"\x03" + bytes(7)
    u = uuid.UUID("12345678-9abc-def0-1122-334455667788")
    assert p.SharedObject(u).pack() == bytes.fromhex("123456789abcdef01122334455667788")


@pytest.mark.parametrize("ptype", [t for t in PAYLOADS if t.SIZE is not None], ids=lambda t: t.__name__)
def test_wrong_size_is_remote_error(ptype: type[p.Payload]) -> None:
    with pytest.raises(InvalidMessage):
        ptype.unpack(bytes(ptype.SIZE + 1))  # type: ignore[operator]


def test_memory_table_validation() -> None:
    with pytest.raises(LocalProtocolError):
        p.MemoryTable(tuple(p.MemoryRegion() for _ in range(MAX_MEM_TABLE_REGIONS + 1)))
    with pytest.raises(InvalidMessage, match="at most 8"):
        p.MemoryTable.unpack(struct.pack("=II", 9, 0) + bytes(9 * 32))
    with pytest.raises(InvalidMessage, match="carries"):
        p.MemoryTable.unpack(struct.pack("=II", 2, 0) + bytes(32))


def test_config_size_mismatch() -> None:
    with pytest.raises(InvalidMessage, match="does not match"):
        p.Config.unpack(struct.pack("=III", 0, 10, 0) + bytes(4))
    with pytest.raises(LocalProtocolError):
        p.Config(p.MAX_CONFIG_SIZE, b"x")


def test_field_ranges_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        p.U64(-1)
    with pytest.raises(LocalProtocolError):
        p.VringState(2**32, 0)
    with pytest.raises(LocalProtocolError):
        p.vring_fd_u64(256, True)
    assert p.vring_fd_u64(3, False).value == 0x103
