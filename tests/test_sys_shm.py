"""Shared memory by fd (memfd and shm_open) and fd windows (map_fd)."""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os

import pytest
from conftest import check_no_fd_leak, variant_params
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.errors import UnsupportedVariant
from vhostuser.sys_util import (
    AVAILABLE_SHM_KINDS,
    DEFAULT_SHM_KIND,
    SharedMemory,
    ShmKind,
    create_shm_fd,
    map_fd,
)

KINDS = variant_params(ShmKind, AVAILABLE_SHM_KINDS)
GRAN = mmap.ALLOCATIONGRANULARITY


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1, 4096, 3 * GRAN + 123])
def test_create_shm_fd(kind: ShmKind, size: int, no_fd_leak: None) -> None:
    fd = create_shm_fd(size, kind=kind)
    try:
        assert os.fstat(fd).st_size == size
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm to inspect")
def test_shm_open_leaves_no_name_behind(no_fd_leak: None) -> None:
    if ShmKind.SHM_OPEN not in AVAILABLE_SHM_KINDS:
        pytest.skip("no shm_open")
    before = set(os.listdir("/dev/shm"))
    fd = create_shm_fd(4096, kind=ShmKind.SHM_OPEN)
    os.close(fd)
    assert set(os.listdir("/dev/shm")) - before == set()


@pytest.mark.parametrize("kind", KINDS)
def test_write_one_mapping_read_another(kind: ShmKind, no_fd_leak: None) -> None:
    size = 2 * GRAN
    with SharedMemory(size, name="test", kind=kind) as shm:
        assert shm.size == len(shm.buf) == len(shm.mmap) == size
        shm.buf[100:105] = b"hello"
        shm.buf[size - 3 :] = b"end"
        with map_fd(shm.fd, size) as other:
            assert other.address != shm.address
            assert bytes(other.buf[100:105]) == b"hello"
            assert bytes(other.buf[size - 3 :]) == b"end"
            other.buf[0:3] = b"abc"
        assert bytes(shm.buf[0:3]) == b"abc"
        assert ctypes.string_at(shm.address + 100, 5) == b"hello"
    assert shm.closed and shm.fd == -1
    shm.close()  # idempotent


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_offset_windows(kind: ShmKind, data: st.DataObject) -> None:
    size = 4 * GRAN
    offset = data.draw(st.integers(0, size - 1), label="offset")
    length = data.draw(st.integers(1, size - offset), label="length")
    pattern = bytes((i * 7 + offset) & 0xFF for i in range(length))
    with check_no_fd_leak(), SharedMemory(size, kind=kind) as shm:
        shm.buf[offset : offset + length] = pattern
        with map_fd(shm.fd, length, offset) as win:
            assert (win.offset, win.size, len(win.buf)) == (offset, length, length)
            assert bytes(win.buf) == pattern
            assert ctypes.string_at(win.address, length) == pattern
            win.buf[0:1] = b"\xff"
        assert shm.buf[offset] == 0xFF


def test_read_only_window(no_fd_leak: None) -> None:
    with SharedMemory(GRAN * 2) as shm:
        shm.buf[GRAN + 10 : GRAN + 13] = b"ro!"
        with map_fd(shm.fd, 3, GRAN + 10, writable=False) as win:
            assert win.buf.readonly
            assert bytes(win.buf) == b"ro!"
            assert ctypes.string_at(win.address, 3) == b"ro!"
            with pytest.raises(TypeError):
                win.buf[0:1] = b"x"


def test_close_with_live_view_raises_then_recovers(no_fd_leak: None) -> None:
    shm = SharedMemory(4096)
    view = shm.buf[0:8]
    with pytest.raises(BufferError):
        shm.close()
    assert shm.fd == -1  # the fd is closed regardless
    view.release()
    shm.close()
    assert shm.region.closed


def test_bad_arguments(no_fd_leak: None) -> None:
    with pytest.raises(ValueError):
        SharedMemory(0)
    with pytest.raises(ValueError):
        create_shm_fd(-1)
    with SharedMemory(4096) as shm:
        with pytest.raises(ValueError):
            map_fd(shm.fd, 0)
        with pytest.raises(ValueError):
            map_fd(shm.fd, 1, offset=-1)
        with pytest.raises(ValueError):  # beyond the end of the file
            map_fd(shm.fd, 8192)


def test_env_switch_and_rejects(monkeypatch: pytest.MonkeyPatch, no_fd_leak: None) -> None:
    assert DEFAULT_SHM_KIND in AVAILABLE_SHM_KINDS
    if ShmKind.SHM_OPEN in AVAILABLE_SHM_KINDS and os.path.isdir("/proc/self/fd"):
        monkeypatch.setenv("VHOSTUSER_SHM", "shm_open")
        fd = create_shm_fd(4096, name="envtest")
        try:
            assert "memfd:" not in os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    monkeypatch.setenv("VHOSTUSER_SHM", "hugetlbfs")
    with pytest.raises(UnsupportedVariant):
        create_shm_fd(4096)
