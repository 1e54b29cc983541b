"""Hostile rings: every malformed ring ends in a typed QueueError, the queue is
broken until reset, nothing hangs, and no access leaves guest memory."""
from __future__ import annotations

import mmap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser import errors as E
from vhostuser.memory import GuestMemory, MemoryRegion
from vhostuser.virtqueue import Queue
from vhostuser.virtqueue.defs import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT as IND,
    VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE as WRITE,
)
from vhostuser.virtqueue.driver import PackedDriver, RingDriver, SplitDriver

MEM_LAYOUT = [(0, 0x20000), (0x20000, 0x10000), (0x40000, 0x10000)]  # hole at 0x30000..0x40000
BUF = 0x10000  # a valid data address


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(MEM_LAYOUT)
    yield m
    m.close()


def split(mem: GuestMemory, size: int = 8) -> tuple[SplitDriver, Queue]:
    drv = RingDriver.create(mem, size, ring_gpa=0x1000, data_gpa=0x8000, data_size=0x8000)
    assert isinstance(drv, SplitDriver)
    return drv, drv.make_queue()


def packed(mem: GuestMemory, size: int = 8) -> tuple[PackedDriver, Queue]:
    drv = RingDriver.create(mem, size, packed=True, ring_gpa=0x1000, data_gpa=0x8000, data_size=0x8000)
    assert isinstance(drv, PackedDriver)
    return drv, drv.make_queue()


def expect_broken(q: Queue, exc: type[Exception], match: str | None = None) -> Exception:
    with pytest.raises(exc, match=match) as ei:
        q.pop_batch(8)
    assert q.broken is not None
    with pytest.raises(E.QueueBroken):
        q.pop_descriptor_chain()
    return ei.value


# ------------------------------------------------------------------ split
def test_avail_index_jump(mem) -> None:
    drv, q = split(mem)
    drv.set_avail_idx(9)
    expect_broken(q, E.InvalidAvailIndex, "avail index 9")
    assert q.next_avail == 0  # nothing consumed


def test_broken_queue_recovers_after_reset(mem) -> None:
    drv, q = split(mem)
    drv.set_avail_idx(100)
    expect_broken(q, E.InvalidAvailIndex)
    q.reset()
    q.set_size(8)
    q.set_addresses(drv.desc_gpa, drv.driver_gpa, drv.device_gpa)
    q.set_vring_base(100)
    q.set_ready(True)
    assert q.pop_batch(8) == []


def test_head_index_out_of_range(mem) -> None:
    drv, q = split(mem)
    drv.push_avail(8)
    drv.publish()
    expect_broken(q, E.InvalidDescriptorError, "head 8")


def test_next_index_out_of_range(mem) -> None:
    drv, q = split(mem)
    drv.write_desc(0, BUF, 4, NEXT, 8)
    drv.push_avail(0)
    drv.publish()
    expect_broken(q, E.InvalidDescriptorError, "next descriptor index 8")


def test_looping_chain(mem) -> None:
    drv, q = split(mem)
    drv.write_desc(0, BUF, 4, NEXT, 1)
    drv.write_desc(1, BUF, 4, NEXT, 0)
    drv.push_avail(0)
    drv.publish()
    expect_broken(q, E.DescriptorChainTooLong)


def test_chain_of_exactly_queue_size_is_fine(mem) -> None:
    drv, q = split(mem, size=4)
    for i in range(4):
        drv.write_desc(i, BUF + i, 1, NEXT if i < 3 else 0, i + 1)
    drv.push_avail(0)
    drv.publish()
    (c,) = q.pop_batch(8)
    assert len(c) == 4


def test_zero_length_descriptor(mem) -> None:
    drv, q = split(mem)
    drv.write_desc(0, BUF, 0, 0, 0)
    drv.push_avail(0)
    drv.publish()
    expect_broken(q, E.InvalidDescriptorError, "zero-length")


@pytest.mark.parametrize(
    "addr,length",
    [(0x30000, 1), (0x2FFFF, 2), (0x50000, 16), (2**64 - 8, 16), (0x60000, 0xFFFFFFFF)],
)
def test_buffer_outside_memory(mem, addr, length) -> None:
    drv, q = split(mem)
    drv.write_desc(0, addr, length, WRITE, 0)
    drv.push_avail(0)
    drv.publish()
    err = expect_broken(q, E.DescriptorAddressError)
    assert isinstance(err, E.GuestAddressError) and isinstance(err, E.InvalidDescriptorError)
    assert (err.addr, err.length) == (addr, length)


def test_buffer_straddling_adjacent_regions_is_fine(mem) -> None:
    drv, q = split(mem)
    drv.write_desc(0, 0x1FFF0, 0x20, WRITE, 0)
    drv.push_avail(0)
    drv.publish()
    (c,) = q.pop_batch(8)
    assert [len(v) for v in c.writable_views()] == [0x10, 0x10]


def test_readable_after_writable(mem) -> None:
    drv, q = split(mem)
    drv.write_desc(0, BUF, 4, WRITE | NEXT, 1)
    drv.write_desc(1, BUF, 4, 0, 0)
    drv.push_avail(0)
    drv.publish()
    expect_broken(q, E.InvalidDescriptorError, "follows a device-writable")


def test_chain_longer_than_4gib() -> None:
    big = MemoryRegion(memoryview(mmap.mmap(-1, 0x80000000 + 0x10000)), 0x100000000)
    mem = GuestMemory([MemoryRegion.anonymous(0, 0x20000), big])
    try:
        drv, q = split(mem)
        drv.write_desc(0, 0x100000000, 0x80000000, NEXT, 1)
        drv.write_desc(1, 0x100000000, 0x80000000, NEXT, 2)  # exactly 4 GiB so far: allowed
        drv.write_desc(2, 0x100000000, 1, 0, 0)
        drv.push_avail(0)
        drv.publish()
        expect_broken(q, E.DescriptorChainTooLong, "2\\*\\*32")
    finally:
        q.set_ready(False)
        mem.close()


def test_split_inflight_overrun(mem) -> None:
    drv, q = split(mem, size=4)
    for i in range(4):
        drv.write_desc(i, BUF, 4, 0, 0)
    for _ in range(4):
        drv.push_avail(0)
    drv.publish()
    assert len(q.pop_batch(8)) == 4
    for _ in range(2):  # the driver re-posts without waiting for used entries
        drv.push_avail(1)
    drv.publish()
    expect_broken(q, E.InvalidAvailIndex, "in flight")


@pytest.mark.parametrize(
    "setup,exc,match",
    [
        # nested indirect
        ("nested", E.InvalidIndirectTable, "inside an indirect table"),
        ("with_next", E.InvalidIndirectTable, "chained"),
        ("after_direct", E.InvalidIndirectTable, "chained"),
        ("len_17", E.InvalidIndirectTable, "not a multiple of 16"),
        ("len_0", E.InvalidIndirectTable, "zero or not a multiple"),
        ("too_big", E.InvalidIndirectTable, "more than the queue size"),
        ("outside", E.IndirectTableAddressError, "not inside one guest memory region"),
        ("straddle", E.IndirectTableAddressError, "not inside one"),
        ("loop_inside", E.DescriptorChainTooLong, None),
        ("bad_next_inside", E.InvalidDescriptorError, "table of 2"),
    ],
)
def test_split_bad_indirect(mem, setup, exc, match) -> None:
    drv, q = split(mem)
    table = 0x9000
    ok_entry = (BUF, 4, 0, 0)

    def entry(i: int, addr: int, ln: int, flags: int, nxt: int) -> None:
        mem.write_obj(table + 16 * i, "<QIHH", addr, ln, flags, nxt)

    head = (table, 32, IND, 0)
    if setup == "nested":
        entry(0, table, 16, IND, 0)
    elif setup == "with_next":
        head = (table, 32, IND | NEXT, 1)
        entry(0, *ok_entry)
    elif setup == "after_direct":
        drv.write_desc(0, BUF, 4, NEXT, 1)
        drv.write_desc(1, table, 16, IND, 0)
        entry(0, *ok_entry)
        head = None
    elif setup == "len_17":
        head = (table, 17, IND, 0)
    elif setup == "len_0":
        head = (table, 0, IND, 0)
    elif setup == "too_big":
        head = (table, 16 * 9, IND, 0)
    elif setup == "outside":
        head = (0x30000, 32, IND, 0)
    elif setup == "straddle":
        head = (0x20000 - 16, 32, IND, 0)
    elif setup == "loop_inside":
        entry(0, BUF, 4, NEXT, 1)
        entry(1, BUF, 4, NEXT, 0)
    elif setup == "bad_next_inside":
        entry(0, BUF, 4, NEXT, 2)
    if head is not None:
        drv.write_desc(0, *head)
    drv.push_avail(0)
    drv.publish()
    expect_broken(q, exc, match)


def test_batch_error_consumes_nothing(mem) -> None:
    drv, q = split(mem)
    drv.write_desc(0, BUF, 4, 0, 0)
    drv.write_desc(1, 0x30000, 4, 0, 0)  # bad
    drv.push_avail(0)
    drv.push_avail(1)
    drv.publish()
    with pytest.raises(E.DescriptorAddressError):
        q.pop_batch(8)
    assert q.next_avail == 0 and q.state.inflight == 0


# ------------------------------------------------------------------ packed
def test_packed_chain_longer_than_ring(mem) -> None:
    drv, q = packed(mem, size=4)
    f = drv.avail_flags()
    for i in range(4):
        drv.write_desc(i, BUF, 4, 0, f | NEXT)
    expect_broken(q, E.DescriptorChainTooLong)


def test_packed_indirect_with_next_and_bad_length(mem) -> None:
    drv, q = packed(mem)
    f = drv.avail_flags()
    drv.write_desc(0, 0x9000, 16, 0, f | IND | NEXT)
    expect_broken(q, E.InvalidIndirectTable, "chained")
    drv2, q2 = packed(mem)
    drv2.write_desc(0, 0x9000, 24, 0, f | IND)
    expect_broken(q2, E.InvalidIndirectTable, "multiple of 16")


def test_packed_indirect_table_ignores_reserved_flags(mem) -> None:
    drv, q = packed(mem)
    mem.write_obj(0x9000, "<QIHH", BUF, 4, 123, NEXT | IND)  # NEXT/INDIRECT/id reserved: ignored
    mem.write_obj(0x9010, "<QIHH", BUF, 8, 0, WRITE)
    drv.write_desc(0, 0x9000, 32, 3, drv.avail_flags() | IND)
    (c,) = q.pop_batch(8)
    assert (c.head_index, c.readable_len, c.writable_len, c.desc_count) == (3, 4, 8, 1)


def test_packed_driver_overfills_ring(mem) -> None:
    drv, q = packed(mem, size=2)
    drv.write_desc(0, BUF, 4, 0, drv.avail_flags(1))
    drv.write_desc(1, BUF, 4, 1, drv.avail_flags(1))
    assert len(q.pop_batch(8)) == 2
    # hostile: marks slot 0 available again for the next wrap without waiting for used
    drv.write_desc(0, BUF, 4, 0, drv.avail_flags(0))
    expect_broken(q, E.InvalidAvailIndex, "in flight")


# ------------------------------------------------------------ hypothesis
# biased towards valid values so that real chains (and deep errors) show up often
ADDRS = st.one_of(
    st.integers(BUF, BUF + 0x1000),
    st.integers(BUF, BUF + 0x1000),
    st.sampled_from([0x1FFF0, 0x2FFF8, 0x30000, 0x4FFF0, 0x50000, 0x9000, 2**64 - 1, 0]),
    st.integers(0, 2**64 - 1),
)
LENS = st.one_of(
    st.integers(1, 64), st.integers(1, 64), st.sampled_from([0, 16, 32, 48, 0x1000, 0xFFFFFFFF, 17]),
    st.integers(0, 2**32 - 1),
)
FLAGS = st.one_of(st.integers(0, 3), st.integers(0, 7), st.integers(0, 0xFFFF))
DESC = st.tuples(ADDRS, LENS, FLAGS, st.integers(0, 12))


def check_chains(mem: GuestMemory, q: Queue, chains: list) -> None:
    for c in chains:
        assert 1 <= len(c) <= q.size
        seen_w = False
        for gpa, ln, w in c.descriptors():
            assert ln > 0 and mem.check_range(gpa, ln)
            assert not (seen_w and not w)
            seen_w = seen_w or w
        assert c.readable_len + c.writable_len <= 2**32
        # reading and writing them stays inside guest memory
        c.reader().read()
        w = c.writer()
        w.write(b"\xAA" * min(w.available_bytes, 64))


def drain(mem: GuestMemory, q: Queue, limit: int) -> None:
    for _ in range(limit):
        try:
            chains = q.pop_batch(3)
        except E.QueueError:
            assert q.broken is not None
            with pytest.raises(E.QueueBroken):
                q.pop_batch(1)
            return
        check_chains(mem, q, chains)
        if not chains:
            return
        q.add_used_batch([(c, 0) for c in chains])
    raise AssertionError("pop loop did not terminate")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(DESC, min_size=8, max_size=8),
    heads=st.lists(st.integers(0, 10), min_size=8, max_size=8),
    avail_idx=st.one_of(st.integers(0, 8), st.integers(0, 8), st.integers(0, 0xFFFF)),
    table=st.lists(DESC, min_size=0, max_size=6),
)
def test_hypothesis_random_split_ring(mem, descs, heads, avail_idx, table) -> None:
    drv, q = split(mem)
    for i, (a, ln, f, n) in enumerate(descs):
        drv.write_desc(i, a, ln, f, n)
    for h in heads:
        drv.push_avail(h)
    for i, (a, ln, f, n) in enumerate(table):
        mem.write_obj(0x9000 + 16 * i, "<QIHH", a, ln, f, n)
    drv.set_avail_idx(avail_idx)
    drain(mem, q, 50)
    q.set_ready(False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(1, 8),
    descs=st.lists(
        st.tuples(ADDRS, LENS, st.integers(0, 0xFFFF), st.one_of(st.integers(0, 0xFFFF), st.sampled_from(
            [VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_AVAIL | NEXT, VIRTQ_DESC_F_AVAIL | WRITE, VIRTQ_DESC_F_AVAIL | IND,
             VIRTQ_DESC_F_USED]))),
        min_size=8, max_size=8,
    ),
    table=st.lists(DESC, min_size=0, max_size=6),
)
def test_hypothesis_random_packed_ring(mem, size, descs, table) -> None:
    drv, q = packed(mem, size=size)
    for i, (a, ln, bid, f) in enumerate(descs[:size]):
        drv.write_desc(i, a, ln, bid, f)
    for i, (a, ln, f, n) in enumerate(table):
        mem.write_obj(0x9000 + 16 * i, "<QIHH", a, ln, n, f)
    drain(mem, q, 50)
    q.set_ready(False)
