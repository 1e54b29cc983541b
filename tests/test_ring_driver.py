"""The driver side (virtqueue/driver.py) against the device side, as a model-based
random walk: whatever the interleaving of add/publish/pop/complete (out of order)
/collect, every request comes back exactly once with the device's bytes, and
notifications are never missed."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostuser.errors import QueueUsageError
from vhostuser.memory import GuestMemory
from vhostuser.virtqueue.driver import PackedDriver, RingDriver, SplitDriver


def run_model(seed: int, packed: bool, size: int, event_idx: bool, steps: int = 300) -> None:
    rng = random.Random(seed)
    mem = GuestMemory.anonymous([(0, 0x80000)])
    drv = RingDriver.create(mem, size, packed=packed, event_idx=event_idx)
    q = drv.make_queue()
    outstanding: dict[int, bytes] = {}  # token -> request payload (driver's view)
    popped: list = []  # device's in-flight chains
    returned = 0
    kicks_pending = False
    for _ in range(steps):
        op = rng.random()
        if op < 0.35:
            n = rng.randrange(1, 3)
            if drv.num_free >= n + 1:
                payload = rng.randbytes(rng.randrange(1, 20))
                tok = drv.add([payload], [len(payload)] * n if n > 1 else [len(payload)],
                              indirect=rng.random() < 0.25)
                assert tok not in outstanding
                outstanding[tok] = payload
        elif op < 0.5:
            drv.publish()
            kicks_pending = drv.kick_needed() or kicks_pending
        elif op < 0.7:
            chains = q.pop_batch(rng.randrange(1, 4))
            popped.extend(chains)
        elif op < 0.9 and popped:
            rng.shuffle(popped)
            k = rng.randrange(1, len(popped) + 1)
            done, popped = popped[:k], popped[k:]
            for c in done:
                data = c.reader().read()
                c.writer().write(data[::-1])
            q.add_used_batch([(c, c.readable_len) for c in done])
            q.needs_notification()
        else:
            for tok, ln in drv.get_used():
                assert tok in outstanding
                payload = outstanding.pop(tok)
                assert ln == len(payload)
                assert drv.read_written(tok, ln) == payload[::-1]
                returned += 1
    # drain: publish, and if the device asked not to be kicked it must still find the work
    drv.publish()
    drv.kick_needed()
    while True:
        popped.extend(q.pop_batch(8))
        if not popped:
            break
        q.add_used_batch([(c, c.writer().write(c.reader().read()[::-1])) for c in popped])
        popped = []
    for tok, ln in drv.get_used():
        outstanding.pop(tok)
        returned += 1
    assert outstanding == {}
    assert drv.num_free == size
    q.set_ready(False)
    mem.close()
    assert returned > 0 or steps < 50


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["noevt", "evt"])
@pytest.mark.parametrize("size", [2, 8, 64])
def test_model_walk(packed: bool, event_idx: bool, size: int) -> None:
    for seed in range(3):
        run_model(seed, packed, size, event_idx)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), packed=st.booleans(), size=st.sampled_from([2, 4, 16, 3, 5]), evt=st.booleans())
def test_model_walk_hypothesis(seed: int, packed: bool, size: int, evt: bool) -> None:
    if not packed and size & (size - 1):
        size = 4
    run_model(seed, packed, size, evt, steps=150)


def test_no_missed_kick_with_event_idx() -> None:
    """Device processes, re-enables notifications; driver adds: a kick must come
    whenever the device would otherwise sleep with work pending."""
    for packed in (False, True):
        mem = GuestMemory.anonymous([(0, 0x40000)])
        drv = RingDriver.create(mem, 8, packed=packed, event_idx=True)
        q = drv.make_queue()
        rng = random.Random(5)
        sleeping = True
        for _ in range(500):
            if drv.num_free >= 1 and rng.random() < 0.6:
                drv.add([b"x"])
                drv.publish()
                if drv.kick_needed():
                    sleeping = False
            if not sleeping:
                q.disable_notification()
                while True:
                    chains = q.pop_batch(4)
                    if chains:
                        q.add_used_batch([(c, 0) for c in chains])
                        drv.get_used()
                        continue
                    if not q.enable_notification():
                        break
                sleeping = True
            # invariant: a sleeping device never leaves published work behind
            if sleeping:
                assert not q.has_available()
        q.set_ready(False)
        mem.close()


def test_driver_refuses_overfill() -> None:
    mem = GuestMemory.anonymous([(0, 0x40000)])
    for packed in (False, True):
        drv = RingDriver.create(mem, 2, packed=packed)
        drv.add([b"a"], [1])
        with pytest.raises(QueueUsageError):
            drv.add([b"b"])
        with pytest.raises(QueueUsageError):
            drv.add_buffers([])
        assert isinstance(drv, PackedDriver if packed else SplitDriver)
    mem.close()
