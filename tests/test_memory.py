"""GuestMemory / MemoryRegion / DirtyLog."""
from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import open_fds as conftest_open_fds

from vhostuser.errors import GuestAddressError, GuestMemoryError
from vhostuser.memory import MAX_MEM_SLOTS, DirtyLog, GuestMemory, MemoryRegion
from vhostuser.sys_util.shm import create_shm_fd


def open_fds() -> int:
    return len(conftest_open_fds())


def memfd(size: int) -> int:
    return create_shm_fd(size, "vhostuser-test")  # a memfd, or shm_open where there is none


class Desc:
    """Stand-in for the protocol layer's memory-region payload."""

    def __init__(self, gpa: int, size: int, uva: int, off: int) -> None:
        self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset = gpa, size, uva, off


# ------------------------------------------------------------------ basics
def test_read_write_roundtrip_and_ints() -> None:
    with GuestMemory.anonymous([(0x1000, 0x4000)]) as mem:
        mem.write(0x1100, b"hello")
        assert mem.read(0x1100, 5) == b"hello"
        mem.write_u16(0x1200, 0xBEEF)
        mem.write_u32(0x1204, 0xDEADBEEF)
        mem.write_u64(0x1208, 0x0123456789ABCDEF)
        assert mem.read(0x1200, 2) == b"\xef\xbe"
        assert (mem.read_u16(0x1200), mem.read_u32(0x1204), mem.read_u64(0x1208)) == (
            0xBEEF, 0xDEADBEEF, 0x0123456789ABCDEF,
        )
        mem.write_obj(0x1300, "<HI", 7, 9)
        assert mem.read_obj(0x1300, "<HI") == (7, 9)
        buf = bytearray(5)
        assert mem.read_into(0x1100, buf) == 5 and buf == b"hello"
        assert mem.read_u8(0x1100) == ord("h")


def test_out_of_range_raises() -> None:
    with GuestMemory.anonymous([(0x1000, 0x1000)]) as mem:
        for gpa, n in [(0, 1), (0xFFF, 2), (0x2000, 1), (0x1FFF, 2), (-1, 1), (0x1000, -1), (2**64 - 1, 2), (2**64, 0)]:
            with pytest.raises(GuestAddressError):
                mem.read(gpa, n)
        with pytest.raises(GuestAddressError) as ei:
            mem.write(0x1FFE, b"abc")
        assert ei.value.addr == 0x1FFE and ei.value.length == 3
        assert mem.read(0x1FFF, 1) == b"\0"
        assert mem.get_slices(0x5000, 0) == []
        assert not mem.check_range(0x1FFF, 2) and mem.check_range(0x1000, 0x1000)


def test_straddle_adjacent_regions_and_hole() -> None:
    mem = GuestMemory.anonymous([(0, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)])
    with mem:
        data = bytes(range(256)) * 4
        mem.write(0x1000 - 512, data)
        assert mem.read(0x1000 - 512, len(data)) == data
        slices = mem.get_slices(0x1000 - 512, len(data))
        assert [len(s) for s in slices] == [512, 512]
        # hole at 0x2000: nothing written, error raised
        mem.write(0x1F00, b"\x11" * 0x100)
        with pytest.raises(GuestAddressError):
            mem.write(0x1F00, b"\x22" * 0x200)
        assert mem.read(0x1F00, 0x100) == b"\x11" * 0x100
        with pytest.raises(GuestAddressError):
            mem.get_slices(0x2FFF, 2)
        with pytest.raises(GuestAddressError):
            mem.translate(0xFFF, 2)  # single-region translation refuses straddles


def test_get_slices_are_writable_views_for_preadv(tmp_path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"A" * 100 + b"B" * 100)
    mem = GuestMemory.anonymous([(0, 0x1000), (0x1000, 0x1000)])
    with mem:
        views = mem.get_slices(0x1000 - 100, 200)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.preadv(fd, views, 0) == 200
        finally:
            os.close(fd)
        del views
        assert mem.read(0x1000 - 100, 200) == b"A" * 100 + b"B" * 100


def test_overlap_and_slot_limit() -> None:
    a, b = MemoryRegion.anonymous(0, 0x2000), MemoryRegion.anonymous(0x1000, 0x1000)
    with pytest.raises(GuestMemoryError):
        GuestMemory([a, b])
    assert a.closed and b.closed  # adopted and closed on error
    regions = [MemoryRegion.anonymous(i * 0x1000, 0x1000) for i in range(3)]
    with pytest.raises(GuestMemoryError):
        GuestMemory(regions, max_slots=2)
    assert MAX_MEM_SLOTS == 509


# ---------------------------------------------------------- fds and offsets
def test_qemu_style_two_regions_of_one_memfd_with_offsets() -> None:
    before = open_fds()
    size = 0x100000
    fd = memfd(size)
    try:
        table = [Desc(0, 0xA0000, 0x7F0000000000, 0), Desc(0xC0000, 0x40000, 0x7F00000C0000, 0xC0000)]
        mem = GuestMemory.from_table(table, [os.dup(fd), os.dup(fd)])
        with mem:
            mem.write(0x10, b"low")
            mem.write(0xC0000 + 0x20, b"high")
            assert os.pread(fd, 3, 0x10) == b"low"
            assert os.pread(fd, 4, 0xC0020) == b"high"
            os.pwrite(fd, b"X", 0xFFFFF)
            assert mem.read(0xFFFFF, 1) == b"X"
            # uva translation
            assert mem.uva_to_gpa(0x7F00000C0020) == 0xC0020
            assert mem.uva_to_gpa(0x7F0000000010) == 0x10
            r, off = mem.translate_uva(0x7F00000C0000 + 5)
            assert r.guest_phys_addr == 0xC0000 and off == 5
            with pytest.raises(GuestAddressError):
                mem.uva_to_gpa(0x7F00000A0000)  # the hole
            with pytest.raises(GuestAddressError):
                mem.read(0xA0000, 1)
    finally:
        os.close(fd)
    assert open_fds() == before


def test_unaligned_mmap_offset_and_keep_fd() -> None:
    before = open_fds()
    fd = memfd(0x10000)
    try:
        os.pwrite(fd, b"marker", 0x1800)
        r = MemoryRegion.from_fd(os.dup(fd), 0x4000, 0x1000, 0x9000, 0x1800, keep_fd=True)
        assert r.fd is not None
        with GuestMemory([r]) as mem:
            assert mem.read(0x4000, 6) == b"marker"
            # host address points at the same byte
            host = mem.gpa_to_host(0x4000, 6)
            assert ctypes.string_at(host, 6) == b"marker"
            assert mem.table() == [(0x4000, 0x1000, 0x9000, host)]
        assert r.closed and r.fd is None
    finally:
        os.close(fd)
    assert open_fds() == before


def test_from_table_closes_every_fd_on_error() -> None:
    before = open_fds()
    fd = memfd(0x2000)
    fds = [os.dup(fd), os.dup(fd), os.dup(fd)]
    os.close(fd)
    table = [Desc(0, 0x1000, 0, 0), Desc(0x1000, 0, 0, 0), Desc(0x2000, 0x1000, 0, 0)]  # 2nd invalid
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_table(table, fds)
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_table(table[:1], [memfd(0x1000), memfd(0x1000)])
    assert open_fds() == before


# ------------------------------------------------------------ add / remove
def test_with_and_without_region_share_and_unmap() -> None:
    r0 = MemoryRegion.anonymous(0, 0x1000)
    m1 = GuestMemory([r0])
    r1 = MemoryRegion.anonymous(0x1000, 0x1000)
    m2 = m1.with_region(r1)
    m2.write(0xFF0, b"x" * 0x20)  # straddles into the new region
    assert m1.check_range(0, 0x1000) and not m1.check_range(0x1000, 1)
    m1.close()  # old snapshot closed by the control thread
    assert not r0.closed and m2.read(0xFF0, 0x20) == b"x" * 0x20
    m3 = m2.without_region(0, 0x1000)
    with pytest.raises(GuestMemoryError):
        m2.without_region(0x5000, 0x1000)
    assert m2.read(0, 1) == b"\0"  # m2 still sees it
    m2.close()
    assert r0.closed and not r1.closed
    with pytest.raises(GuestAddressError):
        m3.read(0, 1)
    with pytest.raises(GuestMemoryError):
        m2.read(0x1000, 1)
    m3.close()
    assert r1.closed


def test_close_with_live_views_is_deferred_not_refused() -> None:
    mem = GuestMemory.anonymous([(0, 0x1000)])
    v = mem.get_slices(0, 16)
    mem.close()  # logs a warning, does not raise
    assert mem.closed
    del v


# ---------------------------------------------------------------- dirty log
def test_dirty_log_marks_pages() -> None:
    log = DirtyLog.anonymous(8)  # 64 pages
    log.mark(0, 1)
    log.mark(0x3FFF, 2)  # pages 3 and 4
    log.mark(0x8000, 0x8000)  # pages 8..15: a whole byte
    log.mark(0x1000 * 100, 10)  # beyond the bitmap: ignored
    log.mark(0x5000, 0)
    assert log.dirty_pages() == [0, 3, 4, *range(8, 16)]
    assert log.is_dirty(0x8123) and not log.is_dirty(0x5000)
    assert bytes(log.view)[:2] == b"\x19\xff"
    log.clear()
    assert log.dirty_pages() == []
    log.close()


def test_dirty_log_from_fd_offset() -> None:
    before = open_fds()
    fd = memfd(0x3000)
    log = DirtyLog.from_fd(os.dup(fd), 0x100, 0x2000)
    log.mark(0x1000 * 9, 1)  # page 9: byte 1 bit 1
    assert os.pread(fd, 2, 0x2000) == b"\x00\x02"
    log.close()
    os.close(fd)
    assert open_fds() == before


@settings(max_examples=200, deadline=None)
@given(gpa=st.integers(0, 0x5000), n=st.integers(0, 0x3000))
def test_access_inside_iff_check_range(gpa: int, n: int) -> None:
    mem = GuestMemory.anonymous([(0x1000, 0x1000), (0x2000, 0x1000), (0x4000, 0x800)])
    with mem:
        inside = all(
            any(r.guest_phys_addr <= b < r.end for r in mem.regions) for b in range(gpa, gpa + n, 0x100)
        ) and (n == 0 or any(r.guest_phys_addr <= gpa + n - 1 < r.end for r in mem.regions))
        assert mem.check_range(gpa, n) == inside
        if inside:
            assert sum(len(s) for s in mem.get_slices(gpa, n)) == n
        else:
            with pytest.raises(GuestAddressError):
                mem.get_slices(gpa, n)
