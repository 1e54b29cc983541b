"""The mock front-end itself: QEMU's message order, each option, the back-end
channel, callbacks, the load generator, fd hygiene."""
from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping

import pytest
from conftest import check_no_fd_leak

from vhostuser.backend import VhostUserBackend
from vhostuser.backend_handler import VhostUserHandler
from vhostuser.daemon import VhostUserDaemon
from vhostuser.errors import MockFrontendError, RequestFailed
from vhostuser.protocol.message import VhostUserProtocolFeatures as PF
from vhostuser.protocol.message import VirtioFeatures as VF
from vhostuser.protocol.payloads import Inflight
from vhostuser.protocol.requests import FRONTEND_REQUESTS
from vhostuser.sys_util import create_shm_fd
from vhostuser.testing import EchoBackend, FrontendOptions, GuestRam, MockFrontend
from vhostuser.testing.frontend import run_load, run_load_in_subprocess
from vhostuser.vring import VringState

SMALL = FrontendOptions(queue_size=16, memory=((0, 1 << 20), (2 << 20, 1 << 20)), data_size=64 * 1024)


def record_requests(daemon: VhostUserDaemon) -> list[str]:
    """Record the name of every request the daemon's handler is asked to apply."""
    seen: list[str] = []
    depth = [0]  # the handler calls some of its own methods: record the outermost only
    handler = daemon.handler
    for spec in FRONTEND_REQUESTS.values():
        method = getattr(handler, spec.method, None)
        if method is None:
            continue

        def wrapper(*args, _m=method, _n=spec.name, **kw):  # noqa: ANN002, ANN003
            if not depth[0]:
                seen.append(_n)
            depth[0] += 1
            try:
                return _m(*args, **kw)
            finally:
                depth[0] -= 1

        setattr(handler, spec.method, wrapper)
    return seen


# ------------------------------------------------------------- message order
def test_bring_up_follows_qemu_with_mem_slots(serve_backend) -> None:
    backend = EchoBackend(1, config_space=bytes(range(16)))
    path = serve_backend(backend)
    seen = record_requests(serve_backend.daemon_of(backend))
    with MockFrontend.connect(path, SMALL.replace(config_size=16, set_features_twice=True)) as fe:
        assert fe.config == bytes(range(16))
        fe.stop()
        order = list(seen)  # (a disconnect resets the device: not a request)
    # qemu72-blk-qsd.trace
    assert order == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES",
        "SET_VRING_CALL", "SET_VRING_ERR", "GET_CONFIG",
        "SET_VRING_CALL", "SET_FEATURES", "SET_VRING_CALL", "SET_FEATURES",
        "ADD_MEM_REG", "ADD_MEM_REG",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_ENABLE",
        "SET_VRING_ENABLE", "GET_VRING_BASE",
    ]


def test_bring_up_follows_qemu_with_set_mem_table(serve_backend) -> None:
    backend = EchoBackend(2)
    path = serve_backend(backend)
    seen = record_requests(serve_backend.daemon_of(backend))
    with MockFrontend.connect(path, SMALL.replace(mem_slots=False, backend_channel=False)) as fe:
        fe.stop()
        order = list(seen)
    # qemu72-vsock-packed-start.trace (2 rings, SET_MEM_TABLE)
    assert order == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
        "SET_OWNER", "GET_FEATURES",
        "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR",
        "SET_VRING_CALL", "SET_VRING_CALL", "SET_FEATURES", "SET_MEM_TABLE",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
        "SET_VRING_ENABLE", "SET_VRING_ENABLE",
        "SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE", "GET_VRING_BASE",
    ]


def test_reconnect_handshake_has_no_get_config_and_restores_used_index(serve_backend) -> None:
    backend = EchoBackend(1, config_space=b"\x01" * 8)
    path = serve_backend(backend)
    daemon = serve_backend.daemon_of(backend)
    with MockFrontend.connect(path, SMALL.replace(config_size=8)) as fe:
        fe.transfer(0, [([b"abc"], [3])] * 24)
        seen = record_requests(daemon)
        bases: list[int] = []
        orig = daemon.handler.set_vring_base
        daemon.handler.set_vring_base = lambda i, n: (bases.append(n), orig(i, n))[1]  # type: ignore[method-assign]
        fe.reconnect()
        fe.sync()
    assert "GET_CONFIG" not in seen
    assert bases == [24]  # as in qemu72-blk-qsd-reconnect.trace


# ------------------------------------------------------------------- options
def test_no_reply_ack_no_mq(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(reply_ack=False, mq=False)) as fe:
        assert not fe.protocol_features & (PF.REPLY_ACK | PF.MQ)
        assert fe.queue_num is None and len(fe.vrings) == 1
        assert fe.request(0, [b"noack"], [5]).data == b"noack"


def test_without_protocol_features_rings_start_enabled(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(protocol=False)) as fe:
        assert not fe.acked_features & VF.PROTOCOL_FEATURES
        assert fe.protocol_features == 0
        assert fe.request(0, [b"legacy"], [6]).data == b"legacy"
        assert fe.stop() == [1]


def test_queue_sizes_per_queue_and_separate_fds(serve_backend) -> None:
    backend = EchoBackend(3)
    path = serve_backend(backend)
    opts = SMALL.replace(queue_size=[8, 32, 128], single_fd=False, num_queues=3)
    with MockFrontend.connect(path, opts) as fe:
        assert [v.size for v in fe.vrings] == [8, 32, 128]
        assert [vr.size for vr in serve_backend.daemon_of(backend).handler.vrings] == [8, 32, 128]
        for q in range(3):
            assert fe.request(q, [b"q%d" % q], [2]).data == b"q%d" % q


def test_memory_layout_hole_and_uvas(serve_backend) -> None:
    backend = EchoBackend(2)
    path = serve_backend(backend)
    layout = ((0, 1 << 20), (4 << 20, 2 << 20))
    with MockFrontend.connect(path, SMALL.replace(memory=layout)) as fe:
        regions = serve_backend.daemon_of(backend).handler.memory.regions
        assert [(r.guest_phys_addr, r.memory_size) for r in regions] == list(layout)
        assert all(r.userspace_addr != r.guest_phys_addr for r in regions)
        assert {fe.vring(0).ring_gpa < (1 << 20), fe.vring(1).ring_gpa >= (4 << 20)} == {True}
        assert fe.request(1, [b"above the hole"], [14]).data == b"above the hole"


def test_more_queues_than_the_backend_has(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with pytest.raises(MockFrontendError, match="queues"):
        MockFrontend.connect(path, SMALL.replace(num_queues=2))


class NoEventIdx(EchoBackend):
    def features(self) -> int:
        return super().features() & ~VF.RING_EVENT_IDX & ~VF.RING_PACKED


def test_required_feature_not_offered(no_fd_leak, serve_backend) -> None:
    path = serve_backend(NoEventIdx(1))
    with pytest.raises(MockFrontendError, match="RING_EVENT_IDX"):
        MockFrontend.connect(path, SMALL.replace(event_idx=True))
    with pytest.raises(MockFrontendError, match="RING_PACKED"):
        MockFrontend.connect(path, SMALL.replace(packed=True))
    with MockFrontend.connect(path, SMALL) as fe:  # None: used if offered
        assert not fe.event_idx


def test_indirect_needs_negotiation(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(indirect=False)) as fe:
        with pytest.raises(MockFrontendError, match="indirect"):
            fe.add(0, [b"x"], [1], indirect=True)


def test_forced_features_like_qemu_rng(serve_backend) -> None:
    path = serve_backend(NoEventIdx(1))
    with MockFrontend.connect(path, SMALL.replace(force_features=VF.RING_EVENT_IDX)) as fe:
        assert fe.event_idx
        assert fe.request(0, [b"forced"], [6]).data == b"forced"


# ----------------------------------------------------------- back-end channel
class Chatty(EchoBackend):
    """Sends back-end requests when asked through its queue."""

    def __init__(self, num_queues: int = 1) -> None:
        super().__init__(num_queues, config_space=bytes(8))  # a config space: CONFIG_CHANGE_MSG allowed

    def protocol_features(self) -> PF:
        return super().protocol_features() | PF.SHARED_OBJECT

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState], thread_id: int) -> None:
        vring = vrings[device_event]
        for chain in vring.pop_batch():
            cmd = chain.reader().read_all()
            if cmd == b"config":
                self.backend_channel.config_change()
            elif cmd.startswith(b"share "):
                self.backend_channel.shared_object_add(uuid.UUID(cmd[6:].decode()))
            vring.add_used(chain, chain.writer().write(b"done"))
        vring.signal_used_queue()


def test_backend_channel_requests(serve_backend) -> None:
    path = serve_backend(Chatty(1))
    with MockFrontend.connect(path, SMALL) as fe:
        assert fe.protocol_features & PF.BACKEND_REQ
        assert fe.request(0, [b"config"], [4]).data == b"done"
        assert fe.handler.config_changed.wait(5)
        u = uuid.uuid4()
        fe.request(0, [b"share %s" % str(u).encode()], [4])
        assert u in fe.handler.shared_objects  # acked before the device went on (REPLY_ACK)
        assert fe.handler.log == ["CONFIG_CHANGE_MSG", f"SHARED_OBJECT_ADD {u}"]


# -------------------------------------------------------------- callbacks
def test_used_callbacks(serve_backend) -> None:
    path = serve_backend(EchoBackend(2))
    got: dict[int, list[bytes]] = {0: [], 1: []}
    with MockFrontend.connect(path, SMALL) as fe:
        for q in (0, 1):
            fe.on_used(q, lambda i, used: got[i].extend(u.data for u in used))
            for k in range(3):
                fe.add(q, [b"%d-%d" % (q, k)], [3])
            fe.publish(q)
        for _ in range(100):  # bounded
            if sum(map(len, got.values())) == 6:
                break
            fe.process_events(1.0)
    assert sorted(got[0]) == [b"0-0", b"0-1", b"0-2"]
    assert sorted(got[1]) == [b"1-0", b"1-1", b"1-2"]


def test_wait_used_times_out(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL) as fe:
        with pytest.raises(TimeoutError):
            fe.wait_used(0, timeout=0.05)


# ------------------------------------------------------------ inflight area
class InflightHandler(VhostUserHandler):
    """The daemon's handler plus GET/SET_INFLIGHT_FD (the daemon has none yet)."""

    def __init__(self, backend: VhostUserBackend) -> None:
        super().__init__(backend)
        self.inflight_calls: list[tuple[str, int, int]] = []

    def get_protocol_features(self) -> int:
        return super().get_protocol_features() | PF.INFLIGHT_SHMFD

    def get_inflight_fd(self, num_queues: int, queue_size: int):  # noqa: ANN201
        self.inflight_calls.append(("get", num_queues, queue_size))
        size = 4096
        return Inflight(mmap_size=size, mmap_offset=0, num_queues=num_queues, queue_size=queue_size), \
            create_shm_fd(size, "inflight")

    def set_inflight_fd(self, inflight: Inflight, fd: int) -> None:
        self.inflight_calls.append(("set", inflight.num_queues, inflight.queue_size))
        os.close(fd)


def test_inflight_area_is_fetched_once_and_set_on_every_start(vhost_socket_dir, no_fd_leak) -> None:
    backend = EchoBackend(2)
    with VhostUserDaemon("inflight", backend) as daemon:
        old, daemon.handler = daemon.handler, InflightHandler(backend)
        old.stop_workers()  # never started: this closes its pollers
        path = os.path.join(vhost_socket_dir, "inflight.sock")
        daemon.start_server(path)
        with MockFrontend.connect(path, SMALL.replace(inflight=True)) as fe:
            assert fe.protocol_features & PF.INFLIGHT_SHMFD
            assert fe.request(0, [b"x"], [1]).data == b"x"
            fe.reconnect()
            assert fe.request(1, [b"y"], [1]).data == b"y"
        calls = daemon.handler.inflight_calls
    assert calls == [("get", 2, 16), ("set", 2, 16), ("set", 2, 16)]


# ---------------------------------------------------------- fds and load
def test_close_releases_everything(no_fd_leak) -> None:
    fe = MockFrontend(SMALL)
    fe.close()
    fe.close()
    with GuestRam(((0, 1 << 20),), single_fd=False) as ram:
        region = ram.add_region(8 << 20, 1 << 20)
        ram.remove_region(region.guest_phys_addr)


def test_failed_connect_leaks_nothing(vhost_socket_dir, no_fd_leak) -> None:
    with pytest.raises(FileNotFoundError):
        MockFrontend.connect(os.path.join(vhost_socket_dir, "nobody"), SMALL, timeout=0.05)


def test_full_session_leaks_nothing(no_fd_leak, serve_backend) -> None:
    path = serve_backend(Chatty(1))
    with MockFrontend.connect(path, SMALL) as fe:
        fe.enable_dirty_log()
        fe.add_region(64 << 20, 1 << 20)
        fe.request(0, [b"config"], [4])
        fe.reconnect()
        fe.remove_region(64 << 20)
        fe.stop()
        fe.restart()
        fe.request(0, [b"x"], [4])


def test_backend_nack_raises(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL, start=False) as fe:
        with pytest.raises(RequestFailed):
            fe.frontend.set_vring_num(0, 3)  # a split ring's size must be a power of two
        fe.start()
        assert fe.request(0, [b"still fine"], [10]).data == b"still fine"


def test_run_load(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(queue_size=64)) as fe:
        stats = run_load(fe, count=500, readable=32, writable=32, batch=32)
    assert stats.requests == 500 and stats.bytes_in == 500 * 32
    assert stats.requests_per_second > 0


def test_run_load_in_another_process(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    stats = run_load_in_subprocess(path, count=300, readable=16, writable=16, batch=16, queue_size=32)
    assert stats["requests"] == 300 and stats["bytes_in"] == 300 * 16


def test_threads_of_the_frontend_end() -> None:
    before = set(threading.enumerate())
    with check_no_fd_leak():
        with VhostUserDaemon("t", Chatty(1)) as daemon:
            d = __import__("tempfile").mkdtemp(prefix="vhu-")
            daemon.start_server(os.path.join(d, "t.sock"))
            with MockFrontend.connect(os.path.join(d, "t.sock"), SMALL) as fe:
                fe.request(0, [b"config"], [4])
        os.rmdir(d)
    assert [t for t in threading.enumerate() if t not in before] == []
