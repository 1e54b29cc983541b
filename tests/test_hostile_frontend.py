"""Issue 10: what a hostile front-end sends must not crash, wedge or exhaust
the daemon (inflight sizes, hooks, reset, the dirty log's lifetime...)."""
from __future__ import annotations

import os
import threading
import time
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
from vhostuser.memory import DirtyLog, GuestMemory, MemoryRegion
from vhostuser.sys_util.shm import create_shm_fd
from vhostuser.testing import EchoBackend, FrontendOptions, MockFrontend
from vhostuser.testing.frontend import DEFAULT_PROTOCOL_FEATURES
from vhostuser.vring import VringState


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


SMALL = FrontendOptions(queue_size=16, memory=((0, 1 << 20),), data_size=64 * 1024)


class BadHooks(EchoBackend):
    """Hooks that always raise."""

    def vring_started(self, index: int, vring: VringState) -> None:
        super().vring_started(index, vring)
        raise RuntimeError("vring_started bug")

    def vring_stopped(self, index: int, vring: VringState) -> None:
        super().vring_stopped(index, vring)
        raise RuntimeError("vring_stopped bug")


def test_failing_hooks_from_set_vring_enable_are_contained(serve_backend) -> None:
    backend = BadHooks(1)
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL) as fe:
        assert fe.request(0, [b"a"], [1]).data == b"a"
        fe.enable(0, False)  # vring_stopped raises: logged, SET_VRING_ENABLE still acked 0
        fe.enable(0, True)  # vring_started raises: likewise
        assert fe.request(0, [b"b"], [1]).data == b"b"
        assert [c for c, _ in backend.hook_calls] == ["started", "stopped", "started"]


def test_reset_device_resets_the_dispatchers_negotiation_state(serve_backend) -> None:
    backend = EchoBackend(1)
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL) as fe:
        fe.frontend.reset_device()
        fe.sync()
        daemon = serve_backend.daemon_of(backend)
        assert daemon.handler.acked_features == 0
        assert daemon.connection.state.features_acked == 0  # one truth: both forgot the features
        assert daemon.connection.state.owner  # ownership is kept (the spec)


def test_a_new_dirty_log_is_used_at_once_and_the_old_one_outlives_its_users(serve_backend) -> None:
    backend = EchoBackend(1)
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL.replace(event_idx=True)) as fe:
        fe.enable_dirty_log()
        assert fe.request(0, [b"x"], [1]).data == b"x"
        old_log, old_fd = fe.dirty_log, fe._log_fd
        fe.dirty_log = None
        new_log = fe.enable_dirty_log()  # SET_LOG_BASE with another log while the ring runs
        assert old_log is not None and old_fd is not None
        old_log.close()
        os.close(old_fd)
        handler = serve_backend.daemon_of(backend).handler
        vring = handler.vrings[0]
        with vring.lock:  # every running queue logs into the new log before its next add_used
            assert vring.queue is not None and vring.queue._st.log is handler.dirty_log
        new_log.clear()
        assert fe.request(0, [b"y"], [1]).data == b"y"
        assert new_log.is_dirty(fe.driver(0).device_gpa)


def test_a_closed_dirty_log_stays_mapped_while_a_snapshot_uses_it() -> None:
    mem = GuestMemory([MemoryRegion.anonymous(0, 0x10000)])
    dlog = DirtyLog.anonymous(8)
    mem.set_dirty_log(dlog)
    dlog.close()  # the owner lets go; the snapshot still refers to it
    dlog.mark(0x1000, 1)
    assert dlog.is_dirty(0x1000)
    mem.close()  # the last user: now it is unmapped
    assert dlog._closed


class HeldEcho(EchoBackend):
    """Echo that waits for ``go`` inside handle_event (the worker holds its lock)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.entered = threading.Event()
        self.go = threading.Event()

    def handle_event(self, device_event, evset, vrings, thread_id):  # noqa: ANN001
        self.entered.set()
        self.go.wait(10)
        super().handle_event(device_event, evset, vrings, thread_id)


def test_replacing_the_backend_channel_does_not_fail_a_ring_mid_vring_call(serve_backend) -> None:
    backend = HeldEcho()
    path = serve_backend(backend)
    opts = SMALL.replace(protocol_features=int(DEFAULT_PROTOCOL_FEATURES | PF.INBAND_NOTIFICATIONS),
                         event_idx=False)
    with MockFrontend.connect(path, opts) as fe:
        fe.frontend.set_vring_call(0, None)  # completions are signalled with in-band VRING_CALL
        fe.add(0, [b"ping"], [4])
        fe.publish(0, kick=False)
        fe.vring(0).kick.notify()  # by the kick fd: the worker thread runs the device
        assert backend.entered.wait(10)  # the worker is inside the device, holding its lock
        replacing = threading.Thread(target=lambda: fe.frontend.open_backend_channel(fe.handler).close())
        replacing.start()
        time.sleep(0.3)  # SET_BACKEND_REQ_FD is being handled meanwhile
        backend.go.set()  # the device now signals on the channel it was given
        replacing.join(10)
        vring = serve_backend.daemon_of(backend).handler.vrings[0]
        with vring.lock:
            assert vring.failed is None, vring.failed


def test_failing_a_ring_whose_err_pipe_reader_is_gone_does_not_kill_the_worker() -> None:
    """Pipe notifiers (macOS/BSD): writing to a pipe whose reader closed raises
    EPIPE; failing the ring must still not raise (it killed the worker thread)."""
    from vhostuser.sys_util.event import new_event_consumer_and_notifier

    consumer, notifier = new_event_consumer_and_notifier("pipe")
    consumer.close()  # the front-end went away
    vring = VringState(0, 16, threading.RLock())
    vring.err = notifier
    vring.fail(RuntimeError("hostile ring"))  # logged, not raised
    assert isinstance(vring.failed, RuntimeError)
    notifier.close()
