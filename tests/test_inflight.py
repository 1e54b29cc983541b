"""Inflight I/O tracking (INFLIGHT_SHMFD): a back-end that crashes with requests
in flight is replaced by one that resubmits exactly those, oldest first, even
when requests completed out of order; a crash in the middle of publishing a
batch of completions neither loses nor repeats a request.  Split and packed."""
from __future__ import annotations

import pytest

from vhostuser.memory import GuestMemory
from vhostuser.virtqueue import Queue
from vhostuser.virtqueue.driver import RingDriver
from vhostuser.virtqueue.inflight import PackedInflight, SplitInflight, queue_region_size

SIZE = 8


class Crash(Exception):
    """Stands for the back-end process dying at that instant."""


@pytest.fixture(params=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return request.param == "packed"


@pytest.fixture
def mem():
    with GuestMemory.anonymous([(0, 1 << 20)]) as m:
        yield m


def tracker(region: bytearray, packed: bool):
    return (PackedInflight if packed else SplitInflight)(memoryview(region), SIZE)


def restarted_queue(driver: RingDriver, region: bytearray, packed: bool, used_base: int) -> Queue:
    """A new back-end: the ring as QEMU restores it after a crash (SET_VRING_BASE
    from the used position) and the old back-end's inflight region."""
    q = driver.make_queue()
    q.set_vring_base(used_base)
    q.set_inflight(tracker(region, packed))
    return q


def requests(driver: RingDriver, n: int, indirect: bool = False) -> dict[int, bytes]:
    tokens = {}
    for i in range(n):
        data = f"request {i}".encode()
        tokens[driver.add([data], [16], indirect=indirect)] = data
    driver.publish()
    return tokens


def test_out_of_order_completions_then_crash_resubmits_the_rest_in_order(mem, packed: bool) -> None:
    driver = RingDriver.create(mem, SIZE, packed=packed)
    region = bytearray(queue_region_size(SIZE, packed))
    q = driver.make_queue()
    q.set_inflight(tracker(region, packed))
    sent = requests(driver, 4, indirect=packed)
    chains = q.pop_batch(8)
    assert [c.reader().read_all() for c in chains] == list(sent.values())
    q.add_used(chains[2], 3)  # completes out of order
    q.add_used(chains[0], 1)
    done = dict(driver.get_used())
    assert set(done) == {chains[2].head_index, chains[0].head_index}

    # crash; QEMU restarts the ring from the used position
    base = 2 if not packed else (2 | 1 << 15) << 16 | (2 | 1 << 15)
    q2 = restarted_queue(driver, region, packed, base)
    assert q2.resubmit_inflight() == 2
    again = q2.pop_batch(8)
    assert [c.reader().read_all() for c in again] == [b"request 1", b"request 3"]
    for c in again:
        c.writer().write(b"ok")
        q2.add_used(c, 2)
    assert dict(driver.get_used()) == {chains[1].head_index: 2, chains[3].head_index: 2}
    # and the ring goes on normally
    more = requests(driver, 3)
    got = q2.pop_batch(8)
    assert [c.reader().read_all() for c in got] == list(more.values())
    q2.add_used_batch([(c, 0) for c in got])
    assert len(driver.get_used()) == 3
    # yet another restart now: nothing is in flight, nothing is resubmitted
    base = 7 if not packed else (7 | 1 << 15) << 16 | (7 | 1 << 15)
    q3 = restarted_queue(driver, region, packed, base)
    assert q3.resubmit_inflight() == 0
    assert q3.pop_batch(8) == []


def test_a_crash_while_publishing_completions_neither_loses_nor_repeats(mem, packed: bool) -> None:
    driver = RingDriver.create(mem, SIZE, packed=packed)
    region = bytearray(queue_region_size(SIZE, packed))
    q = driver.make_queue()
    t = tracker(region, packed)
    q.set_inflight(t)
    requests(driver, 3)
    chains = q.pop_batch(8)

    def die(*args, **kw):  # noqa: ANN002, ANN003
        raise Crash

    t.after_used = die  # the used entries reach the ring, then the back-end dies
    with pytest.raises(Crash):
        q.add_used_batch([(chains[0], 0), (chains[1], 0)])
    assert len(driver.get_used()) == 2

    base = 2 if not packed else (2 | 1 << 15) << 16 | (2 | 1 << 15)
    q2 = restarted_queue(driver, region, packed, base)
    assert q2.resubmit_inflight() == 1
    (again,) = q2.pop_batch(8)
    assert again.head_index == chains[2].head_index
    q2.add_used(again, 0)
    assert driver.get_used() == [(chains[2].head_index, 0)]


def test_a_crash_before_completions_reach_the_ring_resubmits_them(mem, packed: bool) -> None:
    driver = RingDriver.create(mem, SIZE, packed=packed)
    region = bytearray(queue_region_size(SIZE, packed))
    q = driver.make_queue()
    t = tracker(region, packed)
    q.set_inflight(t)
    requests(driver, 2)
    chains = q.pop_batch(8)
    real_before = t.before_used

    def before_then_die(*args, **kw):  # noqa: ANN002, ANN003
        real_before(*args, **kw)
        raise Crash

    t.before_used = before_then_die  # recorded in the region, not yet on the ring
    with pytest.raises(Crash):
        q.add_used_batch([(chains[0], 0), (chains[1], 0)])
    assert driver.get_used() == []
    base = 0 if not packed else (1 << 15) << 16 | 1 << 15
    q2 = restarted_queue(driver, region, packed, base)
    assert q2.resubmit_inflight() == 2
    again = q2.pop_batch(8)
    assert [c.head_index for c in again] == [c.head_index for c in chains]


def test_a_fresh_region_is_initialised_and_a_foreign_one_rejected(packed: bool) -> None:
    region = bytearray(queue_region_size(SIZE, packed))
    tracker(region, packed)
    assert any(region)  # version and size written
    with pytest.raises(ValueError):
        (PackedInflight if packed else SplitInflight)(memoryview(region), SIZE * 2)


def test_a_rejected_completion_leaves_the_region_consistent(mem, packed: bool) -> None:
    """A batch the ring core refuses (more completions than requests in flight)
    reaches neither the ring nor, half-done, the inflight region."""
    from vhostuser.errors import QueueUsageError

    driver = RingDriver.create(mem, SIZE, packed=packed)
    region = bytearray(queue_region_size(SIZE, packed))
    q = driver.make_queue()
    q.set_inflight(tracker(region, packed))
    requests(driver, 2)
    chains = q.pop_batch(8)
    before = bytes(region)
    with pytest.raises(QueueUsageError):
        q.add_used_batch([(chains[0], 0), (chains[1], 0), (chains[0], 0)])
    assert driver.get_used() == []
    if packed:  # free head and used position as before (split keeps no such state)
        hdr = PackedInflight.HEADER_SIZE
        assert bytes(region[:hdr]) == before[:hdr]
    # after a crash now, both requests are still in flight
    base = 0 if not packed else (1 << 15) << 16 | 1 << 15
    assert restarted_queue(driver, bytearray(region), packed, base).resubmit_inflight() == 2
    # and the queue goes on normally
    q.add_used_batch([(chains[0], 0), (chains[1], 0)])
    assert len(driver.get_used()) == 2
    base = 2 if not packed else (2 | 1 << 15) << 16 | (2 | 1 << 15)
    assert restarted_queue(driver, region, packed, base).resubmit_inflight() == 0
