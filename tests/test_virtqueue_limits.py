"""The largest queue the spec allows (32768 entries) works in both layouts, with
the 16-bit indices wrapping; one entry more is refused."""
from __future__ import annotations

import pytest

from vhostuser.errors import QueueError, QueueUsageError
from vhostuser.memory import GuestMemory
from vhostuser.virtqueue import Queue
from vhostuser.virtqueue.defs import MAX_QUEUE_SIZE
from vhostuser.virtqueue.driver import RingDriver


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_32768_entry_queue_runs_past_index_wrap(packed: bool) -> None:
    assert MAX_QUEUE_SIZE == 32768
    with GuestMemory.anonymous([(0, 8 << 20)]) as mem:
        driver = RingDriver.create(mem, MAX_QUEUE_SIZE, packed=packed, event_idx=True)
        q = driver.make_queue()
        done = 0
        # 5 rounds of 16000 two-descriptor chains (a full ring holds 16384): the split
        # ring's u16 indices wrap (65536) and the packed wrap counters flip on the way
        for round_ in range(5):
            tokens = [driver.add([bytes([round_ % 256])], [1]) for _ in range(16000)]
            driver.publish()
            got = []
            while chains := q.pop_batch(1024):
                got += chains
                q.add_used_batch([(c, 1) for c in chains])
            assert len(got) == len(tokens)
            assert [c.reader().read_all() for c in got[:3]] == [bytes([round_ % 256])] * 3
            assert len(driver.get_used()) == len(tokens)
            done += len(tokens)
        assert done == 80000


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_larger_queue_is_refused(packed: bool) -> None:
    with pytest.raises((QueueUsageError, QueueError)):
        Queue(None, MAX_QUEUE_SIZE + 1, packed=packed)
