"""Issue 10: what a hostile front-end sends must not crash, wedge or exhaust
the daemon (inflight sizes, hooks, reset, the dirty log's lifetime...)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.backend import VhostUserBackend
from vhostuser.daemon import VhostUserDaemon
from vhostuser.errors import Disconnected, RequestFailed
from vhostuser.frontend import Frontend
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.protocol.payloads import Inflight
from vhostuser.sys_util.shm import create_shm_fd


class Idle(VhostUserBackend):
    num_queues = 2
    max_queue_size = 256
    supports_inflight = True

    def handle_event(self, device_event, evset, vrings, thread_id):  # noqa: ANN001
        pass


@pytest.fixture
def connect(tmp_path: Path) -> Iterator:
    daemons: list[VhostUserDaemon] = []

    def start(backend: VhostUserBackend, protocol: PF = PF.REPLY_ACK | PF.INFLIGHT_SHMFD) -> Frontend:
        daemon = VhostUserDaemon("hostile", backend)
        daemons.append(daemon)
        path = str(tmp_path / f"h{len(daemons)}.sock")
        daemon.start_server(path)
        fe = Frontend.connect(path, reply_timeout=10.0)
        fe.get_features()
        pf = fe.get_protocol_features()
        fe.set_protocol_features(pf & protocol)
        fe.set_owner()
        fe.set_features(VF.VERSION_1 | VF.PROTOCOL_FEATURES)
        return fe

    yield start
    for d in daemons:
        d.request_shutdown()
        assert d.wait(5)


@pytest.mark.parametrize("queues,size", [(65535, 32768), (3, 256), (2, 257), (0, 128), (2, 0)])
def test_get_inflight_fd_is_bounded_by_the_device(connect, queues: int, size: int) -> None:
    fe = connect(Idle())
    with pytest.raises(Disconnected):  # GET_INFLIGHT_FD's reply cannot say "failed": dropped
        fe.get_inflight_fd(queues, size)
    fe.close()
    fe = connect(Idle())  # (a fresh daemon; the point is that nothing was allocated or mapped)
    inflight, fd = fe.get_inflight_fd(2, 256)  # the device's own geometry is fine
    os.close(fd)
    assert inflight.num_queues == 2 and inflight.queue_size == 256
    fe.close()


def test_set_inflight_fd_too_small_for_its_queues_is_refused(connect) -> None:
    fe = connect(Idle())
    inflight, fd = fe.get_inflight_fd(2, 256)
    try:
        with pytest.raises(RequestFailed):  # the area holds 2 queues, not 2 of a larger size
            fe.set_inflight_fd(Inflight(inflight.mmap_size // 2, 0, 2, 256), os.dup(fd))
        small = create_shm_fd(4096)
        with pytest.raises(RequestFailed):  # the header says big enough, the fd is not
            fe.set_inflight_fd(Inflight(inflight.mmap_size, 0, 2, 256), small)
        fe.set_inflight_fd(inflight, os.dup(fd))  # the real one is accepted
    finally:
        os.close(fd)
    assert fe.get_features()
    fe.close()
