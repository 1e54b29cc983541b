"""virtio-scmi driven by the mock front-end playing Linux's SCMI agent
(drivers/firmware/arm_scmi/virtio.c + base.c + sensors.c; QEMU 7.2 has no
vhost-user-scmi front-end): eventq filled with 136-byte buffers
(VIRTIO_SCMI_MAX_PDU_SIZE), every command a readable request and a 136-byte
writable response buffer; base protocol init (version, attributes, vendor,
sub-vendor, implementation version, list protocols until none is returned,
discover agents), then sensor protocol init (version, attributes, descriptions
page by page, update intervals per sensor).

Host hwmon / IIO sensors are read from fake sysfs trees in tmp_path (this
machine has neither /sys/class/hwmon nor IIO devices); the file formats and
unit handling are those of the kernel's sysfs ABI.
"""
from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.devices.scmi import EVENTQ, VIRTIO_SCMI_F_P2A_CHANNELS, ScmiBackend, parse_device
from vhostuser.devices.scmi import protocol as p
from vhostuser.devices.scmi.protocol import Header, Status
from vhostuser.devices.scmi.sensors import UNIT_DEGREES_C, UNIT_VOLTS, FakeSensor, SensorError
from vhostuser.testing import FrontendOptions, MockFrontend

PDU = 136
TIMEOUT = 10.0
CMDQ = 0


class ScmiAgent:
    """What Linux's SCMI core does over the virtio transport."""

    def __init__(self, socket_path: str, *, p2a: bool = True, event_buffers: int = 8) -> None:
        self.fe = MockFrontend.connect(socket_path, FrontendOptions(
            device_features=(1 << VIRTIO_SCMI_F_P2A_CHANNELS) if p2a else 0, queue_size=64,
            num_queues=2 if p2a else 1))
        self.token = 0
        if p2a:
            for _ in range(event_buffers):
                self.fe.add(EVENTQ, [], [PDU])
            self.fe.publish(EVENTQ)

    def close(self) -> None:
        self.fe.close()

    def raw(self, request: bytes, room: int = PDU) -> bytes:
        return self.fe.request(CMDQ, [request], [room], timeout=TIMEOUT).data

    def xfer(self, protocol: int, message: int, *params: int, room: int = PDU,
             message_type: int = p.MSG_TYPE_COMMAND) -> tuple[int, bytes]:
        self.token = (self.token + 1) & 0x3FF
        header = Header(protocol, message, message_type, self.token).pack()
        data = self.raw(struct.pack(f"<I{len(params)}I", header, *params), room)
        got, status = struct.unpack_from("<Ii", data)
        assert got == header, "the response repeats the request's header"
        return status, data[8:]

    def ok(self, protocol: int, message: int, *params: int) -> bytes:
        status, payload = self.xfer(protocol, message, *params)
        assert status == Status.SUCCESS, Status(status).name
        return payload

    # scmi_base_protocol_init
    def base_init(self) -> dict:
        info: dict = {}
        info["version"] = struct.unpack("<I", self.ok(p.BASE_PROTOCOL_ID, p.PROTOCOL_VERSION))[0]
        attrs = self.ok(p.BASE_PROTOCOL_ID, p.PROTOCOL_ATTRIBUTES)
        info["num_protocols"], info["num_agents"] = attrs[0], attrs[1]
        info["vendor"] = self.ok(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_VENDOR)[:16].rstrip(b"\0")
        info["sub_vendor"] = self.ok(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_SUB_VENDOR)[:16].rstrip(b"\0")
        info["impl"] = struct.unpack("<I", self.ok(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_IMPLEMENTATION_VERSION))[0]
        protocols: list[int] = []
        while True:  # scmi_base_implementation_list_get
            payload = self.ok(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_LIST_PROTOCOLS, len(protocols))
            (n,) = struct.unpack_from("<I", payload)
            if not n:
                break
            protocols += list(payload[4:4 + n])
        info["protocols"] = protocols
        info["agents"] = {}
        for agent in range(info["num_agents"] + 1):
            payload = self.ok(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_AGENT, agent)
            info["agents"][struct.unpack_from("<I", payload)[0]] = payload[4:20].rstrip(b"\0").decode()
        return info

    # scmi_sensors_protocol_init
    def sensor_init(self) -> list[dict]:
        assert struct.unpack("<I", self.ok(p.SENSOR_PROTOCOL_ID, p.PROTOCOL_VERSION))[0] == 0x30000
        num_sensors = struct.unpack_from("<H", self.ok(p.SENSOR_PROTOCOL_ID, p.PROTOCOL_ATTRIBUTES))[0]
        sensors: list[dict] = []
        while True:  # scmi_sensor_description_get
            payload = self.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_DESCRIPTION_GET, len(sensors))
            returned, remaining = struct.unpack_from("<HH", payload)
            assert len(sensors) + returned <= num_sensors
            for k in range(returned):
                sid, low, high, name = p.SENSOR_DESCRIPTOR.unpack_from(payload, 4 + 28 * k)
                exp = (high >> 11) & 0x1F
                sensors.append({"id": sid, "update": bool(low & (1 << 30)), "type": high & 0xFF,
                                "scale": exp - 32 if exp & 0x10 else exp, "name": name.rstrip(b"\0").decode()})
                status, intervals = self.xfer(p.SENSOR_PROTOCOL_ID, p.SENSOR_LIST_UPDATE_INTERVALS, sid, 0)
                assert status == Status.SUCCESS and struct.unpack_from("<I", intervals)[0] & 0xFFF == 1
            if not (returned and remaining):
                break
        assert len(sensors) == num_sensors
        return sensors

    def read(self, sensor_id: int) -> int:
        payload = self.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, sensor_id, 0)
        return struct.unpack_from("<q", payload)[0]

    def events(self, count: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < count:
            for u in self.fe.wait_used(EVENTQ, 1, TIMEOUT):
                out.append(u.data)
                self.fe.add(EVENTQ, [], [PDU])
            self.fe.publish(EVENTQ)
        return out


@pytest.fixture
def sysfs(tmp_path):  # noqa: ANN001, ANN201
    hwmon = tmp_path / "hwmon0"
    hwmon.mkdir()
    (hwmon / "temp1_input").write_text("42500\n")
    (hwmon / "in0_input").write_text("1200\n")
    iio = tmp_path / "iio:device0"
    iio.mkdir()
    (iio / "in_temp_raw").write_text("100\n")
    (iio / "in_temp_offset").write_text("-10\n")
    (iio / "in_temp_scale").write_text("250.5\n")
    return hwmon, iio


@pytest.fixture
def agent(serve_backend, sysfs):  # noqa: ANN001, ANN201
    hwmon, iio = sysfs
    specs = ["fake,name=counter", f"hwmon,path={hwmon},channel=temp1,name=cpu", f"hwmon,path={hwmon},channel=in0",
             f"iio,path={iio},channel=in_temp", "fake,name=a-very-long-sensor-name", "fake"]
    backend = ScmiBackend([parse_device(s, i) for i, s in enumerate(specs)], update_interval=0.05)
    a = ScmiAgent(serve_backend(backend))
    a.backend = backend
    yield a
    a.close()


def test_base_protocol_discovery(agent) -> None:  # noqa: ANN001
    info = agent.base_init()
    assert info["version"] == 0x20000 and info["num_protocols"] == 1 and info["num_agents"] == 1
    assert info["vendor"] == b"vhostuser" and info["sub_vendor"] == b"python"
    assert info["impl"] == p.IMPLEMENTATION_VERSION
    assert info["protocols"] == [p.SENSOR_PROTOCOL_ID]
    assert info["agents"] == {0: "platform", 1: "OSPM"}
    status, payload = agent.xfer(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_AGENT, 0xFFFFFFFF)
    assert status == 0 and struct.unpack_from("<I", payload)[0] == 1
    assert agent.xfer(p.BASE_PROTOCOL_ID, p.PROTOCOL_MESSAGE_ATTRIBUTES, p.BASE_DISCOVER_VENDOR) == (0, bytes(4))
    assert agent.xfer(p.BASE_PROTOCOL_ID, p.PROTOCOL_MESSAGE_ATTRIBUTES, 0x9)[0] == Status.NOT_FOUND


def test_sensor_discovery_pages_through_small_buffers(agent) -> None:  # noqa: ANN001
    agent.base_init()
    sensors = agent.sensor_init()  # 6 sensors, 4 fit a 136-byte response: two pages
    assert [s["id"] for s in sensors] == list(range(6))
    assert [s["name"] for s in sensors] == ["counter", "cpu", "hwmon0:in0", "iio:device0:in_", "a-very-long-sen",
                                            "fake5"]
    assert sensors[1]["type"] == UNIT_DEGREES_C and sensors[1]["scale"] == -3
    assert sensors[2]["type"] == UNIT_VOLTS and sensors[2]["scale"] == -3
    assert sensors[3]["type"] == UNIT_DEGREES_C and sensors[3]["scale"] == -6
    assert all(s["update"] for s in sensors)


def test_readings_and_config(agent, sysfs) -> None:  # noqa: ANN001
    hwmon, _iio = sysfs
    assert [agent.read(0) for _ in range(3)] == [0, 1, 2]
    assert agent.read(1) == 42500  # 42.5 degC at 10^-3
    (hwmon / "temp1_input").write_text("-5000\n")
    assert agent.read(1) == -5000
    assert agent.read(2) == 1200
    assert agent.read(3) == round((100 - 10) * 250.5 * 1000)
    # disable: reads denied; config reflects it
    assert agent.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_GET, 0) == struct.pack("<I", 1)
    agent.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_SET, 0, 0)
    assert agent.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_GET, 0) == struct.pack("<I", 0)
    assert agent.xfer(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, 0, 0)[0] == Status.DENIED
    agent.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_SET, 0, 1)
    assert agent.read(0) == 3


def test_continuous_update_notifications_on_the_eventq(agent) -> None:  # noqa: ANN001
    agent.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONTINUOUS_UPDATE_NOTIFY, 1, 1)
    events = agent.events(3)
    for e in events:
        header, agent_id, sensor_id, value = struct.unpack_from("<IIIq", e)
        assert Header.unpack(header) == Header(p.SENSOR_PROTOCOL_ID, p.SENSOR_UPDATE, p.MSG_TYPE_NOTIFICATION)
        assert (agent_id, sensor_id, value) == (1, 1, 42500)
        assert len(e) == 4 + 8 + 16
    agent.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONTINUOUS_UPDATE_NOTIFY, 1, 0)
    agent.backend.notify_update(5)  # an explicit one still goes out
    got = agent.events(1)
    while struct.unpack_from("<I", got[-1], 8)[0] != 5:  # updates in flight before the disable
        got = agent.events(1)
    assert struct.unpack_from("<q", got[-1], 12)[0] == 0


BAD = [
    # (protocol, message, params, expected status)
    pytest.param(0x14, 0x0, (), Status.NOT_SUPPORTED, id="unknown-protocol"),
    pytest.param(p.BASE_PROTOCOL_ID, 0x20, (), Status.NOT_SUPPORTED, id="unknown-message"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, (), Status.PROTOCOL_ERROR, id="missing-params"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, (6, 0), Status.NOT_FOUND, id="sensor-id-out-of-range"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, (0xFFFFFFFF, 0), Status.NOT_FOUND, id="sensor-id-max"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, (0, 1), Status.NOT_SUPPORTED, id="async-read"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_DESCRIPTION_GET, (6,), Status.INVALID_PARAMETERS,
                 id="desc-index-out-of-range"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_SET, (0, 0x10), Status.INVALID_PARAMETERS,
                 id="config-reserved-bits"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_GET, (9,), Status.NOT_FOUND, id="config-unknown-sensor"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONTINUOUS_UPDATE_NOTIFY, (0, 2), Status.INVALID_PARAMETERS,
                 id="notify-enable-2"),
    pytest.param(p.SENSOR_PROTOCOL_ID, p.SENSOR_LIST_UPDATE_INTERVALS, (0, 1), Status.OUT_OF_RANGE,
                 id="interval-index"),
    pytest.param(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_LIST_PROTOCOLS, (5,), Status.INVALID_PARAMETERS,
                 id="list-protocols-skip"),
    pytest.param(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_AGENT, (7,), Status.NOT_FOUND, id="unknown-agent"),
]


@pytest.mark.parametrize("protocol,message,params,expected", BAD)
def test_bad_commands_get_an_scmi_status_and_a_log_line(agent, protocol, message, params, expected,  # noqa: ANN001
                                                         caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vhostuser.devices.scmi"):
        status, payload = agent.xfer(protocol, message, *params)
    assert (status, payload) == (expected, b"")
    assert f"({expected.name})" in caplog.text
    assert agent.read(5) == 0  # still serving


def test_malformed_messages(no_fd_leak, agent, caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.WARNING, logger="vhostuser.devices.scmi"):
        # not a command: a notification sent by the agent
        assert agent.xfer(p.BASE_PROTOCOL_ID, 0, message_type=p.MSG_TYPE_NOTIFICATION)[0] == Status.NOT_SUPPORTED
        # no header at all
        assert agent.raw(b"\x01\x02") == struct.pack("<Ii", 0, Status.PROTOCOL_ERROR)
        # oversized request
        header = Header(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, token=3).pack()
        big = struct.pack("<I", header) + bytes(200)
        assert agent.raw(big) == struct.pack("<Ii", header, Status.PROTOCOL_ERROR)
        # response buffer too small for header + status: returned empty
        assert agent.fe.request(CMDQ, [struct.pack("<I", header)], [4], timeout=TIMEOUT).length == 0
        # response that does not fit: COMMS_ERROR in what fits
        status, _ = agent.xfer(p.BASE_PROTOCOL_ID, p.BASE_DISCOVER_VENDOR, room=12)
        assert status == Status.COMMS_ERROR
        # a readable buffer on the eventq (wrong queue direction): returned empty
        agent.fe.add(EVENTQ, [b"junk"], [])
        agent.fe.publish(EVENTQ)
        used: list = []
        for _ in range(9):  # the 8 buffers posted at probe, then the junk one
            agent.backend.notify_update(5)
        while len(used) < 9:
            used += agent.fe.wait_used(EVENTQ, 1, TIMEOUT)
    assert [u.length for u in used] == [28] * 8 + [0]
    assert "no header" in caplog.text and "above the" in caplog.text and "eventq buffer unusable" in caplog.text
    assert agent.read(5) == 9  # the fake counter advanced once per notification


def test_without_p2a_channels_notifications_are_refused(serve_backend) -> None:  # noqa: ANN001
    backend = ScmiBackend([FakeSensor("x")])
    a = ScmiAgent(serve_backend(backend), p2a=False)
    try:
        assert a.xfer(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONTINUOUS_UPDATE_NOTIFY, 0, 1)[0] == Status.NOT_SUPPORTED
        assert a.read(0) == 0
    finally:
        a.close()


def test_sensor_read_failure_is_a_hardware_error(agent, sysfs) -> None:  # noqa: ANN001
    hwmon, _iio = sysfs
    (hwmon / "temp1_input").unlink()
    assert agent.xfer(p.SENSOR_PROTOCOL_ID, p.SENSOR_READING_GET, 1, 0)[0] == Status.HARDWARE_ERROR
    assert agent.read(0) == 0


@pytest.mark.parametrize("spec", ["bogus", "fake,colour=red", "fake,name", "hwmon,path=/x", "iio,channel=in_temp",
                                  "hwmon,path=/nonexistent,channel=temp1"])
def test_bad_device_specs(spec: str) -> None:
    with pytest.raises(SensorError):
        parse_device(spec, 0)


def test_command_serves_sensors(tmp_path, sysfs) -> None:  # noqa: ANN001
    import signal
    import subprocess

    from helpers.procs import vhostuser_process, wait_for_path

    hwmon, _iio = sysfs
    sock = tmp_path / "scmi.sock"
    with vhostuser_process(["scmi", "--socket-path", str(sock), "-d", "fake,name=f",
                            "-d", f"hwmon,path={hwmon},channel=temp1"], stderr=subprocess.PIPE, text=True) as proc:
        wait_for_path(sock, proc)
        a = ScmiAgent(str(sock))
        try:
            assert a.base_init()["protocols"] == [p.SENSOR_PROTOCOL_ID]
            assert [s["name"] for s in a.sensor_init()] == ["f", "hwmon0:temp1"]
            assert a.read(1) == 42500
        finally:
            a.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_command_refuses_a_bad_device_spec(tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vhostuser", "scmi", "--help-devices"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(kind in out.stdout for kind in ("fake", "hwmon,path=", "iio,path="))

    out = subprocess.run([sys.executable, "-m", "vhostuser", "scmi", "-s", str(tmp_path / "s"), "-d", "fake,x=1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "unknown properties" in out.stderr


_requests = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda proto, msg, mtype, params: struct.pack("<I", Header(proto, msg, mtype, 5).pack()) + params,
              st.sampled_from([0x10, 0x15, 0x11, 0xFF]), st.integers(0, 12), st.sampled_from([0, 0, 0, 2, 3]),
              st.binary(max_size=16)))


@given(request=_requests, room=st.integers(0, 200))
def test_platform_answers_anything_within_the_buffer(request: bytes, room: int) -> None:
    platform = p.ScmiPlatform([FakeSensor("a"), FakeSensor("b")])
    response = platform.handle(request, room)
    assert len(response) <= max(room, 0)
    if len(request) >= 4 and room >= 8:
        assert response[:4] == request[:4]
        assert struct.unpack_from("<i", response, 4)[0] in set(Status)


def test_a_new_agent_starts_without_notifications(serve_backend) -> None:  # noqa: ANN001
    backend = ScmiBackend([FakeSensor("x", step=0, value=7)], update_interval=0.05)
    path = serve_backend(backend)
    first = ScmiAgent(path)
    first.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONTINUOUS_UPDATE_NOTIFY, 0, 1)
    assert first.events(1)
    first.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_SET, 0, 0)
    first.close()
    second = ScmiAgent(path)
    try:
        assert second.ok(p.SENSOR_PROTOCOL_ID, p.SENSOR_CONFIG_GET, 0) == struct.pack("<I", 1)
        assert second.read(0) == 7
        with pytest.raises(TimeoutError):
            second.fe.wait_used(EVENTQ, 1, 0.5)
        assert not backend.platform.sensors[0].notify
    finally:
        second.close()


def test_control_plane_conformance(no_fd_leak, serve_backend) -> None:  # noqa: ANN001
    from vhostuser.testing.checker import format_report, run_checks

    results = run_checks(serve_backend(ScmiBackend([FakeSensor("x")])), timeout=5)
    assert all(r.status in ("pass", "skip") for r in results), format_report(results)
    assert sum(r.status == "pass" for r in results) >= 10, format_report(results)
