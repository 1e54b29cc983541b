"""The C ring core specifically: ABI, wiring, batch-array reuse, memory safety
around closed snapshots/logs, and build hygiene of the C sources."""
from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import import_native_core

from vhostuser import _impl
from vhostuser.errors import GuestMemoryError
from vhostuser.memory import DirtyLog, GuestMemory
from vhostuser.virtqueue import _core, _pycore
from vhostuser.virtqueue.driver import RingDriver

NC = import_native_core()  # skips without the C extension; fails in CI or with VHOSTUSER_IMPL=native

NATIVE_DIR = Path(__file__).resolve().parent.parent / "src" / "vhostuser" / "_native"
LAYOUTS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 0x40000), (0x40000, 0x40000)])
    yield m
    m.close()


def native_queue(mem: GuestMemory, packed: bool, size: int = 16) -> tuple[RingDriver, object]:
    from vhostuser.virtqueue import chain as chain_mod  # noqa: PLC0415
    from vhostuser.virtqueue import queue as queue_mod  # noqa: PLC0415

    mp = pytest.MonkeyPatch()
    mp.setattr(queue_mod, "get_core", lambda: NC)
    mp.setattr(chain_mod, "get_core", lambda: NC)
    try:
        drv = RingDriver.create(mem, size, packed=packed)
        q = drv.make_queue()
    finally:
        mp.undo()
    assert isinstance(q.state, NC.QueueState)
    return drv, q


def test_abi_and_wiring() -> None:
    assert NC.lib.vu_native_abi_version() == _impl.NATIVE_ABI_VERSION
    assert _core.get_core() is (NC if _impl.IMPL == "native" else _pycore)
    assert NC.NAME == "native" and _pycore.NAME == "python"


def test_state_fields_mirror_the_python_state() -> None:
    a, b = _pycore.QueueState(), NC.QueueState()
    for f in a.__slots__:
        if not f.endswith("_mv") and f != "log":
            assert getattr(a, f) == getattr(b, f), f
    b.next_avail = 0xFFFF
    b.ready = True
    assert b.next_avail == 0xFFFF and b.ready is True and b._q.ready == 1
    b.reset()
    assert (b.next_avail, b.ready, b.avail_wrap, b.used_wrap, b.notify_enabled) == (0, False, 1, 1, True)


@LAYOUTS
def test_batches_are_flat_c_arrays_reused_when_free(mem, packed) -> None:
    drv, q = native_queue(mem, packed)
    st = q.state
    drv.add([b"abc", b"def"], [8])
    drv.publish()
    (c,) = q.pop_batch(4)
    assert isinstance(c._addrs, NC.ffi.CData) and isinstance(c._lens, NC.ffi.CData)  # no per-descriptor objects
    blk = st._blk
    assert blk.busy
    # holding the chain: the next pop must not overwrite its descriptors
    drv.add([b"0123456789"], [4, 4])
    drv.publish()
    (c2,) = q.pop_batch(4)
    assert st._blk is not blk
    assert c.reader().read() == b"abcdef" and c.descriptors()[0][1] == 3
    assert c2.reader().read() == b"0123456789"
    q.add_used_batch([(c, 0), (c2, 0)])
    blk2 = st._blk
    del c, c2
    gc.collect()
    assert not blk2.busy
    drv.get_used()
    drv.add([b"x"])
    drv.publish()
    (c3,) = q.pop_batch(4)
    assert st._blk is blk2  # reused: no allocation in the steady state
    assert c3.reader().read() == b"x"
    q.add_used(c3, 0)
    q.set_ready(False)


def test_core_level_batch_reuse_with_one_batch_object(mem) -> None:
    drv, q = native_queue(mem, False)
    st, batch = q.state, NC.ChainBatch(64, raw=True)
    for i in range(5):
        drv.add([bytes([i]) * 3])
        drv.publish()
        assert NC.pop_batch(st, mem, 8, batch) == 1
        assert batch.len[batch.desc_start[0]] == 3
        blk = st._blk
        assert NC.add_used_batch(st, mem, batch.head, NC.ffi.new("uint32_t[]", 1), batch.slots, 1) == 0
        drv.get_used()
    assert st._blk is blk


def test_closed_snapshot_is_refused_not_dereferenced(mem) -> None:
    other = GuestMemory.anonymous([(0, 0x40000), (0x40000, 0x40000)])
    drv, q = native_queue(other, False)
    drv.add([b"abc"], [4])
    drv.publish()
    (c,) = q.pop_batch(1)
    other.close()  # the rings stay mapped (the state keeps views, as the Python core does)
    with pytest.raises(GuestMemoryError, match="closed"):
        c.reader().read()
    with pytest.raises(GuestMemoryError, match="closed"):
        c.writer().write(b"x")
    with pytest.raises(GuestMemoryError, match="closed"):
        q.pop_batch(1)
    q.add_used(c, 0)  # ring-only operations still work
    assert q.needs_notification() in (True, False)
    q.set_ready(False)


def test_closed_dirty_log_is_never_written(mem) -> None:
    drv, q = native_queue(mem, True)
    dlog = DirtyLog.for_memory(mem)
    q.set_dirty_log(dlog)
    q.set_used_log(0)
    drv.add([b"abc"], [4])
    drv.publish()
    (c,) = q.pop_batch(1)
    dlog.close()
    q.add_used(c, 4)  # no crash, nothing logged
    assert drv.get_used() == [(c.id, 4)]
    q.set_ready(False)


def test_log_beyond_bitmap_and_huge_log_base(mem) -> None:
    lg = bytearray(2)
    NC.lib.vu_log_mark(NC.ffi.from_buffer(lg), 2, 0xF000, 0x3000)  # pages 15..17: only 15 fits
    assert lg == bytearray([0, 0x80])
    NC.lib.vu_log_mark(NC.ffi.from_buffer(lg), 2, 2**64 - 8, 16)  # wraps past 2**64: ignored
    NC.lib.vu_log_mark(NC.ffi.from_buffer(lg), 2, 0, 0x8000)  # whole byte
    assert lg == bytearray([0xFF, 0x80])


def test_memory_lookups() -> None:
    mem = GuestMemory.anonymous([(0x1000, 0x1000), (0x2000, 0x1000), (0x5000, 0x1000)])
    try:
        t = NC.mem_table(mem)
        assert NC.mem_table(mem) is t  # cached on the snapshot
        inm = NC.lib.vu_mem_in_memory
        ptr = NC.lib.vu_mem_region_ptr
        assert inm(t, 0x1800, 0x1000) and not inm(t, 0x2800, 0x1000) and not inm(t, 0xFFF, 2)
        assert inm(t, 0x5FFF, 1) and not inm(t, 0x5FFF, 2) and not inm(t, 2**64 - 1, 2)
        assert ptr(t, 0x1800, 0x1000) == NC.ffi.NULL and ptr(t, 0x1800, 0x800) != NC.ffi.NULL
        assert ptr(t, 0x3000, 0) != NC.ffi.NULL and ptr(t, 0x3001, 0) == NC.ffi.NULL  # as _pycore._region_view
        assert ptr(t, 0, 1) == NC.ffi.NULL
    finally:
        mem.close()
    empty = GuestMemory([])
    try:
        assert not NC.lib.vu_mem_in_memory(NC.mem_table(empty), 0, 1)
    finally:
        empty.close()


# ------------------------------------------------------------------ build hygiene
def _compilers() -> list[str]:
    out = []
    for cc in ("gcc", "clang", "cc"):
        path = shutil.which(cc)
        if path and os.path.realpath(path) not in [os.path.realpath(shutil.which(c) or "") for c in out]:
            out.append(cc)
    return out


@pytest.mark.parametrize("source", ["ring.c", "chainio.c"])
@pytest.mark.parametrize("cc", _compilers() or [pytest.param("cc", marks=pytest.mark.skip("no C compiler"))])
def test_ring_c_compiles_warning_free(cc: str, source: str, tmp_path: Path) -> None:
    cmd = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wshadow", "-Wconversion",
           "-Wno-sign-conversion", "-c", str(NATIVE_DIR / source), "-I", str(NATIVE_DIR),
           "-o", str(tmp_path / "ring.o")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_ring_c_is_portable_posix() -> None:
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)", (NATIVE_DIR / "ring.c").read_text())
    includes += re.findall(r"#include\s*[<\"]([^>\"]+)", (NATIVE_DIR / "ring.h").read_text())
    assert set(includes) <= {"string.h", "stddef.h", "stdint.h", "ring.h"}, includes
