"""VhostUserDaemon driven end to end by the mock front-end, with the echo test
device: ring layouts and features, worker threads, memory-table changes while
running, stop/restart, hooks, device fds, disconnects and reconnects, client
mode, inherited sockets, hostile rings, shutdown.  No sleeps: every wait is on
an fd or an event, with a timeout."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import pytest
from conftest import check_no_fd_leak, open_fds

from vhostuser.backend import FIRST_DEVICE_TOKEN
from vhostuser.daemon import VhostUserDaemon
from vhostuser.errors import VringFailed
from vhostuser import EVENT_ERROR, EVENT_READ, EVENT_WRITE
from vhostuser.sys_util import Poller, SelectorKind, new_event_consumer_and_notifier
from vhostuser.testing import EchoBackend, FrontendOptions, MockFrontend
from vhostuser.vring import VringState

SMALL = FrontendOptions(queue_size=16, memory=((0, 1 << 20), (2 << 20, 1 << 20)), data_size=64 * 1024)


def payloads(n: int, seed: int = 0) -> list[tuple[list[bytes], list[int]]]:
    """``n`` echo requests of varied shapes: 1-3 readable buffers, 1-2 writable."""
    out = []
    for i in range(n):
        k = (i + seed) % 7
        chunks = [bytes([(i + j) & 0xFF]) * (1 + (i * 13 + j * 7) % 300) for j in range(1 + k % 3)]
        total = sum(map(len, chunks))
        writable = [total] if k % 2 else [total // 2 + 1, total - total // 2 + 3]
        out.append((chunks, writable))
    return out


def check_echo(reqs: Sequence[tuple[list[bytes], list[int]]], used: Sequence) -> None:
    assert len(used) == len(reqs)
    for (readable, writable), u in zip(reqs, used):
        data = b"".join(readable)
        assert u.length == min(len(data), sum(writable))
        assert u.data == data[:u.length]


@pytest.fixture
def threads_before() -> Iterator[None]:
    """Fail if the test leaves a thread running."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in left:
        t.join(2)
    left = [t.name for t in left if t.is_alive()]
    assert not left, f"threads left behind: {left}"


# ------------------------------------------------------------------ data path
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["noevt", "evt"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_echo(no_fd_leak, serve_backend, packed: bool, event_idx: bool, indirect: bool) -> None:
    backend = EchoBackend(2)
    path = serve_backend(backend)
    opts = FrontendOptions(queue_size=32, packed=packed, event_idx=event_idx, indirect=indirect,
                           use_indirect=indirect)
    with MockFrontend.connect(path, opts) as fe:
        assert fe.packed == packed and fe.event_idx == event_idx and fe.indirect == indirect
        for q in (0, 1):
            reqs = payloads(150, seed=q)
            check_echo(reqs, fe.transfer(q, reqs))
        assert fe.request(0, [b"ping"], [4]).data == b"ping"
    assert backend.echoed == [151, 150]


def test_queues_on_several_threads(serve_backend) -> None:
    backend = EchoBackend(4, queues_per_thread=[0b0011, 0b0100, 0b1000])
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL) as fe:
        assert len(fe.vrings) == 4
        # all four queues busy at once
        reqs = {q: payloads(40, seed=q) for q in range(4)}
        tokens = {q: [fe.add(q, *r) for r in reqs[q][:3]] for q in range(4)}
        for q in range(4):
            fe.publish(q)
        for q in range(4):
            got = []
            while len(got) < len(tokens[q]):
                got += fe.wait_used(q)
            assert sorted(u.token for u in got) == sorted(tokens[q])
            check_echo(reqs[q][3:], fe.transfer(q, reqs[q][3:]))
    names = [backend.threads[q] for q in range(4)]
    assert all(len(n) == 1 for n in names)
    assert names[0] == names[1]
    assert len({*names[1], *names[2], *names[3]}) == 3


@pytest.mark.parametrize("mem_slots", [True, False], ids=["add-rem-mem-reg", "set-mem-table"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_memory_table_changes_while_running(serve_backend, mem_slots: bool, packed: bool) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(mem_slots=mem_slots, packed=packed, queue_size=64)) as fe:
        reqs = payloads(8)
        for i in range(20):
            tokens = [fe.add(0, *r) for r in reqs]
            fe.publish(0)
            gpa = (64 << 20) + i * (1 << 20)
            fe.add_region(gpa, 1 << 20)       # while the worker may be processing
            got = []
            while len(got) < len(tokens):
                got += fe.wait_used(0)
            by_token = {u.token: u for u in got}
            check_echo(reqs, [by_token[t] for t in tokens])
            if i % 2 or not mem_slots:  # SET_MEM_TABLE holds 8 regions at most
                fe.remove_region(gpa)
        assert fe.request(0, [b"after"], [5]).data == b"after"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_get_vring_base_and_restart(serve_backend, packed: bool) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(packed=packed)) as fe:
        n = 37
        reqs = [([b"x" * 10], [10])] * n
        fe.transfer(0, reqs)
        (base,) = fe.stop()
        drv = fe.driver(0)
        if packed:
            # 37 chains of 2 descriptors in a ring of 16: position 74 % 16, 4 laps
            avail, used = base & 0xFFFF, base >> 16
            assert avail == used == (2 * n) % 16 | (1 << 15 if (2 * n // 16) % 2 == 0 else 0)
            assert avail == drv.next_used | drv.used_wrap << 15
        else:
            assert base == n == drv.used_idx()
        fe.restart()
        check_echo(payloads(50), fe.transfer(0, payloads(50)))
        (base2,) = fe.stop()
        if not packed:
            assert base2 == n + 50


def test_stop_restart_with_other_features_same_connection(serve_backend) -> None:
    """Like SeaBIOS then Linux: start with minimal features, stop, start again
    with more (and a fresh ring layout) on the same connection."""
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL.replace(event_idx=False, indirect=False)) as fe:
        assert fe.request(0, [b"bios"], [4]).data == b"bios"
        fe.stop()
        fe.options.event_idx = True
        fe.options.indirect = True
        fe.acked_features = fe._features_to_ack(fe.offered_features)
        fe.start()  # fresh rings, base 0
        assert fe.event_idx and fe.indirect
        assert fe.request(0, [b"linux"], [5], indirect=True).data == b"linux"


def test_kick_before_enable_is_not_lost(serve_backend) -> None:
    backend = EchoBackend(1)
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL.replace(enable=False)) as fe:
        token = fe.add(0, [b"early"], [5])
        fe.publish(0, force_kick=True)
        fe.sync()
        with pytest.raises(TimeoutError):
            fe.wait_used(0, timeout=0.3)  # disabled: nothing may be processed
        assert ("started", 0) not in backend.hook_calls
        fe.enable(0)
        (used,) = fe.wait_used(0)
        assert (used.token, used.data) == (token, b"early")
        assert backend.hook_calls[0] == ("started", 0)


def test_ring_hooks(serve_backend) -> None:
    backend = EchoBackend(2)
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL) as fe:
        fe.request(0, [b"a"], [1])
        fe.request(1, [b"b"], [1])
        assert sorted(backend.hook_calls) == [("started", 0), ("started", 1)]
        fe.stop()
        assert sorted(backend.hook_calls[2:]) == [("stopped", 0), ("stopped", 1)]
        fe.restart()
        fe.request(0, [b"c"], [1])
        assert backend.hook_calls[4:] == [("started", 0)]
        fe.enable(0, False)
        fe.sync()
        assert backend.hook_calls[5:] == [("stopped", 0)]
    # queue 1 was started again by restart() but never kicked: no hook for it


class DeviceFdEcho(EchoBackend):
    """Echo plus a device fd watched by worker 1."""

    def __init__(self) -> None:
        super().__init__(2, queues_per_thread=[0b01, 0b10])
        self.fired = threading.Event()
        self.seen: list[tuple[int, int, str]] = []
        self.evsets: list[int] = []
        self.consumer, self.notifier = new_event_consumer_and_notifier()

    def handle_device_event(self, token: int, evset: int, thread_id: int) -> None:
        self.consumer.consume()
        self.seen.append((token, thread_id, threading.current_thread().name))
        self.evsets.append(evset)
        self.fired.set()

    def close(self) -> None:
        self.consumer.close()
        self.notifier.close()


def test_register_fd_delivers_device_events(serve_backend) -> None:
    backend = DeviceFdEcho()
    path = serve_backend(backend)
    token = FIRST_DEVICE_TOKEN + 7
    backend.register_fd(backend.consumer.fileno(), token, thread_id=1)
    with pytest.raises(ValueError):
        backend.register_fd(backend.consumer.fileno(), 3)
    backend.notifier.notify()
    assert backend.fired.wait(5)
    assert backend.seen[0][:2] == (token, 1)
    with MockFrontend.connect(path, SMALL) as fe:  # the rings still work beside it
        assert fe.request(1, [b"q1"], [2]).data == b"q1"
    assert backend.seen[0][2] in backend.threads[1]
    assert backend.evsets[0] == EVENT_READ
    assert backend.unregister_fd(backend.consumer.fileno())
    assert not backend.unregister_fd(backend.consumer.fileno())  # a no-op the second time


def test_handle_event_gets_only_the_workers_vrings(serve_backend) -> None:
    backend = EchoBackend(3, queues_per_thread=[0b101, 0b010])
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL) as fe:
        for q in range(3):
            assert fe.request(q, [b"x"], [1]).data == b"x"
    assert backend.vrings_seen == [{frozenset({0, 2})}, {frozenset({1})}, {frozenset({0, 2})}]


def test_register_fd_before_the_daemon_starts_and_again(serve_backend) -> None:
    """Registrations made before the daemon exists apply when it starts;
    registering again updates (no error); an unknown thread is refused once the
    daemon runs."""
    backend = DeviceFdEcho()
    token = FIRST_DEVICE_TOKEN + 1
    backend.register_fd(backend.consumer, token, thread_id=1)
    backend.register_fd(backend.consumer, token, thread_id=1)  # idempotent
    assert len(backend.fd_registry) == 1 and not backend.fd_registry.bound
    serve_backend(backend)
    assert backend.fd_registry.bound and backend.fd_registry.num_threads == 2
    backend.notifier.notify()
    assert backend.fired.wait(5)
    assert backend.seen[-1][:2] == (token, 1)
    backend.fired.clear()
    backend.register_fd(backend.consumer, token + 1, thread_id=0)  # moves it to worker 0, new token
    backend.notifier.notify()
    assert backend.fired.wait(5)
    assert backend.seen[-1][:2] == (token + 1, 0)
    with pytest.raises(ValueError, match="no worker thread 2"):
        backend.register_fd(backend.consumer, token, thread_id=2)
    backend.unregister_fd(backend.consumer)


class WritableWatcher(EchoBackend):
    """Registers a socket for EVENT_WRITE in vring_started (again at every
    reconnect) and records the evset it wakes with."""

    TOKEN = FIRST_DEVICE_TOKEN + 3

    def __init__(self) -> None:
        super().__init__(1)
        self.a, self.b = socket.socketpair()
        self.evsets: list[int] = []
        self.woke = threading.Event()

    def vring_started(self, index: int, vring: VringState) -> None:
        super().vring_started(index, vring)
        self.register_fd(self.a, self.TOKEN, events=EVENT_READ | EVENT_WRITE)

    def handle_device_event(self, token: int, evset: int, thread_id: int) -> None:
        self.evsets.append(evset)
        self.woke.set()
        if evset & EVENT_READ and not evset & EVENT_ERROR:
            self.a.recv(100)
        # stop watching writability once seen, or the worker would spin
        self.modify_fd(self.a, self.TOKEN, EVENT_READ)


def test_evset_tells_why_and_vring_started_may_register_again(serve_backend) -> None:
    backend = WritableWatcher()
    path = serve_backend(backend)
    try:
        for _ in range(3):  # each session starts the ring and registers again
            backend.woke.clear()
            with MockFrontend.connect(path, SMALL) as fe:
                assert fe.request(0, [b"y"], [1]).data == b"y"
                assert backend.woke.wait(5)
                assert backend.evsets[-1] == EVENT_WRITE
                backend.woke.clear()
                backend.b.send(b"z")
                assert backend.woke.wait(5)
                assert backend.evsets[-1] == EVENT_READ
        assert [c for c in backend.hook_calls if c[0] == "started"] == [("started", 0)] * 3
        with Poller() as probe:  # the kind the workers use (VHOSTUSER_SELECTOR may force one)
            says_why = probe.kind in (SelectorKind.EPOLL, SelectorKind.POLL)
        if says_why:
            backend.woke.clear()
            backend.b.close()  # hang-up: readable, with EVENT_ERROR where the OS says why
            assert backend.woke.wait(5)
            assert backend.evsets[-1] & EVENT_ERROR
    finally:
        backend.unregister_fd(backend.a)
        backend.a.close()
        backend.b.close()


class Spinner(EchoBackend):
    """Re-registers its always-writable socket from every handle_event."""

    TOKEN = FIRST_DEVICE_TOKEN + 4

    def __init__(self) -> None:
        super().__init__(1)
        self.a, self.b = socket.socketpair()
        self.events = 0

    def handle_device_event(self, token: int, evset: int, thread_id: int) -> None:
        self.events += 1
        self.modify_fd(self.a, self.TOKEN, EVENT_WRITE)


def test_registry_calls_from_the_worker_and_another_thread_do_not_deadlock(serve_backend) -> None:
    """The worker (holding its lock) calls the registry while another thread
    unregisters and registers the same fd: neither may wait for the other forever."""
    backend = Spinner()
    serve_backend(backend)
    backend.register_fd(backend.a, Spinner.TOKEN, events=EVENT_WRITE)

    def churn() -> None:
        for _ in range(300):
            backend.unregister_fd(backend.a)
            backend.register_fd(backend.a, Spinner.TOKEN, events=EVENT_WRITE)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "register/unregister deadlocked against the worker"
    assert backend.events > 0
    backend.unregister_fd(backend.a)
    backend.a.close()
    backend.b.close()


def test_top_level_exports_what_a_device_author_catches() -> None:
    import vhostuser

    for name in ("QueueBroken", "ChainTooShort", "QueueUsageError", "QueueNotReady", "DeviceError",
                 "GuestAddressError", "InvalidDescriptorError", "FdRegistry", "EVENT_READ", "EVENT_WRITE",
                 "EVENT_ERROR", "FIRST_DEVICE_TOKEN"):
        assert name in vhostuser.__all__ and getattr(vhostuser, name) is not None
    assert issubclass(vhostuser.ChainTooShort, vhostuser.DeviceError)


# ----------------------------------------------------- connections & lifetime
class HoldingEcho(EchoBackend):
    """Queue 0 keeps every chain (never completes it); queue 1 echoes."""

    def __init__(self) -> None:
        super().__init__(2)
        self.held: list = []
        self.holding = threading.Event()

    def handle_event(self, device_event: int, evset: int, vrings: Mapping[int, VringState], thread_id: int) -> None:
        if device_event == 0:
            self.held.extend(vrings[0].pop_batch())
            if self.held:
                self.holding.set()
            return
        super().handle_event(device_event, evset, vrings, thread_id)

    def vring_stopped(self, index: int, vring: VringState) -> None:
        super().vring_stopped(index, vring)
        if index == 0:
            self.held.clear()


def test_frontend_killed_mid_request_100_cycles(threads_before) -> None:
    opts = FrontendOptions(queue_size=8, memory=((0, 256 << 10), (1 << 20, 256 << 10)), data_size=16 << 10)
    with check_no_fd_leak():
        backend = HoldingEcho()
        path = os.path.join(_short_dir(), "hold.sock")
        counts = []
        with VhostUserDaemon("hold", backend) as daemon:
            daemon.start_server(path)
            for cycle in range(100):
                fe = MockFrontend.connect(path, opts)
                try:
                    counts.append(len(open_fds()))  # previous connection fully cleaned up by now
                    assert fe.request(1, [b"%d" % cycle], [8]).data == b"%d" % cycle
                    for _ in range(3):
                        fe.add(0, [b"stuck"], [8])
                    fe.publish(0, force_kick=True)
                    if cycle % 2:
                        fe.sync()  # half the time the back-end surely holds them
                finally:
                    fe.close()  # killed with chains outstanding
            assert daemon.connections == 100
        assert not daemon.running
        os.rmdir(os.path.dirname(path))
    assert len(set(counts[1:])) == 1, counts


def test_reconnect_resumes_from_used_index(serve_backend) -> None:
    backend = HoldingEcho()
    path = serve_backend(backend)
    with MockFrontend.connect(path, SMALL) as fe:
        fe.transfer(1, payloads(10))
        tokens = [fe.add(1, [b"%d" % i], [4]) for i in range(3)]
        fe.publish(1)
        got = []
        while len(got) < 3:
            got += fe.wait_used(1)
        # a chain the back-end never completes (queue 0) is processed again after the reconnect
        stuck = fe.add(0, [b"stuck"], [5])
        fe.publish(0)
        assert backend.holding.wait(5)
        backend.holding.clear()
        fe.reconnect()
        assert fe.connections == 2
        assert backend.holding.wait(5), "the reconnected back-end should see the chain again"
        assert len(backend.held) == 1
        assert fe.driver(0).used_idx() == 0
        assert [u.token for u in got] == tokens
        assert fe.request(1, [b"again"], [5]).data == b"again"
        del stuck


def test_request_shutdown_from_another_thread(threads_before, vhost_socket_dir) -> None:
    path = os.path.join(vhost_socket_dir, "s.sock")
    daemon = VhostUserDaemon("echo", EchoBackend(1))
    with daemon:
        daemon.start_server(path)
        with MockFrontend.connect(path, SMALL) as fe:
            assert fe.request(0, [b"x"], [1]).data == b"x"
            stopper = threading.Thread(target=daemon.request_shutdown)
            t0 = time.monotonic()
            stopper.start()
            assert daemon.wait(1.0)
            assert time.monotonic() - t0 < 1.0
            stopper.join()
    assert not daemon.running


def test_request_shutdown_while_idle(vhost_socket_dir) -> None:
    daemon = VhostUserDaemon("echo", EchoBackend(1))
    with daemon:
        daemon.start_server(os.path.join(vhost_socket_dir, "idle.sock"))
        threading.Thread(target=daemon.request_shutdown).start()
        assert daemon.wait(1.0)


def test_client_mode_connects_and_reconnects(serve_backend, vhost_socket_dir) -> None:
    path = os.path.join(vhost_socket_dir, "fe.sock")
    with MockFrontend.listen(path, SMALL) as fe:
        backend = EchoBackend(1)
        serve_backend(backend, mode="client", path=path)
        fe.accept(timeout=5)
        assert fe.request(0, [b"client"], [6]).data == b"client"
        fe.reconnect(timeout=5)  # the daemon connects again
        assert fe.connections == 2
        assert fe.request(0, [b"again"], [5]).data == b"again"
        assert serve_backend.daemon_of(backend).connections == 2


def test_start_fd_listening_socket(vhost_socket_dir, no_fd_leak) -> None:
    path = os.path.join(vhost_socket_dir, "inherited.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    with VhostUserDaemon("echo", EchoBackend(1)) as daemon:
        daemon.start_fd(sock.detach())
        for i in range(2):
            with MockFrontend.connect(path, SMALL) as fe:
                assert fe.request(0, [b"fd%d" % i], [3]).data == b"fd%d" % i
    os.unlink(path)


def test_start_fd_connected_socket(no_fd_leak) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with VhostUserDaemon("echo", EchoBackend(1)) as daemon:
        daemon.start_fd(theirs.detach())
        with MockFrontend.from_socket(ours, SMALL) as fe:
            assert fe.request(0, [b"pair"], [4]).data == b"pair"
        assert daemon.wait(5)  # a connected fd is served once


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_hostile_ring_fails_only_that_queue(no_fd_leak, serve_backend, packed: bool) -> None:
    path = serve_backend(EchoBackend(2))
    with MockFrontend.connect(path, SMALL.replace(packed=packed)) as fe:
        assert fe.request(0, [b"ok"], [2]).data == b"ok"
        drv = fe.driver(0)
        beyond = 1 << 40  # not guest RAM
        if packed:
            pos = drv.next_avail
            drv.write_desc(pos, beyond, 64, 0, drv.avail_flags())
        else:
            drv.write_desc(5, beyond, 64)
            drv.push_avail(5)
            drv.publish()
        fe.kick(0)
        assert fe.wait_err(0)
        with pytest.raises(VringFailed):
            fe.wait_used(0, timeout=1)
        # the other queue is fine
        check_echo(payloads(20), fe.transfer(1, payloads(20)))
    # and so is the next connection
    with MockFrontend.connect(path, SMALL.replace(packed=packed)) as fe:
        assert fe.request(0, [b"fresh"], [5]).data == b"fresh"


def test_dirty_log_marks_written_pages(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    with MockFrontend.connect(path, SMALL) as fe:
        dlog = fe.enable_dirty_log()
        dlog.clear()
        token = fe.add(0, [b"d" * 100], [100])
        gpa, _ = fe.driver(0).placed[token][0]
        fe.publish(0)
        (used,) = fe.wait_used(0)
        assert used.data == b"d" * 100
        assert dlog.is_dirty(gpa)
        assert dlog.is_dirty(fe.driver(0).device_gpa)  # the used ring (VHOST_VRING_F_LOG)


def _short_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="vhu-")
