"""Queue / DescriptorChain / Reader / Writer, split and packed, driven by the test driver."""
from __future__ import annotations

import os
import random

import pytest

from vhostuser.errors import ChainTooShort, QueueAddressError, QueueError, QueueNotReady, QueueUsageError
from vhostuser.memory import DirtyLog, GuestMemory, MemoryRegion
from vhostuser.virtqueue import Layout, Queue, VIRTQ_USED_F_NO_NOTIFY
from vhostuser.virtqueue.defs import RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE
from vhostuser.virtqueue.driver import RingDriver

LAYOUTS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 0x40000), (0x40000, 0x40000)])
    yield m
    m.close()


def setup(mem: GuestMemory, packed: bool, size: int = 16, event_idx: bool = False) -> tuple[RingDriver, Queue]:
    drv = RingDriver.create(mem, size, packed=packed, event_idx=event_idx)
    return drv, drv.make_queue()


# ------------------------------------------------------------- basic chains
@LAYOUTS
def test_single_descriptor_chain(mem, packed) -> None:
    drv, q = setup(mem, packed)
    assert q.pop_descriptor_chain() is None
    tok = drv.add([b"ping"])
    assert q.pop_descriptor_chain() is None  # not published yet
    drv.publish()
    assert q.has_available()
    c = q.pop_descriptor_chain()
    assert c is not None and c.head_index == tok and c.id == tok
    assert (c.readable_len, c.writable_len, len(c), c.desc_count) == (4, 0, 1, 1)
    assert c.reader().read() == b"ping"
    assert q.pop_descriptor_chain() is None and not q.has_available()
    q.add_used(c, 0)
    assert drv.get_used() == [(tok, 0)]


@LAYOUTS
def test_multi_descriptor_chain_reader_writer_across_boundaries(mem, packed) -> None:
    drv, q = setup(mem, packed)
    tok = drv.add([b"ab", b"cdef", b"g"], [3, 1, 4])
    drv.publish()
    c = q.pop_descriptor_chain()
    assert c is not None and len(c) == 6 and c.desc_count == (6 if packed else 1)
    assert [w for _, _, w in c.descriptors()] == [False] * 3 + [True] * 3
    r = c.reader()
    assert r.read(3) == b"abc"
    assert r.read_u16() == int.from_bytes(b"de", "little")
    with pytest.raises(ChainTooShort):
        r.read_exact(3)
    assert r.available_bytes == 2 and r.read(10) == b"fg" and r.read(1) == b""
    assert r.bytes_read == 7
    w = c.writer()
    assert w.available_bytes == 8
    w.write(b"XY")
    w.write_u32(0x44434241)
    with pytest.raises(ChainTooShort):
        w.write(b"123")  # nothing written
    w.write(b"Z")
    assert w.bytes_written == 7 and w.available_bytes == 1
    q.add_used(c, w.bytes_written)
    assert drv.get_used() == [(tok, 7)]
    assert drv.read_written(tok, 7) == b"XYABCDZ"


@LAYOUTS
def test_indirect_chain(mem, packed) -> None:
    drv, q = setup(mem, packed, size=4)
    tok = drv.add([b"hdr", b"payload"], [2, 6], indirect=True)
    drv.publish()
    c = q.pop_descriptor_chain()
    assert c is not None and c.head_index == tok and len(c) == 4 and c.desc_count == 1
    assert c.reader().read() == b"hdrpayload"
    c.writer().write(b"12345678")
    q.add_used(c, 8)
    assert drv.get_used() == [(tok, 8)]
    assert drv.read_written(tok, 8) == b"12345678"


@LAYOUTS
def test_split_at_and_zero_copy_views(mem, packed, tmp_path) -> None:
    drv, q = setup(mem, packed)
    tok = drv.add([b"0123456789"], [5, 5, 1])
    drv.publish()
    c = q.pop_descriptor_chain()
    r = c.reader()
    tail = r.split_at(4)
    assert r.read() == b"0123" and tail.read() == b"456789"
    w = c.writer()
    status = w.split_at(w.available_bytes - 1)
    assert (w.available_bytes, status.available_bytes) == (10, 1)
    p = tmp_path / "disk"
    p.write_bytes(b"abcdefghij")
    fd = os.open(p, os.O_RDONLY)
    try:
        views = w.views()
        assert [len(v) for v in views] == [5, 5]
        n = os.preadv(fd, views, 0)
    finally:
        os.close(fd)
    del views
    assert w.advance(n) == 10 and w.available_bytes == 0
    status.write_u8(0)
    q.add_used(c, w.bytes_written + status.bytes_written)
    assert drv.get_used() == [(tok, 11)]
    assert drv.read_written(tok, 11) == b"abcdefghij\0"
    # reader views for pwritev
    assert b"".join(bytes(v) for v in c.readable_views()) == b"0123456789"
    assert [ln for _, ln in c.writable_buffers()] == [5, 5, 1]
    assert c.readable_buffers()[0][1] == 10


# ------------------------------------------------------------------ batches
@LAYOUTS
def test_batch_pop_and_add_used_batch(mem, packed) -> None:
    drv, q = setup(mem, packed, size=32)
    toks = [drv.add([bytes([i]) * (i + 1)], [i + 1]) for i in range(10)]
    drv.publish()
    chains = q.pop_batch(4)
    assert [c.head_index for c in chains] == toks[:4]
    chains += q.pop_batch(100)
    assert [c.head_index for c in chains] == toks
    assert q.pop_batch(8) == []
    assert q.pop_batch(0) == []
    for c in chains:
        c.writer().write(c.reader().read().upper())
    q.add_used_batch([(c, c.readable_len) for c in chains])
    assert drv.get_used() == [(t, i + 1) for i, t in enumerate(toks)]


def test_split_used_index_published_once(mem) -> None:
    drv, q = setup(mem, False, size=8)
    for _ in range(3):
        drv.add([b"x"])
    drv.publish()
    chains = q.pop_batch(8)
    q.add_used_batch([(c, 0) for c in chains])
    assert drv.used_idx() == 3 and q.next_used == 3
    q.add_used_batch([])
    assert drv.used_idx() == 3


def test_split_add_used_by_head_index(mem) -> None:
    drv, q = setup(mem, False)
    tok = drv.add([b"a"])
    drv.publish()
    c = q.pop_descriptor_chain()
    q.add_used(c.head_index, 0)
    assert drv.get_used() == [(tok, 0)]
    with pytest.raises(QueueUsageError):
        q.add_used(99, 0)
    with pytest.raises(QueueUsageError):
        q.add_used(0, 0)  # nothing in flight


def test_packed_add_used_needs_chain(mem) -> None:
    drv, q = setup(mem, True)
    drv.add([b"a"])
    drv.publish()
    c = q.pop_descriptor_chain()
    with pytest.raises(QueueUsageError):
        q.add_used(c.head_index, 0)
    with pytest.raises(QueueUsageError):
        q.add_used(c, -1)
    q.add_used(c, 0)


def test_packed_out_of_order_completion(mem) -> None:
    drv, q = setup(mem, True, size=8)
    a = drv.add([b"a"], [4])  # 2 slots
    b = drv.add([b"bb", b"b"], [1])  # 3 slots
    c_ = drv.add([b"c"])  # 1 slot
    drv.publish()
    ca, cb, cc = q.pop_batch(8)
    assert [x.desc_count for x in (ca, cb, cc)] == [2, 3, 1]
    # complete c, then a, then b
    q.add_used(cc, 0)
    assert q.next_used == 1
    cb.writer().write(b"!")
    q.add_used_batch([(ca, 0), (cb, 1)])
    assert q.next_used == 6
    assert drv.get_used() == [(c_, 0), (a, 0), (b, 1)]
    assert drv.num_free == 8
    # the used descriptors landed at positions 0, 1 and 3
    assert [drv.read_desc(p)[2] for p in (0, 1, 3)] == [c_, a, b]


def test_packed_buffer_id_comes_from_last_descriptor(mem) -> None:
    drv, q = setup(mem, True, size=4)
    f = drv.avail_flags()
    drv.write_desc(1, 0x30000, 8, 77, f | 2)  # last: id 77, WRITE
    drv.write_desc(0, 0x30100, 8, 5, f | 1)  # head: id 5, NEXT
    c = q.pop_descriptor_chain()
    assert c is not None and c.head_index == 77 and c.desc_count == 2


# ------------------------------------------------------------ wrap-around
@pytest.mark.parametrize(
    "packed,size", [(False, 4), (False, 8), (True, 4), (True, 8), (True, 7)], ids=["s4", "s8", "p4", "p8", "p7"]
)
def test_ring_wraps_over_many_rounds(mem, packed, size) -> None:
    rng = random.Random(size * 2 + packed)
    drv, q = setup(mem, packed, size=size)
    expect: dict[int, bytes] = {}
    completed = 0
    for _round in range(400):
        # add a few chains if room
        while drv.num_free >= 3 and rng.random() < 0.7:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            nbufs = rng.randrange(1, 3)
            half = len(payload) // 2 or 1
            parts = [payload[:half], payload[half:] or b"."][:nbufs]
            drv.add(parts, [16], indirect=rng.random() < 0.3)
        drv.publish()
        chains = q.pop_batch(rng.randrange(1, 5))
        rng.shuffle(chains)
        for c in chains:
            data = c.reader().read()
            w = c.writer()
            w.write(data[::-1])
            expect[c.head_index] = data[::-1]
        if chains:
            q.add_used_batch([(c, c.readable_len) for c in chains])
        for tok, ln in drv.get_used():
            assert drv.read_written(tok, ln) == expect[tok]
            completed += 1
    assert completed > 200
    while chains := q.pop_batch(8):
        q.add_used_batch([(c, 0) for c in chains])
    drv.get_used()
    assert drv.num_free == size
    if not packed:
        assert q.next_avail == q.next_used == drv.avail_idx


# ------------------------------------------------------------ notifications
def test_split_needs_notification_without_event_idx(mem) -> None:
    drv, q = setup(mem, False)
    assert not q.needs_notification()  # nothing added
    drv.add([b"a"]); drv.add([b"b"]); drv.publish()
    c1, c2 = q.pop_batch(2)
    q.add_used(c1, 0)
    assert q.needs_notification()
    drv.disable_interrupts()
    q.add_used(c2, 0)
    assert not q.needs_notification()


def test_split_event_idx_needs_notification_and_16bit_wrap(mem) -> None:
    drv, q = setup(mem, False, size=8, event_idx=True)
    # start both sides just below the 16-bit wrap
    base = 0xFFFE
    q.set_vring_base(base)
    drv.avail_idx = drv.published_idx = drv._kick_old = drv.last_used = base
    drv.mem.write_u16(drv.device_gpa + 2, base)
    drv.set_used_event(base)  # interrupt me after the first used entry
    for _ in range(4):
        drv.add([b"x"])
    drv.publish()
    chains = q.pop_batch(8)
    assert len(chains) == 4 and q.next_avail == 2  # wrapped
    q.add_used(chains[0], 0)  # used idx 0xFFFF: passes used_event 0xFFFE
    assert q.needs_notification()
    q.add_used(chains[1], 0)  # used idx 0x0000
    assert not q.needs_notification()  # driver did not ask again
    drv.set_used_event(0x0000)  # driver: interrupt me when idx passes 0
    q.add_used_batch([(chains[2], 0), (chains[3], 0)])  # 0x0001, 0x0002
    assert q.needs_notification()
    assert [t for t, _ in drv.get_used()] == [c.head_index for c in chains]
    assert drv.used_idx() == 2


def test_split_event_idx_batch_spanning_event(mem) -> None:
    drv, q = setup(mem, False, size=16, event_idx=True)
    for _ in range(6):
        drv.add([b"x"])
    drv.publish()
    chains = q.pop_batch(16)
    drv.set_used_event(3)  # notify once used idx passes 3 (i.e. reaches 4)
    q.add_used_batch([(c, 0) for c in chains[:3]])  # idx 3
    assert not q.needs_notification()
    q.add_used_batch([(c, 0) for c in chains[3:]])  # idx 6: crossed 4
    assert q.needs_notification()


def test_split_kick_suppression_flags_and_avail_event(mem) -> None:
    drv, q = setup(mem, False, size=8)
    drv.add([b"a"]); drv.publish()
    assert drv.kick_needed()
    q.disable_notification()
    assert drv.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    drv.add([b"b"]); drv.publish()
    assert not drv.kick_needed()
    assert q.enable_notification() is True  # buffers already there
    assert drv.used_flags() == 0
    assert len(q.pop_batch(8)) == 2
    assert q.enable_notification() is False

    drv2, q2 = setup(GuestMemory.anonymous([(0, 0x10000)]), False, size=8, event_idx=True)
    drv2.add([b"a"]); drv2.publish()
    assert drv2.kick_needed()  # avail_event 0, idx 0 -> 1
    q2.pop_batch(8)
    assert drv2.avail_event() == 1  # updated on pop
    drv2.add([b"b"]); drv2.publish()
    assert drv2.kick_needed()
    drv2.add([b"c"]); drv2.publish()
    assert not drv2.kick_needed()  # device has not caught up: no second kick
    q2.disable_notification()
    assert len(q2.pop_batch(8)) == 2
    assert drv2.avail_event() == 1  # disabled: not advanced
    assert q2.enable_notification() is False
    assert drv2.avail_event() == 3
    drv2.mem.close()


def test_packed_notifications(mem) -> None:
    drv, q = setup(mem, True, size=8)
    drv.add([b"a"]); drv.publish()
    assert drv.kick_needed()
    q.disable_notification()
    assert drv.device_event()[1] == RING_EVENT_FLAGS_DISABLE
    drv.add([b"b"]); drv.publish()
    assert not drv.kick_needed()
    assert q.enable_notification() is True
    assert drv.device_event()[1] == RING_EVENT_FLAGS_ENABLE
    c1, c2 = q.pop_batch(8)
    q.add_used(c1, 0)
    assert q.needs_notification()
    drv.disable_interrupts()
    q.add_used(c2, 0)
    assert not q.needs_notification()


def test_packed_event_idx_with_wrap(mem) -> None:
    drv, q = setup(mem, True, size=4, event_idx=True)
    assert q.enable_notification() is False
    assert drv.device_event() == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)
    notified = 0
    for rnd in range(12):
        drv.enable_interrupts()  # DESC at the next used position
        toks = [drv.add([b"x"], [1], indirect=True) for _ in range(3)]
        drv.publish()
        assert drv.kick_needed(), rnd  # device asked for the next descriptor
        chains = q.pop_batch(8)
        assert [c.head_index for c in chains] == toks
        q.add_used(chains[0], 1)
        if q.needs_notification():
            notified += 1
        q.add_used_batch([(c, 1) for c in chains[1:]])
        assert not q.needs_notification()  # the event descriptor was already passed
        assert [t for t, _ in drv.get_used()] == toks
    assert notified == 12
    # the device's avail event tracks its position and wrap counter
    off_wrap, flags = drv.device_event()
    assert flags == RING_EVENT_FLAGS_DESC and off_wrap == q.next_avail | q.avail_wrap_counter << 15


# ------------------------------------------------------------ vring base
def test_vring_base_encoding() -> None:
    q = Queue(None, 256, layout=Layout.PACKED)
    q.set_vring_base(0x80008000)
    assert (q.next_avail, q.avail_wrap_counter, q.next_used, q.used_wrap_counter) == (0, 1, 0, 1)
    q.set_vring_base(0x00058003)
    assert (q.next_avail, q.avail_wrap_counter, q.next_used, q.used_wrap_counter) == (3, 1, 5, 0)
    assert q.vring_base() == 0x00058003
    s = Queue(None, 256)
    s.set_vring_base(0x1234)
    assert (s.next_avail, s.next_used, s.vring_base()) == (0x1234, 0x1234, 0x1234)
    s.set_next_avail(7)
    s.set_next_used(9)
    assert (s.next_avail, s.next_used) == (7, 9)
    with pytest.raises(QueueUsageError):
        s.set_next_avail(0x10000)


def test_packed_resume_from_vring_base(mem) -> None:
    drv, q = setup(mem, True, size=4)
    for _ in range(3):
        drv.add([b"x"]); drv.publish()
        c = q.pop_descriptor_chain(); q.add_used(c, 0); drv.get_used()
    base = q.vring_base()
    q2 = drv.make_queue()
    q2.set_vring_base(base)
    drv.add([b"y"], [1]); drv.add([b"z"]); drv.publish()  # wraps the ring
    cs = q2.pop_batch(4)
    assert [c.reader().read() for c in cs] == [b"y", b"z"]
    q2.add_used_batch([(c, 0) for c in cs])
    assert len(drv.get_used()) == 2 and q2.used_wrap_counter == 0


# ------------------------------------------------------------ configuration
@LAYOUTS
def test_is_valid_and_set_ready(mem, packed) -> None:
    q = Queue(mem, 16, layout=Layout.PACKED if packed else Layout.SPLIT)
    assert not q.ready
    with pytest.raises(QueueNotReady):
        q.pop_batch(1)
    q.set_addresses(0x1000, 0x2000, 0x3000)
    assert q.is_valid()
    q.set_desc_table_address(0x1008)  # misaligned
    assert not q.is_valid()
    with pytest.raises(QueueAddressError):
        q.set_ready(True)
    q.set_desc_table_address(0x80000 - 0x80)  # past the end of memory
    assert not q.is_valid()
    q.set_desc_table_address(0x40000 - 0x80)  # straddles two regions: rings must be in one
    assert not q.is_valid()
    q.set_desc_table_address(0x1000)
    q.set_ready(True)
    assert q.ready and q.pop_batch(4) == []
    if not packed:
        with pytest.raises(QueueError):
            q.set_size(12)  # not a power of two: ready queue re-validates
        assert not q.ready
    q.set_ready(False)
    with pytest.raises(QueueUsageError):
        q.set_size(17)
    with pytest.raises(QueueError):
        Queue(None, 8).set_ready(True)


def test_set_memory_swaps_snapshot(mem) -> None:
    drv, q = setup(mem, False)
    drv.add([b"one"]); drv.publish()
    c = q.pop_descriptor_chain()
    extra = MemoryRegion.anonymous(0x100000, 0x1000)
    mem2 = mem.with_region(extra)
    q.set_memory(mem2)
    drv.add_buffers([(0x100000, 4, False)])
    mem2.write(0x100000, b"new!")
    drv.publish()
    c2 = q.pop_descriptor_chain()
    assert c2.memory is mem2 and c2.reader().read() == b"new!"
    assert c.reader().read() == b"one"  # old chain keeps its snapshot
    q.add_used_batch([(c, 0), (c2, 0)])
    mem2.close()


def test_reset_restores_defaults(mem) -> None:
    drv, q = setup(mem, False, size=8, event_idx=True)
    drv.add([b"a"]); drv.publish()
    q.pop_batch(1)
    q.reset()
    assert (q.ready, q.size, q.next_avail, q.next_used, q.event_idx, q.broken) == (False, 8, 0, 0, False, None)


# ------------------------------------------------------------ dirty logging
@LAYOUTS
def test_dirty_log_marks_written_buffers_and_used_ring(mem, packed) -> None:
    drv, q = setup(mem, packed)
    dl = DirtyLog.for_memory(mem)
    q.set_dirty_log(dl)
    tok = drv.add_buffers([(0x20000, 16, False), (0x21000 - 8, 0x2000, True)])
    drv.publish()
    c = q.pop_descriptor_chain()
    c.writer().write(b"x" * 20)
    q.add_used(c, 20)  # 20 bytes: pages 0x20 and 0x21 only, not 0x22
    assert dl.dirty_pages() == [0x20, 0x21]
    dl.clear()
    q.set_log_used(True)
    drv.add_buffers([(0x30000, 4, True)])
    drv.publish()
    c = q.pop_descriptor_chain()
    q.add_used(c, 0)  # nothing written: only the ring page
    assert dl.dirty_pages() == [drv.desc_gpa // 4096 if packed else drv.device_gpa // 4096]
    assert tok is not None
    dl.close()


@LAYOUTS
def test_constructor_shortcut_and_memory_dirty_log(mem, packed) -> None:
    drv = RingDriver.create(mem, 8, packed=packed, event_idx=True)
    q = Queue(mem, size=8, desc_addr=drv.desc_gpa, driver_addr=drv.driver_gpa, device_addr=drv.device_gpa,
              packed=packed, event_idx=True)
    assert q.ready and q.event_idx and q.packed == packed and q.size == 8
    q.set_vring_base(0x80008000 if packed else 0)
    dl = DirtyLog.for_memory(mem)
    mem.set_dirty_log(dl)  # the snapshot's log is used when the queue has none
    q.set_used_log(drv.device_gpa)
    tok = drv.add_buffers([(0x50000, 8, True)])
    drv.publish()
    c = q.pop_descriptor_chain()
    assert c.reader().read_all() == b"" and c.writable_length == 8 and c.readable_length == 0
    c.writer().write(b"12345678")
    q.add_used(c, 8)
    assert 0x50 in dl.dirty_pages()
    ring_page = (drv.desc_gpa if packed else drv.device_gpa) // 4096
    assert ring_page in dl.dirty_pages()
    assert drv.get_used() == [(tok, 8)]
    mem.set_dirty_log(None)
    dl.close()


def test_packed_vring_base_with_only_the_avail_half_means_used_equals_avail() -> None:
    """DPDK 22.11's virtio-user sends SET_VRING_BASE 0x8000 for a packed ring (avail
    position 0, wrap 1; nothing above): the used side must start there too, or
    the device writes used descriptors with the wrong wrap counter."""
    mem = GuestMemory.anonymous([(0, 0x40000)])
    drv = RingDriver.create(mem, 16, packed=True)
    q = drv.make_queue()
    q.set_vring_base(0x8000)
    assert q.vring_base() == 0x80008000
    q.set_vring_base(0x80038005)       # both halves given (QEMU): taken as they are
    assert q.vring_base() == 0x80038005
    tok = drv.add([b"x"], [])
    drv.publish()
    q.set_vring_base(0x8000)
    chain = q.pop_descriptor_chain()
    q.add_used(chain, 0)
    assert drv.get_used() == [(tok, 0)]
    mem.close()
