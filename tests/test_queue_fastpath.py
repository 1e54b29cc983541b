"""The Queue-level fast paths give exactly what the general paths give.

``Queue.add_used_batch`` hands runs of consecutive chains of one pop to the core
straight from the batch; ``Reader.readinto`` copies straight into the caller's
buffer.  Each is compared with the general path (forced) on both cores: results,
exceptions and messages, queue state, guest memory and the dirty bitmap.
"""
from __future__ import annotations

import array
import random
from typing import Any

import pytest
from conftest import native_required

from vhostuser.memory import DirtyLog, GuestMemory
from vhostuser.virtqueue import Queue, _pycore
from vhostuser.virtqueue import chain as chain_mod
from vhostuser.virtqueue import queue as queue_mod
from vhostuser.virtqueue.driver import RingDriver

try:
    from vhostuser.virtqueue import _nativecore
except ImportError:  # pragma: no cover - extension not built
    if native_required():
        raise
    _nativecore = None  # type: ignore[assignment]

CORES = [_pycore] + ([_nativecore] if _nativecore is not None else [])


def _setup(core: Any, packed: bool, seed: int, log: bool, fill: bool = True) -> tuple[GuestMemory, Any, Queue, list[Any]]:
    mp = pytest.MonkeyPatch()
    mp.setattr(queue_mod, "get_core", lambda: core)
    mp.setattr(chain_mod, "get_core", lambda: core)
    try:
        mem = GuestMemory.anonymous([(0, 0x40000), (0x40000, 0x40000)])
        drv = RingDriver.create(mem, 32, packed=packed)
        q = drv.make_queue()
        if log:
            q.set_dirty_log(DirtyLog.for_memory(mem))
            q.set_used_log(drv.device_gpa)
        rng = random.Random(seed)
        for _ in range(12 if fill else 0):
            drv.add([b"r" * rng.randrange(1, 9)], [rng.randrange(1, 64) for _ in range(rng.randrange(1, 3))])
        drv.publish()
        chains = q.pop_batch(5) + q.pop_batch(7) if fill else []
    finally:
        mp.undo()
    return mem, drv, q, chains


def _snapshot(mem: GuestMemory, q: Queue) -> tuple[Any, ...]:
    st = q.state
    log = q.dirty_log
    return (
        mem.read(0, 0x80000),
        bytes(log._view) if log is not None else None,
        st.next_used, st.used_wrap, st.inflight, st.num_added,
    )  # fmt: skip


def _outcome(fn: Any) -> tuple[Any, Any]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001
        return None, (type(exc), str(exc))


# How the entries are picked from the 12 popped chains (5 + 7, two pops).
PICKS = {
    "whole first pop": lambda cs: [(c, 3) for c in cs[:5]],
    "whole second pop": lambda cs: [(c, 0) for c in cs[5:]],
    "run from the middle": lambda cs: [(c, 7) for c in cs[6:10]],
    "one chain": lambda cs: [(cs[7], 11)],
    "one chain, tuple": lambda cs: ((cs[2], 0),),
    "across pops": lambda cs: [(c, 1) for c in cs[3:8]],
    "indices in a row, two pops": lambda cs: [(cs[0], 1), (cs[6], 1), (cs[2], 1)],
    "reversed": lambda cs: [(c, 1) for c in reversed(cs[:5])],
    "duplicate": lambda cs: [(cs[0], 1), (cs[0], 1)],
    "gap": lambda cs: [(cs[0], 1), (cs[2], 1)],
    "len too big": lambda cs: [(c, 1 << 32) for c in cs[:3]],
    "negative len": lambda cs: [(cs[0], 0), (cs[1], -1)],
    "one negative len": lambda cs: [(cs[4], -1)],
    "bool len": lambda cs: [(cs[0], True)],
    "float len": lambda cs: [(cs[0], 1.0), (cs[1], 2.0)],
    "head index": lambda cs: [(cs[0].head_index, 0), (cs[1], 0)],
    "not a pair": lambda cs: [(cs[0], 0, 1), (cs[1], 0)],
    "mixed pair sizes": lambda cs: [(cs[0], 0), (cs[1], 0, 5)],
    "not iterable": lambda cs: [cs[0]],
    "empty": lambda cs: [],
}


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.NAME)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("log", [False, True], ids=["", "log"])
@pytest.mark.parametrize("pick", sorted(PICKS))
def test_add_used_batch_fast_path_matches_the_general_path(core: Any, packed: bool, log: bool, pick: str) -> None:
    results = []
    for fast in (True, False):
        mem, drv, q, chains = _setup(core, packed, 7, log)
        try:
            if not fast:
                q._add_used_run = lambda entries: False  # type: ignore[method-assign]
            out = _outcome(lambda: q.add_used_batch(PICKS[pick](chains)))
            # and the rest of the chains afterwards, one by one
            rest = [_outcome(lambda c=c: q.add_used(c, 2)) for c in chains]
            results.append((out, rest, _snapshot(mem, q)))
            q.set_ready(False)
        finally:
            mem.close()
    assert results[0] == results[1]


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.NAME)
def test_readinto_matches_read(core: Any) -> None:
    mem, drv, q, _ = _setup(core, False, 1, False, fill=False)
    try:
        drv.add([b"0123", b"456789abc", b"defgh"], [4])
        drv.publish()
        (c,) = q.pop_batch(1)
        expected = b"0123456789abcdefgh"
        r = c.reader()
        buf = bytearray(5)
        assert r.readinto(buf) == 5 and buf == expected[:5]
        big = bytearray(b"x" * 32)
        assert r.readinto(memoryview(big)[2:9]) == 7 and big[2:9] == expected[5:12] and big[:2] == b"xx"
        arr = array.array("H", [0xFFFF] * 4)  # 8 bytes, 6 left
        assert r.readinto(arr) == 6 and arr.tobytes()[:6] == expected[12:] and arr.tobytes()[6:] == b"\xff\xff"
        assert r.readinto(bytearray(3)) == 0 and r.bytes_read == len(expected)
        r2 = c.reader()
        with pytest.raises(TypeError):
            r2.readinto(b"abcd")  # read-only: the bytes are read, then the store fails, as before
        assert r2.bytes_read == 4
        q.add_used(c, 0)
        q.set_ready(False)
    finally:
        mem.close()
