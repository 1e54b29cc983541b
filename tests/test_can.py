"""virtio-can driven by the mock front-end playing the Linux driver
(drivers/net/can/virtio_can.c, as posted to linux-can; QEMU 7.2 has no
virtio-can front-end): probe fills rxq with ``virtio_can_rx`` buffers, open
sends SET_CTRL_MODE_START on controlq, xmit sends ``tx_out`` + a result byte,
the config-change callback reads ``status`` for BUSOFF.

The host SocketCAN side cannot run here (this kernel has no AF_CAN / vcan):
only its frame conversion and its clean failure are tested; the virtual bus
between several VMs is tested end to end.
"""
from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.devices import can
from vhostuser.devices.can import (
    CTRLQ,
    RXQ,
    TXQ,
    VIRTIO_CAN_F_CAN_CLASSIC,
    VIRTIO_CAN_F_CAN_FD,
    VIRTIO_CAN_F_RTR_FRAMES,
    VIRTIO_CAN_RESULT_NOT_OK,
    VIRTIO_CAN_RESULT_OK,
    VIRTIO_CAN_S_CTRL_BUSOFF,
    VIRTIO_CAN_SET_CTRL_MODE_START,
    VIRTIO_CAN_SET_CTRL_MODE_STOP,
    VIRTIO_CAN_TX,
    CanBackend,
    CanFrame,
    SocketCanLink,
    VirtualCanBus,
)
from vhostuser.sys_util.socketcan import CAN_EFF_FLAG, CAN_ERR_BUSOFF, CAN_ERR_FLAG, HostCanFrame
from vhostuser.testing import FrontendOptions, MockFrontend

ALL = (1 << VIRTIO_CAN_F_CAN_CLASSIC) | (1 << VIRTIO_CAN_F_CAN_FD) | (1 << VIRTIO_CAN_F_RTR_FRAMES)
RX_BUF = 16 + 64  # sizeof(struct virtio_can_rx) with a CAN FD sdu
TIMEOUT = 10.0


class CanDriver:
    """What virtio_can.c does, on a mock front-end."""

    def __init__(self, socket_path: str, features: int = ALL, *, rx_buffers: int = 16) -> None:
        self.fe = MockFrontend.connect(socket_path, FrontendOptions(device_features=features, config_size=2,
                                                                    queue_size=64))
        for _ in range(rx_buffers):  # virtio_can_populate_rx_vq
            self.fe.add(RXQ, [], [RX_BUF])
        self.fe.publish(RXQ)

    def close(self) -> None:
        self.fe.close()

    def control(self, msg_type: int) -> int:
        used = self.fe.request(CTRLQ, [struct.pack("<H", msg_type)], [1], timeout=TIMEOUT)
        assert used.length == 1
        return used.data[0]

    def open(self) -> None:
        assert self.control(VIRTIO_CAN_SET_CTRL_MODE_START) == VIRTIO_CAN_RESULT_OK

    def xmit_raw(self, raw: bytes, writable: tuple[int, ...] = (1,)) -> bytes:
        used = self.fe.request(TXQ, [raw], list(writable), timeout=TIMEOUT)
        return used.data

    def xmit(self, frame: CanFrame) -> int:
        return self.xmit_raw(frame.pack(VIRTIO_CAN_TX))[0]

    def receive(self, count: int) -> list[CanFrame]:
        out: list[CanFrame] = []
        while len(out) < count:
            for u in self.fe.wait_used(RXQ, 1, TIMEOUT):
                out.append(CanFrame.unpack(u.data))
                self.fe.add(RXQ, [], [RX_BUF])
            self.fe.publish(RXQ)
        return out

    def status(self) -> int:
        return struct.unpack("<H", self.fe.get_config(0, 2))[0]


@pytest.fixture
def bus_pair(serve_backend):  # noqa: ANN001, ANN201
    bus = VirtualCanBus()
    backends = [CanBackend(bus), CanBackend(bus), CanBackend(bus)]
    drivers = [CanDriver(serve_backend(b)) for b in backends]
    yield bus, backends, drivers
    for d in drivers:
        d.close()


FRAMES = [
    CanFrame(0x123, b"\x01\x02\x03"),
    CanFrame(0x1ABCDEF0, b"12345678", extended=True),
    CanFrame(0x7FF, bytes(range(64)), fd=True),
    CanFrame(0x42, b"x" * 12, fd=True, extended=True),
    CanFrame(0x10, rtr=True, rtr_length=4),
    CanFrame(0x0, b""),
]


def test_frames_cross_the_virtual_bus_to_every_other_vm(bus_pair) -> None:  # noqa: ANN001
    _bus, backends, (a, b, c) = bus_pair
    for d in (a, b, c):
        d.open()
    for frame in FRAMES:
        assert a.xmit(frame) == VIRTIO_CAN_RESULT_OK
    assert b.receive(len(FRAMES)) == FRAMES
    assert c.receive(len(FRAMES)) == FRAMES
    # the sender does not hear itself
    assert a.fe.reap(RXQ) == []
    assert b.xmit(FRAMES[2]) == VIRTIO_CAN_RESULT_OK
    assert a.receive(1) == [FRAMES[2]] and c.receive(1) == [FRAMES[2]]
    assert backends[0].stats["tx"] == len(FRAMES)


def test_stopped_controller_refuses_tx_and_drops_rx(bus_pair) -> None:  # noqa: ANN001
    _bus, backends, (a, b, _c) = bus_pair
    # initially STOPPED (spec): tx refused
    assert a.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_NOT_OK
    a.open()
    # b is stopped: what a sends does not reach it
    assert a.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_OK
    b.open()
    assert a.xmit(FRAMES[1]) == VIRTIO_CAN_RESULT_OK
    assert b.receive(1) == [FRAMES[1]]
    assert b.control(VIRTIO_CAN_SET_CTRL_MODE_STOP) == VIRTIO_CAN_RESULT_OK
    assert b.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_NOT_OK
    assert a.xmit(FRAMES[2]) == VIRTIO_CAN_RESULT_OK
    b.fe.sync()
    assert b.fe.reap(RXQ) == [] and backends[1].stats["rx_dropped_stopped"] >= 2


def test_bus_off_stops_the_controller_and_tells_the_driver(bus_pair) -> None:  # noqa: ANN001
    bus, _backends, (a, b, _c) = bus_pair
    a.open()
    b.open()
    assert a.status() == 0
    bus.bus_off(0)
    assert a.fe.handler.config_changed.wait(TIMEOUT)
    assert a.status() & VIRTIO_CAN_S_CTRL_BUSOFF
    assert a.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_NOT_OK  # stopped by the bus-off
    a.open()  # the driver restarts it (can_restart -> START)
    assert a.status() == 0
    assert a.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_OK
    assert b.receive(1) == [FRAMES[0]]


def _raw(msg_type: int = VIRTIO_CAN_TX, length: int = 3, flags: int = 0, can_id: int = 0x100,
         payload: bytes | None = None) -> bytes:
    data = bytes(length) if payload is None else payload
    return can.HEADER.pack(msg_type, length, 0, 0, 0, flags, can_id) + data


BAD = [
    pytest.param(b"\x01\x00\x03", id="short-header"),
    pytest.param(_raw(msg_type=0x0101), id="rx-msg-type-on-txq"),
    pytest.param(_raw(msg_type=VIRTIO_CAN_SET_CTRL_MODE_START), id="control-msg-on-txq"),
    pytest.param(_raw(flags=0x1), id="undefined-flag"),
    pytest.param(_raw(can_id=0x800), id="standard-id-too-big"),
    pytest.param(_raw(flags=can.VIRTIO_CAN_FLAGS_EXTENDED, can_id=0x20000000), id="extended-id-too-big"),
    pytest.param(_raw(length=9), id="classic-length-9"),
    pytest.param(_raw(length=13, flags=can.VIRTIO_CAN_FLAGS_FD), id="fd-length-13"),
    pytest.param(_raw(length=65, flags=can.VIRTIO_CAN_FLAGS_FD), id="fd-oversized"),
    pytest.param(_raw(length=8, payload=b"abc"), id="payload-shorter-than-length"),
    pytest.param(_raw(flags=can.VIRTIO_CAN_FLAGS_RTR | can.VIRTIO_CAN_FLAGS_FD), id="fd-rtr"),
]


@pytest.mark.parametrize("raw", BAD)
def test_bad_tx_requests_get_not_ok_and_a_log_line(no_fd_leak, bus_pair, raw: bytes, caplog) -> None:  # noqa: ANN001
    _bus, _backends, (a, b, _c) = bus_pair
    a.open()
    b.open()
    with caplog.at_level(logging.WARNING, logger="vhostuser.devices.can"):
        assert a.xmit_raw(raw) == bytes([VIRTIO_CAN_RESULT_NOT_OK])
    assert "refused frame" in caplog.text
    # still serving
    assert a.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_OK
    assert b.receive(1) == [FRAMES[0]]


def test_unnegotiated_frame_kinds_are_refused(serve_backend) -> None:  # noqa: ANN001
    bus = VirtualCanBus()
    classic_only = CanDriver(serve_backend(CanBackend(bus)), features=1 << VIRTIO_CAN_F_CAN_CLASSIC)
    other = CanDriver(serve_backend(CanBackend(bus)))
    try:
        classic_only.open()
        other.open()
        assert classic_only.xmit(CanFrame(1, b"x" * 12, fd=True)) == VIRTIO_CAN_RESULT_NOT_OK
        assert classic_only.xmit(CanFrame(1, rtr=True, rtr_length=1)) == VIRTIO_CAN_RESULT_NOT_OK
        # an FD frame from a peer is not delivered to a classic-only guest; classic ones are
        assert other.xmit(CanFrame(2, b"y" * 16, fd=True)) == VIRTIO_CAN_RESULT_OK
        assert other.xmit(CanFrame(3, b"z")) == VIRTIO_CAN_RESULT_OK
        assert other.xmit(CanFrame(4, rtr=True, rtr_length=2)) == VIRTIO_CAN_RESULT_OK  # no RTR negotiated
        assert other.xmit(CanFrame(3, b"z")) == VIRTIO_CAN_RESULT_OK
        assert classic_only.receive(2) == [CanFrame(3, b"z")] * 2
    finally:
        classic_only.close()
        other.close()


def test_malformed_control_and_resultless_chains(bus_pair, caplog) -> None:  # noqa: ANN001
    _bus, _backends, (a, b, _c) = bus_pair
    with caplog.at_level(logging.WARNING, logger="vhostuser.devices.can"):
        assert a.control(0x0203) == VIRTIO_CAN_RESULT_NOT_OK
        assert a.fe.request(CTRLQ, [b"\x01"], [1], timeout=TIMEOUT).data == bytes([VIRTIO_CAN_RESULT_NOT_OK])
        # a frame on the control queue (wrong queue)
        assert a.fe.request(CTRLQ, [FRAMES[0].pack(VIRTIO_CAN_TX)], [1], timeout=TIMEOUT).data == \
            bytes([VIRTIO_CAN_RESULT_NOT_OK])
        # a receive-style (write-only) buffer on the tx queue
        assert a.fe.request(TXQ, [], [RX_BUF], timeout=TIMEOUT).data[:1] == bytes([VIRTIO_CAN_RESULT_NOT_OK])
        # no room for the result: returned with length 0
        assert a.fe.request(TXQ, [FRAMES[0].pack(VIRTIO_CAN_TX)], [], timeout=TIMEOUT).length == 0
    assert "unknown control message" in caplog.text and "result byte" in caplog.text
    a.open()
    b.open()
    assert a.xmit(FRAMES[1]) == VIRTIO_CAN_RESULT_OK
    assert b.receive(1) == [FRAMES[1]]


def test_too_small_rx_buffer_drops_the_frame_not_the_device(serve_backend, caplog) -> None:  # noqa: ANN001
    bus = VirtualCanBus()
    a = CanDriver(serve_backend(CanBackend(bus)))
    b = CanDriver(serve_backend(CanBackend(bus)), rx_buffers=0)
    try:
        a.open()
        b.open()
        b.fe.add(RXQ, [], [20])
        b.fe.publish(RXQ)
        with caplog.at_level(logging.WARNING, logger="vhostuser.devices.can"):
            assert a.xmit(FRAMES[2]) == VIRTIO_CAN_RESULT_OK  # 64-byte FD frame
            (used,) = b.fe.wait_used(RXQ, 1, TIMEOUT)
        assert used.length == 0 and "too small" in caplog.text
        b.fe.add(RXQ, [], [RX_BUF])
        b.fe.publish(RXQ)
        assert a.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_OK
        assert b.receive(1) == [FRAMES[0]]
    finally:
        a.close()
        b.close()


def test_late_tx_ack_is_offered_only_on_the_virtual_bus() -> None:
    backend = CanBackend()
    try:
        assert backend.features() & (1 << can.VIRTIO_CAN_F_LATE_TX_ACK)
    finally:
        backend.close()
    assert not SocketCanLink.late_tx_ack


def test_host_frame_conversion() -> None:
    for frame in FRAMES:
        host = frame.to_host()
        assert HostCanFrame.unpack(host.pack()) == host
        assert CanFrame.from_host(host) == frame
    assert FRAMES[1].to_host().can_id == 0x1ABCDEF0 | CAN_EFF_FLAG
    assert HostCanFrame(CAN_ERR_FLAG | CAN_ERR_BUSOFF, bytes(8)).is_bus_off
    with pytest.raises(ValueError):
        HostCanFrame.unpack(b"short")


def test_missing_host_interface_fails_cleanly() -> None:
    with pytest.raises(OSError, match="no-such-can0|SocketCAN|No such device"):
        SocketCanLink("no-such-can0")


def test_can_devices_flag_needs_one_interface_per_socket() -> None:
    assert can.interfaces(None, 2) is None
    assert can.interfaces("can0 can1", 2) == ["can0", "can1"]
    with pytest.raises(ValueError):
        can.interfaces("can0", 2)


def test_command_serves_a_virtual_bus_between_its_sockets(tmp_path) -> None:  # noqa: ANN001
    import signal
    import subprocess

    from helpers.procs import vhostuser_process, wait_for_path

    base = tmp_path / "can.sock"
    with vhostuser_process(["can", "--socket-path", str(base), "--socket-count", "2"],
                           stderr=subprocess.PIPE, text=True) as proc:
        for i in range(2):
            wait_for_path(tmp_path / f"can.sock{i}", proc)
        a, b = CanDriver(str(tmp_path / "can.sock0")), CanDriver(str(tmp_path / "can.sock1"))
        try:
            a.open()
            b.open()
            assert a.xmit(FRAMES[2]) == VIRTIO_CAN_RESULT_OK
            assert b.receive(1) == [FRAMES[2]]
        finally:
            a.close()
            b.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_command_rejects_a_missing_host_interface(tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vhostuser", "can", "-s", str(tmp_path / "s"), "-d", "nocan0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "nocan0" in out.stderr


_tx_requests = st.one_of(
    st.binary(max_size=96),
    st.builds(lambda t, n, f, i, data: can.HEADER.pack(t, n, 0, 0, 0, f, i) + data,
              st.sampled_from([VIRTIO_CAN_TX, VIRTIO_CAN_TX, 0x0101, 0x0201, 0xFFFF]),
              st.integers(0, 70),
              st.sampled_from([0, 0x8000, 0x4000, 0xC000, 0x2000, 0xA000, 0x6000, 0x1, 0x80000000]),
              st.one_of(st.integers(0, 0x800), st.integers(0, 0x3FFFFFFF)),
              st.binary(max_size=70)))


@given(raw=_tx_requests, features=st.integers(0, 15), started=st.booleans())
def test_check_tx_never_raises_and_accepts_only_valid_frames(raw: bytes, features: int, started: bool) -> None:
    backend = CanBackend()
    try:
        backend.acked_features(features)
        backend.started = started
        verdict = backend.check_tx(raw)
        if isinstance(verdict, CanFrame):
            packed = verdict.pack(VIRTIO_CAN_TX)
            # msg_type, length, flags, can_id and the payload are the request's (reserved bytes ignored)
            assert started and packed[:4] == raw[:4] and packed[8:] == raw[8:len(packed)]
            assert verdict.length <= (64 if verdict.fd else 8)
            assert verdict.can_id <= (0x1FFFFFFF if verdict.extended else 0x7FF)
    finally:
        backend.close()


def test_a_new_driver_finds_the_controller_stopped(serve_backend) -> None:  # noqa: ANN001
    bus = VirtualCanBus()
    backend = CanBackend(bus)
    path = serve_backend(backend)
    peer = CanDriver(serve_backend(CanBackend(bus)))
    try:
        first = CanDriver(path)
        first.open()
        bus.bus_off(0)
        assert first.fe.handler.config_changed.wait(TIMEOUT)
        first.close()  # the guest goes away (reboot)
        second = CanDriver(path)
        try:
            assert second.status() == 0  # reset: no stale bus-off
            assert second.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_NOT_OK  # initially STOPPED
            second.open()
            peer.open()
            assert second.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_OK
            assert peer.receive(1) == [FRAMES[0]]
        finally:
            second.close()
    finally:
        peer.close()


def test_control_plane_conformance(no_fd_leak, serve_backend) -> None:  # noqa: ANN001
    from vhostuser.testing.checker import format_report, run_checks

    results = run_checks(serve_backend(CanBackend()), timeout=5)
    assert all(r.status in ("pass", "skip") for r in results), format_report(results)
    assert sum(r.status == "pass" for r in results) >= 10, format_report(results)


@pytest.fixture
def host_link(serve_backend):  # noqa: ANN001, ANN201
    """A SocketCanLink over a datagram socketpair standing in for the kernel's
    raw CAN socket (same frame layout, one frame per datagram)."""
    import socket

    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    host.settimeout(TIMEOUT)
    backend = CanBackend(SocketCanLink("fake0", sock=ours))
    driver = CanDriver(serve_backend(backend))
    yield host, driver
    driver.close()
    host.close()


def test_socketcan_link_carries_frames_both_ways(no_fd_leak, host_link) -> None:  # noqa: ANN001
    host, driver = host_link
    driver.open()
    for frame in FRAMES:
        assert driver.xmit(frame) == VIRTIO_CAN_RESULT_OK
        assert CanFrame.from_host(HostCanFrame.unpack(host.recv(128))) == frame
    for frame in FRAMES:
        host.send(frame.to_host().pack())
    assert driver.receive(len(FRAMES)) == FRAMES
    host.send(b"garbage")  # neither a can_frame nor a canfd_frame: logged, skipped
    host.send(FRAMES[0].to_host().pack())
    assert driver.receive(1) == [FRAMES[0]]


def test_socketcan_bus_off_error_frame_reaches_the_guest(host_link) -> None:  # noqa: ANN001
    host, driver = host_link
    driver.open()
    host.send(HostCanFrame(CAN_ERR_FLAG | CAN_ERR_BUSOFF, bytes(8)).pack())
    assert driver.fe.handler.config_changed.wait(TIMEOUT)
    assert driver.status() & VIRTIO_CAN_S_CTRL_BUSOFF
    assert driver.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_NOT_OK
    driver.open()
    assert driver.xmit(FRAMES[0]) == VIRTIO_CAN_RESULT_OK
    assert HostCanFrame.unpack(host.recv(128)) == FRAMES[0].to_host()
