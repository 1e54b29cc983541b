"""Batch I/O (``chain_heads`` / ``chain_io``, Queue.pop_io_batch / complete_io).

Differential: the C core against the Python reference on the same rings (random
and hostile chains: buffers spanning adjacent regions, over the ring itself,
without a status byte, ops out of range, offsets past the end of the file),
each core with its own copy of the file; results, errnos, used lengths, guest
memory, dirty logs, queue state, notifications and the files must be identical.
Then, through the Queue API of the implementation under test: the dirty log
marks exactly the pages the reads wrote, the inflight region stays exact, and
resubmitted chains (from a restart) go through the same API.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
import struct
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_differential import NC, PC, WRITE, _publish_split, _split, twin

from vhostuser.memory import DIRTY_LOG_PAGE_SIZE, DirtyLog, GuestMemory
from vhostuser.sys_util import new_event_consumer_and_notifier
from vhostuser.virtqueue import IoOp
from vhostuser.virtqueue.driver import RingDriver
from vhostuser.virtqueue.inflight import SplitInflight, queue_region_size

NEXT = 1
FILE_SIZE = 0x12000
desc_st = st.tuples(
    st.sampled_from([0x100, 0x10000, 0x1F800, 0x1FFFF, 0x2FFF0, 0x41000, 0x2000, 0x30000]),  # gpa
    st.integers(0, 0x800),  # offset
    st.sampled_from([0, 1, 16, 17, 512, 4096, 0x1000, 0x2100]),  # length
)
chain_st = st.tuples(st.lists(desc_st, min_size=0, max_size=3), st.lists(desc_st, min_size=0, max_size=3))


def _files(tmp_path: Path, seed: int) -> list[int]:
    data = random.Random(seed).randbytes(FILE_SIZE)
    fds = []
    for k in range(2):
        p = tmp_path / f"f{k}"
        p.write_bytes(data)
        fds.append(os.open(p, os.O_RDWR))
    return fds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains=st.lists(chain_st, min_size=1, max_size=6),
       ops=st.lists(st.sampled_from([0, 1, 1, 2, 2, 7]), min_size=6, max_size=6),
       offs=st.lists(st.sampled_from([0, 512, 0x3000, 0x11800, FILE_SIZE, 0x40000]), min_size=6, max_size=6),
       skip=st.sampled_from([0, 16, 100]), tail=st.sampled_from([0, 1, 2]), every=st.integers(0, 3),
       seed=st.integers(0, 1000), hlen=st.sampled_from([0, 16, 40]))  # fmt: skip
def test_chain_io_c_equals_python(tmp_path: Path, chains, ops, offs, skip, tail, every, seed, hlen) -> None:  # noqa: ANN001
    size = 16
    fds = _files(tmp_path, seed)
    calls = [new_event_consumer_and_notifier() for _ in range(2)]
    try:
        with twin() as t:
            desc_gpa, drv_gpa, _ = _split(t, size, event_idx=bool(seed & 1))
            heads = []
            d = 0
            for rd, wr in chains:
                descs = [(g + o, n, 0) for g, o, n in rd] + [(g + o, n, WRITE) for g, o, n in wr]
                if not descs or d + len(descs) > size:
                    break
                heads.append(d)
                for j, (a, n, f) in enumerate(descs):
                    last = j == len(descs) - 1
                    t.write_desc(desc_gpa + 16 * (d + j), a, n, f | (0 if last else NEXT), 0 if last else d + j + 1)
                d += len(descs)
            if not heads:
                return
            _publish_split(t, drv_gpa, size, 0, heads)
            n = t.pop(len(heads))
            if n <= 0:
                return
            got = t.both(lambda k, core, s, mem: core.chain_heads(mem, t.batches[k], 0, n, hlen))
            assert len(got[0]) == n * hlen and got[1] == [int(t.batches[1].read_bytes[i]) for i in range(n)]
            lens0 = [random.Random(seed + i).randrange(0, 9000) for i in range(n)]
            ends = []

            def io(k: int, core: Any, s: Any, mem: GuestMemory) -> Any:
                lens = array("I", lens0)
                errs = array("i", [99] * n)
                rc = core.chain_io(s, mem, t.batches[k], 0, n, fds[k], bytes(ops[:n]), array("Q", offs[:n]), skip,
                                   tail, 0xA0, 0xE0, lens, errs, every, calls[k][1].fileno())
                ends.append(os.fstat(fds[k]).st_size)
                return rc, list(lens), list(errs), calls[k][0].consume()

            t.both(io)
            assert ends[0] == ends[1]
            assert os.pread(fds[0], ends[0], 0) == os.pread(fds[1], ends[1], 0)
    finally:
        for fd in fds:
            os.close(fd)
        for a, b in calls:
            a.close()
            b.close()


def test_chain_io_rejects_bad_ranges() -> None:
    with twin() as t:
        desc_gpa, drv_gpa, _ = _split(t, 8)
        t.write_desc(desc_gpa, 0x10000, 16, 0, 0)
        _publish_split(t, drv_gpa, 8, 0, [0])
        assert t.pop(1) == 1
        for k, core in enumerate((PC, NC)):
            with pytest.raises(ValueError):
                core.chain_io(None, t.mems[k], t.batches[k], 0, 2, -1, b"\0\0", array("Q", [0, 0]), 0, 1, 0, 1,
                              array("I", [0, 0]), array("i", [0, 0]), 0, -1)
            with pytest.raises(ValueError):  # a per-chain array too short
                core.chain_io(None, t.mems[k], t.batches[k], 0, 1, -1, b"", array("Q", [0]), 0, 1, 0, 1,
                              array("I", [0]), array("i", [0]), 0, -1)
            with pytest.raises(ValueError):
                core.chain_heads(t.mems[k], t.batches[k], 1, 1, 16)


# ------------------------------------------------------------ Queue API
HDR = struct.Struct("<IIQ")


@pytest.fixture
def image(tmp_path: Path):  # noqa: ANN201
    p = tmp_path / "img"
    p.write_bytes(random.Random(5).randbytes(1 << 20))
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def _reads(driver: RingDriver, sizes: list[list[int]]) -> list[int]:
    tokens = [driver.add([HDR.pack(0, 0, 8 * i)], [*s, 1]) for i, s in enumerate(sizes)]
    driver.publish()
    return tokens


def _plan(iob: Any) -> tuple[bytearray, array, array]:
    n = len(iob)
    ops = bytearray([IoOp.READ] * n)
    offs = array("Q", [HDR.unpack_from(iob.headers, 16 * k)[2] * 512 for k in range(n)])
    return ops, offs, array("I", bytes(4 * n))


@pytest.mark.parametrize("helper", [False, True], ids=["one-thread", "helper-thread"])
def test_reads_mark_exactly_the_pages_they_wrote(image: int, helper: bool) -> None:
    dlog = DirtyLog.anonymous(32)
    with GuestMemory.anonymous([(0, 1 << 20)]) as mem:
        driver = RingDriver.create(mem, 64, data_gpa=0x40000, data_size=0x80000)
        q = driver.make_queue()
        q.set_dirty_log(dlog)
        sizes = [[4096], [512, 1536], [8192], [100 * 512]]
        tokens = _reads(driver, sizes)
        iob = q.pop_io_batch(64, 16)
        assert iob is not None and len(iob) == 4
        assert [HDR.unpack_from(iob.headers, 16 * k)[2] for k in range(4)] == [0, 8, 16, 24]
        ops, offs, lens = _plan(iob)
        call, call_peer = new_event_consumer_and_notifier()
        with ThreadPoolExecutor(1) as pool:
            errs = q.complete_io(iob, image, ops, offs, lens, skip=16, every=2, call_fd=call_peer.fileno(),
                                 helper=pool if helper else None)
        assert call.consume()  # no EVENT_IDX, interrupts enabled: notified
        call.close()
        call_peer.close()
        assert list(errs) == [0] * 4 and list(lens) == [sum(s) + 1 for s in sizes]
        used = dict(driver.get_used())
        expected_pages: set[int] = set()
        for k, tok in enumerate(tokens):
            assert used[tok] == sum(sizes[k]) + 1
            data = driver.read_written(tok, used[tok])
            assert data[:-1] == os.pread(image, sum(sizes[k]), 8 * k * 512) and data[-1] == 0
            for gpa, n in driver.placed[tok]:  # the writable buffers (data, status)
                expected_pages.update(range(gpa // DIRTY_LOG_PAGE_SIZE, (gpa + n - 1) // DIRTY_LOG_PAGE_SIZE + 1))
        marked = {p for p in range(32 * 8) if dlog.view[p // 8] >> (p % 8) & 1}
        assert marked == expected_pages
    dlog.close()


def test_inflight_region_stays_exact_and_resubmits_use_the_batch_path(image: int) -> None:
    with GuestMemory.anonymous([(0, 1 << 20)]) as mem:
        driver = RingDriver.create(mem, 16, data_gpa=0x40000, data_size=0x80000)
        region = bytearray(queue_region_size(16, False))
        q = driver.make_queue()
        q.set_inflight(SplitInflight(memoryview(region), 16))
        tokens = _reads(driver, [[4096]] * 3)
        iob = q.pop_io_batch(2, 16)
        assert iob is not None and len(iob) == 2
        ops, offs, lens = _plan(iob)
        q.complete_io(iob, image, ops, offs, lens, skip=16)
        assert {t for t, _ in driver.get_used()} == set(tokens[:2])
        assert q.pop_io_batch(8, 16) is not None
        # the back-end dies with the third in flight; the restarted one resubmits it
        q2 = driver.make_queue()
        q2.set_vring_base(2)
        q2.set_inflight(SplitInflight(memoryview(region), 16))
        assert q2.resubmit_inflight() == 1
        iob = q2.pop_io_batch(8, 16)
        assert iob is not None and len(iob) == 1 and HDR.unpack_from(iob.headers)[2] == 16
        ops, offs, lens = _plan(iob)
        assert list(q2.complete_io(iob, image, ops, offs, lens, skip=16)) == [0]
        assert dict(driver.get_used()) == {tokens[2]: 4097}
        assert driver.read_written(tokens[2], 4096) == os.pread(image, 4096, 16 * 512)
        q3 = driver.make_queue()
        q3.set_vring_base(3)
        q3.set_inflight(SplitInflight(memoryview(region), 16))
        assert q3.resubmit_inflight() == 0  # nothing left in flight


def test_poll_c_equals_python() -> None:
    with twin() as t:
        _desc_gpa, drv_gpa, _ = _split(t, 8)
        assert t.both(lambda k, core, s, mem: core.poll(s, mem, 20_000)) == 0  # the window ends
        _publish_split(t, drv_gpa, 8, 0, [0])
        assert t.both(lambda k, core, s, mem: core.poll(s, mem, 10**12)) == 1  # at once, not after 1000 s
        t.write(drv_gpa + 2, struct.pack("<H", 100))  # an avail index 100 ahead of a ring of 8
        assert t.both(lambda k, core, s, mem: core.poll(s, mem, 0)) == 1  # as avail_pending: no validation

        def unready(k: int, core: Any, s: Any, mem: GuestMemory) -> int:
            s.ready = False
            return core.poll(s, mem, 1000)  # type: ignore[no-any-return]

        assert t.both(unready) < 0  # NOT_READY, as avail_pending
