"""The virtio-console device driven byte for byte by the mock front-end (QEMU 7.2
has no vhost-user console front-end).

The host side is a UNIX listener (``--backend unix``) the test connects to;
the nested (stdio) backend is covered in test_console_cli.py.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from vhostuser.devices.console import (
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    ConsoleBackend,
    ControlEvent,
    ControlMessage,
    unix_listener,
)
from vhostuser.devices.console.device import RX_STAGE
from vhostuser.sys_util.event import AVAILABLE_EVENT_KINDS, EventKind
from vhostuser.testing import FrontendOptions, MockFrontend

MULTIPORT = 1 << VIRTIO_CONSOLE_F_MULTIPORT
TIMEOUT = 10.0

NOTIFIERS = [pytest.param(k.value, id=k.value) for k in EventKind if k in AVAILABLE_EVENT_KINDS]
LAYOUTS = [
    pytest.param(False, True, id="split-eventidx"),
    pytest.param(False, False, id="split"),
    pytest.param(True, True, id="packed-eventidx"),
    pytest.param(True, False, id="packed"),
]


@pytest.fixture(params=NOTIFIERS)
def notifier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run under every notifier kind (eventfd and pipe: the macOS path)."""
    monkeypatch.setenv("VHOSTUSER_NOTIFIER", request.param)
    return request.param


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"host side closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


class Rig:
    """A console served in-process, a mock front-end as the guest, host clients."""

    def __init__(self, serve_backend, directory: str, *, ports: int = 1, multiport: bool | None = None,
                 options: FrontendOptions | None = None, **kwargs) -> None:  # noqa: ANN001
        self.host_paths = [os.path.join(directory, f"host{j}.uds") for j in range(ports)]
        self.backend = ConsoleBackend([unix_listener(p) for p in self.host_paths], multiport=multiport, **kwargs)
        self.socket_path = serve_backend(self.backend)
        opts = options or FrontendOptions()
        if self.backend.multiport:
            opts = opts.replace(device_features=opts.device_features | MULTIPORT)
        self.fe = MockFrontend.connect(self.socket_path, opts)
        self.clients: list[socket.socket] = []
        #: writable size of the rx buffers each port keeps posted
        self.rx_size: dict[int, int] = {}

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.fe.close()

    # ------------------------------------------------------------ host side
    def client(self, port: int = 0) -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(TIMEOUT)
        c.connect(self.host_paths[port])
        self.clients.append(c)
        return c

    # ------------------------------------------------------------ guest side
    @staticmethod
    def rxq(port: int) -> int:
        return 0 if port == 0 else 2 + 2 * port

    @staticmethod
    def txq(port: int) -> int:
        return 1 if port == 0 else 3 + 2 * port

    def post_rx(self, port: int = 0, count: int = 8, size: int = 256) -> None:
        q = self.rxq(port)
        self.rx_size[port] = size
        for _ in range(count):
            self.fe.add(q, [], [size])
        self.fe.publish(q)

    def guest_read(self, n: int, port: int = 0, *, repost: bool = True) -> bytes:
        """Reap rx buffers until ``n`` bytes arrived, giving each buffer back."""
        q = self.rxq(port)
        out = bytearray()
        while len(out) < n:
            used = self.fe.wait_used(q, 1, TIMEOUT)
            for u in used:
                out += u.data
                if repost:
                    self.fe.add(q, [], [self.rx_size.get(port, 256)])
            if repost:
                self.fe.publish(q)
        assert len(out) == n, f"got {len(out)} bytes, expected {n}"
        return bytes(out)

    def guest_write(self, data: bytes, port: int = 0) -> None:
        used = self.fe.request(self.txq(port), [data], [])
        assert used.length == 0

    def guest_write_many(self, chunks: list[bytes], port: int = 0) -> None:
        used = self.fe.transfer(self.txq(port), [([c], []) for c in chunks], timeout=TIMEOUT)
        assert all(u.length == 0 for u in used)

    # ------------------------------------------------------------ control
    def ctrl_send(self, msg: ControlMessage | bytes) -> None:
        raw = msg.pack() if isinstance(msg, ControlMessage) else msg
        self.fe.request(3, [raw], [])

    def ctrl_recv(self, count: int) -> list[ControlMessage]:
        out: list[ControlMessage] = []
        while len(out) < count:
            for u in self.fe.wait_used(2, 1, TIMEOUT):
                out.append(ControlMessage.unpack(u.data))
                self.fe.add(2, [], [512])
            self.fe.publish(2)
        return out

    def multiport_handshake(self, *, host_connected: frozenset[int] = frozenset()) -> list[ControlMessage]:
        """DEVICE_READY, DEVICE_ADD per port, PORT_READY each; returns what the device sent after PORT_READY."""
        n = len(self.backend.ports)
        for _ in range(16):
            self.fe.add(2, [], [512])
        self.fe.publish(2)
        self.ctrl_send(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
        adds = self.ctrl_recv(n)
        assert [(m.event, m.id) for m in adds] == [(ControlEvent.DEVICE_ADD, j) for j in range(n)]
        replies = []
        for j in range(n):
            self.ctrl_send(ControlMessage(j, ControlEvent.PORT_READY, 1))
            expect = 2 + (j == 0) + (self.backend.ports[j].name is not None) + (j == 0 and self.backend.size is not None)
            replies += self.ctrl_recv(expect - 1)
        return replies


@pytest.fixture
def rig_factory(serve_backend, vhost_socket_dir) -> Iterator:  # noqa: ANN001
    made: list[Rig] = []

    def make(**kwargs) -> Rig:  # noqa: ANN003
        rig = Rig(serve_backend, vhost_socket_dir, **kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def layout(packed: bool, event_idx: bool) -> FrontendOptions:
    return FrontendOptions(packed=packed, event_idx=event_idx, queue_size=64)


# ====================================================================== features
def test_features_and_config_single_port(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(options=FrontendOptions(config_size=12))
    offered = rig.fe.offered_features
    assert offered & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
    assert not offered & MULTIPORT and not offered & (1 << VIRTIO_CONSOLE_F_SIZE)
    assert rig.fe.queue_num == 2
    assert rig.fe.config == struct.pack("<HHII", 0, 0, 0, 0)


def test_features_and_config_multiport_with_size(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(ports=3, size=(132, 43), options=FrontendOptions(config_size=12))
    assert rig.fe.offered_features & MULTIPORT and rig.fe.offered_features & (1 << VIRTIO_CONSOLE_F_SIZE)
    assert rig.fe.queue_num == 8
    assert struct.unpack("<HHII", rig.fe.config) == (132, 43, 3, 0)


# ====================================================================== data path
@pytest.mark.parametrize(("packed", "event_idx"), LAYOUTS)
def test_interactive_one_character_at_a_time(rig_factory, notifier, packed, event_idx) -> None:  # noqa: ANN001
    """The GSoC port stalled after the first character: type 400 characters one
    by one each way, waiting for each before sending the next."""
    rig = rig_factory(options=layout(packed, event_idx))
    rig.post_rx(count=2, size=64)
    c = rig.client()
    for i in range(400):
        key = bytes([0x21 + i % 94])
        c.sendall(key)
        assert rig.guest_read(1) == key, f"character {i}"
        rig.guest_write(key.swapcase() if key.isalpha() else key)
        assert recv_exact(c, 1) == (key.swapcase() if key.isalpha() else key), f"echo {i}"


@pytest.mark.parametrize(("packed", "event_idx"), LAYOUTS)
def test_bulk_one_mebibyte_each_way(rig_factory, notifier, packed, event_idx) -> None:  # noqa: ANN001
    rig = rig_factory(options=layout(packed, event_idx))
    size = 1 << 20
    payload = os.urandom(size)
    c = rig.client()

    # host -> guest: the client writes faster than the guest reads
    rig.post_rx(count=16, size=4096)
    sender = threading.Thread(target=c.sendall, args=(payload,), daemon=True)
    sender.start()
    assert rig.guest_read(size) == payload
    sender.join(TIMEOUT)
    assert not sender.is_alive()

    # guest -> host
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(recv_exact(c, size)), daemon=True)
    reader.start()
    rig.guest_write_many([payload[k:k + 4096] for k in range(0, size, 4096)])
    reader.join(TIMEOUT)
    assert bytes(got) == payload
    port = rig.backend.ports[0]
    assert port.bytes_to_guest == size and port.dropped == 0


def test_receive_waits_for_guest_buffers_without_loss(rig_factory, notifier) -> None:  # noqa: ANN001
    """No rx buffers: the device stops reading (at most RX_STAGE bytes ahead) and
    delivers everything, in order, as buffers trickle in."""
    rig = rig_factory()
    c = rig.client()
    data = bytes(range(256)) * 200  # 51200 bytes, far more than RX_STAGE
    sender = threading.Thread(target=c.sendall, args=(data,), daemon=True)
    sender.start()
    got = bytearray()
    rig.rx_size[0] = 7
    while len(got) < len(data):
        rig.fe.add(0, [], [7 if len(got) < 1000 else 1024])
        rig.fe.publish(0)
        for u in rig.fe.wait_used(0, 1, TIMEOUT):
            got += u.data
        assert len(rig.backend.ports[0].inbuf) <= RX_STAGE
    assert bytes(got) == data
    sender.join(TIMEOUT)


def test_transmit_backpressure_resumes_when_the_host_drains(rig_factory, notifier) -> None:  # noqa: ANN001
    """The client does not read: the device stops taking tx chains (bounded buffer),
    nothing is dropped, and everything flows once the client reads."""
    rig = rig_factory(out_high=16 * 1024)
    c = rig.client()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rig.guest_write(b"hello")  # the device has accepted the client
    assert recv_exact(c, 5) == b"hello"
    chunks = [bytes([k % 251]) * 4096 for k in range(256)]  # 1 MiB
    tokens = [rig.fe.add(1, [ch], []) for ch in chunks[:60]]
    rig.fe.publish(1)
    with pytest.raises(TimeoutError):
        rig.fe.wait_used(1, len(tokens), timeout=0.5)  # bounded: the device waits for the host
    assert len(rig.backend.ports[0].outbuf) <= 16 * 1024 + 4096
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(recv_exact(c, 4096 * 256)), daemon=True)
    reader.start()
    rig.fe.wait_used(1, len(tokens), TIMEOUT)  # reaped into the backlog by the failed wait, too
    rig.guest_write_many(chunks[60:])
    reader.join(TIMEOUT)
    assert bytes(got) == b"".join(chunks)
    assert rig.backend.ports[0].dropped == 0


def test_host_client_disconnect_and_reconnect(rig_factory, notifier) -> None:  # noqa: ANN001
    rig = rig_factory()
    rig.post_rx(count=4)
    a = rig.client()
    a.sendall(b"from a")
    assert rig.guest_read(6) == b"from a"
    rig.guest_write(b"to a")
    assert recv_exact(a, 4) == b"to a"
    a.close()
    rig.clients.remove(a)
    # output while nobody is attached is kept for the next client
    rig.guest_write(b"while away;")
    rig.guest_write(b"still away;")
    b = rig.client()
    assert recv_exact(b, 22) == b"while away;still away;"
    b.sendall(b"from b")
    assert rig.guest_read(6) == b"from b"
    rig.guest_write(b"to b")
    assert recv_exact(b, 4) == b"to b"
    assert rig.backend.ports[0].host.clients == 2


def test_unattended_output_is_bounded(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(backlog=100)
    rig.guest_write_many([bytes([65 + k]) * 60 for k in range(5)])  # 300 bytes, nobody connected
    c = rig.client()
    assert recv_exact(c, 100) == b"D" * 40 + b"E" * 60  # the newest 100 bytes
    port = rig.backend.ports[0]
    assert port.dropped == 200


def test_frontend_reconnect_keeps_the_host_client(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory()
    rig.post_rx(count=4)
    c = rig.client()
    c.sendall(b"before")
    assert rig.guest_read(6) == b"before"
    rig.fe.reconnect()
    rig.post_rx(count=4)
    c.sendall(b"after")
    assert rig.guest_read(5) == b"after"
    rig.guest_write(b"out")
    assert recv_exact(c, 3) == b"out"


def test_stop_and_restart_rings_loses_nothing(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory()
    c = rig.client()
    rig.guest_write(b"x")
    assert recv_exact(c, 1) == b"x"
    c.sendall(b"typed while no buffers")
    rig.fe.stop()
    rig.fe.restart()
    rig.post_rx(count=4, size=64)
    assert rig.guest_read(22) == b"typed while no buffers"


# ====================================================================== emergency write
def test_emergency_write_reaches_port_0(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory()
    c = rig.client()
    rig.guest_write(b"[")  # the device accepted the client
    assert recv_exact(c, 1) == b"["
    for ch in b"SOS":
        rig.fe.set_config(8, struct.pack("<I", ch))
    assert recv_exact(c, 3) == b"SOS"


def test_config_writes_outside_emerg_wr_fail(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory()
    with pytest.raises(Exception, match="emerg_wr|config|failed"):  # the back-end refuses
        rig.fe.set_config(0, b"\x50\x00")
    rig.fe.sync()


# ====================================================================== multiport
@pytest.mark.parametrize(("packed", "event_idx"), LAYOUTS)
def test_multiport_handshake_and_data(rig_factory, notifier, packed, event_idx) -> None:  # noqa: ANN001
    rig = rig_factory(ports=3, names=[None, "org.vhostuser.one", "two"], options=layout(packed, event_idx))
    replies = rig.multiport_handshake()
    assert [(m.id, m.event_name, m.value, m.payload) for m in replies] == [
        (0, "CONSOLE_PORT", 1, b""),
        (0, "PORT_OPEN", 0, b""),
        (1, "PORT_NAME", 1, b"org.vhostuser.one"),
        (1, "PORT_OPEN", 0, b""),
        (2, "PORT_NAME", 1, b"two"),
        (2, "PORT_OPEN", 0, b""),
    ]
    # the guest opens ports 0 and 1 (the console port on CONSOLE_PORT, as Linux does)
    rig.ctrl_send(ControlMessage(0, ControlEvent.PORT_OPEN, 1))
    rig.ctrl_send(ControlMessage(1, ControlEvent.PORT_OPEN, 1))
    for p in range(3):
        rig.post_rx(p, count=4)
    clients = [rig.client(p) for p in range(3)]
    opened = rig.ctrl_recv(3)
    assert sorted((m.id, m.event_name, m.value) for m in opened) == [(p, "PORT_OPEN", 1) for p in range(3)]
    for p in (0, 1):
        clients[p].sendall(b"in%d" % p)
        assert rig.guest_read(3, p) == b"in%d" % p
        rig.guest_write(b"out%d" % p, p)
        assert recv_exact(clients[p], 4) == b"out%d" % p
    # port 2 is closed on the guest side: its host data waits
    clients[2].sendall(b"early")
    rig.fe.sync()
    assert not rig.fe.reap(rig.rxq(2))
    rig.ctrl_send(ControlMessage(2, ControlEvent.PORT_OPEN, 1))
    assert rig.guest_read(5, 2) == b"early"
    # host client of port 1 leaves: the guest hears PORT_OPEN 0
    clients[1].close()
    rig.clients.remove(clients[1])
    assert [(m.id, m.event_name, m.value) for m in rig.ctrl_recv(1)] == [(1, "PORT_OPEN", 0)]


def test_multiport_with_one_port_as_vhost_device_console(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(ports=1, multiport=True)
    assert rig.fe.queue_num == 4
    replies = rig.multiport_handshake()
    assert [(m.event_name, m.value) for m in replies] == [("CONSOLE_PORT", 1), ("PORT_OPEN", 0)]


def test_resize_sends_control_message_and_updates_config(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(ports=2, size=(80, 25))
    replies = rig.multiport_handshake()
    assert (replies[1].event_name, replies[1].payload) == ("RESIZE", struct.pack("<HH", 80, 25))
    rig.backend.set_size(100, 40)
    (msg,) = rig.ctrl_recv(1)
    assert (msg.id, msg.event_name, msg.payload) == (0, "RESIZE", struct.pack("<HH", 100, 40))
    assert struct.unpack("<HHII", rig.fe.get_config(0, 12)) == (100, 40, 2, 0)


def test_resize_without_multiport_notifies_a_config_change(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(size=(80, 25), options=FrontendOptions(device_features=1 << VIRTIO_CONSOLE_F_SIZE))
    rig.backend.set_size(90, 30)
    assert rig.fe.handler.config_changed.wait(TIMEOUT)
    assert rig.fe.get_config(0, 4) == struct.pack("<HH", 90, 30)


# ====================================================================== hostile guests
def test_bad_data_chains_are_completed_and_the_device_goes_on(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory()
    c = rig.client()
    # a tx chain with only writable buffers: nothing to send, completed with 0
    used = rig.fe.request(1, [], [32])
    assert used.length == 0
    # an rx chain with only readable buffers cannot take data: completed empty
    bad = rig.fe.add(0, [b"readable only"], [])
    good = rig.fe.add(0, [], [64])
    rig.fe.publish(0)
    c.sendall(b"data")
    got = {u.token: u for u in rig.fe.wait_used(0, 2, TIMEOUT)}
    assert got[bad].length == 0 and got[good].data == b"data"
    rig.guest_write(b"ok")
    assert recv_exact(c, 2) == b"ok"


def test_garbage_control_messages_are_ignored(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(ports=2, names=[None, "p1"])
    for _ in range(8):
        rig.fe.add(2, [], [512])
    rig.fe.publish(2)
    garbage = [
        b"\x01\x02\x03",                                       # shorter than the header
        ControlMessage(0, 99, 1).pack(),                       # unknown event
        ControlMessage(0, ControlEvent.PORT_READY, 1).pack(),  # before DEVICE_ADD
        ControlMessage(0, ControlEvent.RESIZE, 0).pack(),      # a device->driver event
    ]
    for raw in garbage:
        rig.ctrl_send(raw)
    used = rig.fe.request(3, [], [16])                         # writable-only control chain
    assert used.length == 0
    assert rig.backend.bad_control_messages == 5
    assert not rig.fe.reap(2)                                  # nothing was answered
    replies = rig.multiport_handshake()
    rig.ctrl_send(ControlMessage(77, ControlEvent.PORT_OPEN, 1))  # no such port
    rig.ctrl_send(ControlMessage(1, ControlEvent.PORT_READY, 1))  # again: ignored
    assert rig.backend.bad_control_messages == 6
    assert [m.event_name for m in replies] == ["CONSOLE_PORT", "PORT_OPEN", "PORT_NAME", "PORT_OPEN"]
    rig.ctrl_send(ControlMessage(1, ControlEvent.PORT_OPEN, 1))
    rig.post_rx(1, count=2)
    c = rig.client(1)
    c.sendall(b"fine")
    assert rig.guest_read(4, 1) == b"fine"


def test_control_message_that_does_not_fit_is_dropped(rig_factory) -> None:  # noqa: ANN001
    rig = rig_factory(ports=2, names=[None, "a-rather-long-port-name"])
    for _ in range(4):
        rig.fe.add(2, [], [512])
    rig.fe.publish(2)
    rig.ctrl_send(ControlMessage(0, ControlEvent.DEVICE_READY, 1))
    assert len(rig.ctrl_recv(2)) == 2
    rig.fe.add(2, [], [4])      # too small for any message
    rig.fe.publish(2)
    rig.ctrl_send(ControlMessage(0, ControlEvent.PORT_READY, 1))
    # the 4-byte buffer went back empty; the rest arrived in the big buffers
    msgs = []
    for u in rig.fe.wait_used(2, 2, TIMEOUT):
        if u.length:
            msgs.append(ControlMessage.unpack(u.data))
    assert {m.event_name for m in msgs} <= {"CONSOLE_PORT", "PORT_OPEN"}


def test_no_fd_leak_across_a_session(vhost_socket_dir) -> None:  # noqa: ANN001
    from conftest import check_no_fd_leak

    from vhostuser.testing.pytest_plugin import BackendServer

    with check_no_fd_leak():
        server = BackendServer(vhost_socket_dir)
        rig = Rig(server, vhost_socket_dir, ports=2)
        try:
            rig.multiport_handshake()
            rig.ctrl_send(ControlMessage(1, ControlEvent.PORT_OPEN, 1))
            rig.post_rx(1, count=2)
            c = rig.client(1)
            c.sendall(b"x")
            assert rig.guest_read(1, 1) == b"x"
            c.close()
            rig.clients.remove(c)
            assert [m.event_name for m in rig.ctrl_recv(2)][-1] == "PORT_OPEN"
        finally:
            rig.close()
            server.stop()
