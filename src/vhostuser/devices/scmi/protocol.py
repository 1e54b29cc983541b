"""The SCMI platform side: message headers, the base protocol (0x10) and the
sensor management protocol (0x15), independent of the transport.

A message is a 32-bit header (``message_id`` bits 7:0, ``message_type`` 9:8,
``protocol_id`` 17:10, ``token`` 27:18) and 32-bit little-endian parameters;
a response repeats the header, then a signed 32-bit status, then the return
values (Arm SCMI spec DEN0056, sections 4.1 and 4.3/4.5).
"""
from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sensors import Sensor, SensorError

log = logging.getLogger(__name__)

BASE_PROTOCOL_ID = 0x10
SENSOR_PROTOCOL_ID = 0x15

MSG_TYPE_COMMAND = 0
MSG_TYPE_DELAYED_RESPONSE = 2
MSG_TYPE_NOTIFICATION = 3

# common to every protocol
PROTOCOL_VERSION = 0x0
PROTOCOL_ATTRIBUTES = 0x1
PROTOCOL_MESSAGE_ATTRIBUTES = 0x2
# base protocol
BASE_DISCOVER_VENDOR = 0x3
BASE_DISCOVER_SUB_VENDOR = 0x4
BASE_DISCOVER_IMPLEMENTATION_VERSION = 0x5
BASE_DISCOVER_LIST_PROTOCOLS = 0x6
BASE_DISCOVER_AGENT = 0x7
# sensor protocol
SENSOR_DESCRIPTION_GET = 0x3
SENSOR_READING_GET = 0x6
SENSOR_LIST_UPDATE_INTERVALS = 0x8
SENSOR_CONFIG_GET = 0x9
SENSOR_CONFIG_SET = 0xA
SENSOR_CONTINUOUS_UPDATE_NOTIFY = 0xB
#: notification message id
SENSOR_UPDATE = 0x1

BASE_VERSION = 0x20000    # 2.0
SENSOR_VERSION = 0x30000  # 3.0

VENDOR = "vhostuser"
SUB_VENDOR = "python"
IMPLEMENTATION_VERSION = 0x00000100
#: agent names by id: 0 is the platform, 1 the guest (OSPM)
AGENTS = {0: "platform", 1: "OSPM"}
CALLER_AGENT_ID = 1

#: sensor descriptor: id, attributes_low, attributes_high, name[16]
SENSOR_DESCRIPTOR = struct.Struct("<III16s")
#: attributes_low bit 30: continuous update notifications supported
SENSOR_ATTR_UPDATE_NOTIFY = 1 << 30


class Status(enum.IntEnum):
    """SCMI status codes."""

    SUCCESS = 0
    NOT_SUPPORTED = -1
    INVALID_PARAMETERS = -2
    DENIED = -3
    NOT_FOUND = -4
    OUT_OF_RANGE = -5
    BUSY = -6
    COMMS_ERROR = -7
    GENERIC_ERROR = -8
    HARDWARE_ERROR = -9
    PROTOCOL_ERROR = -10


@dataclass(frozen=True)
class Header:
    """An SCMI message header."""

    protocol_id: int
    message_id: int
    message_type: int = MSG_TYPE_COMMAND
    token: int = 0

    def pack(self) -> int:
        """The 32-bit SCMI message header."""
        return ((self.message_id & 0xFF) | (self.message_type & 0x3) << 8 | (self.protocol_id & 0xFF) << 10
                | (self.token & 0x3FF) << 18)

    @classmethod
    def unpack(cls, value: int) -> Header:
        """Split a 32-bit SCMI message header into its fields."""
        return cls(protocol_id=(value >> 10) & 0xFF, message_id=value & 0xFF, message_type=(value >> 8) & 0x3,
                   token=(value >> 18) & 0x3FF)


def short_name(name: str) -> bytes:
    """A 16-byte NUL-terminated SCMI short name."""
    return name.encode("utf-8", "replace")[:15].ljust(16, b"\0")


def u32s(*values: int) -> bytes:
    """``values`` as consecutive little-endian u32s (each masked to 32 bits)."""
    return struct.pack(f"<{len(values)}I", *(v & 0xFFFFFFFF for v in values))


class ScmiError(Exception):
    """A command fails with ``status`` (and a reason for the log)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class ScmiPlatform:
    """The base and sensor protocols over ``sensors`` (sensor id = index).

    :meth:`handle` turns a request into a response; notifications for the
    sensors with updates turned on come from :meth:`sensor_update`.
    """

    def __init__(self, sensors: Sequence[Sensor], *, notifications: Callable[[], bool] = lambda: True) -> None:
        self.sensors = list(sensors)
        #: whether notifications can reach the agent (VIRTIO_SCMI_F_P2A_CHANNELS negotiated)
        self.notifications = notifications
        self._handlers: dict[tuple[int, int], tuple[int, Callable[[list[int], int], bytes]]] = {
            (BASE_PROTOCOL_ID, PROTOCOL_VERSION): (0, lambda p, room: u32s(BASE_VERSION)),
            (BASE_PROTOCOL_ID, PROTOCOL_ATTRIBUTES): (0, lambda p, room: u32s(len(self.protocols) | len(AGENTS) - 1 << 8)),
            (BASE_PROTOCOL_ID, PROTOCOL_MESSAGE_ATTRIBUTES): (1, self._message_attributes(BASE_PROTOCOL_ID)),
            (BASE_PROTOCOL_ID, BASE_DISCOVER_VENDOR): (0, lambda p, room: short_name(VENDOR)),
            (BASE_PROTOCOL_ID, BASE_DISCOVER_SUB_VENDOR): (0, lambda p, room: short_name(SUB_VENDOR)),
            (BASE_PROTOCOL_ID, BASE_DISCOVER_IMPLEMENTATION_VERSION): (0, lambda p, room: u32s(IMPLEMENTATION_VERSION)),
            (BASE_PROTOCOL_ID, BASE_DISCOVER_LIST_PROTOCOLS): (1, self._list_protocols),
            (BASE_PROTOCOL_ID, BASE_DISCOVER_AGENT): (1, self._discover_agent),
            (SENSOR_PROTOCOL_ID, PROTOCOL_VERSION): (0, lambda p, room: u32s(SENSOR_VERSION)),
            (SENSOR_PROTOCOL_ID, PROTOCOL_ATTRIBUTES): (0, lambda p, room: u32s(len(self.sensors), 0, 0, 0)),
            (SENSOR_PROTOCOL_ID, PROTOCOL_MESSAGE_ATTRIBUTES): (1, self._message_attributes(SENSOR_PROTOCOL_ID)),
            (SENSOR_PROTOCOL_ID, SENSOR_DESCRIPTION_GET): (1, self._description_get),
            (SENSOR_PROTOCOL_ID, SENSOR_READING_GET): (2, self._reading_get),
            (SENSOR_PROTOCOL_ID, SENSOR_LIST_UPDATE_INTERVALS): (2, self._list_update_intervals),
            (SENSOR_PROTOCOL_ID, SENSOR_CONFIG_GET): (1, self._config_get),
            (SENSOR_PROTOCOL_ID, SENSOR_CONFIG_SET): (2, self._config_set),
            (SENSOR_PROTOCOL_ID, SENSOR_CONTINUOUS_UPDATE_NOTIFY): (2, self._update_notify),
        }
        #: the update interval reported for every sensor, in milliseconds
        self.update_interval_ms = 1000

    @property
    def protocols(self) -> list[int]:
        """The protocols besides base."""
        return [SENSOR_PROTOCOL_ID]

    # ------------------------------------------------------------ dispatch
    def handle(self, request: bytes, room: int) -> bytes:
        """The response to ``request`` (header + parameters), at most ``room``
        bytes long (the agent's buffer): header, status, return values."""
        if len(request) < 4:
            log.warning("scmi: request of %d bytes has no header", len(request))
            return u32s(0, Status.PROTOCOL_ERROR)[:max(room, 0)]
        (raw,) = struct.unpack_from("<I", request)
        header = Header.unpack(raw)
        try:
            payload = self._dispatch(header, request[4:], room - 8)
            status = Status.SUCCESS
        except ScmiError as exc:
            log.warning("scmi: protocol %#x message %#x: %s (%s)", header.protocol_id, header.message_id, exc,
                        exc.status.name)
            payload, status = b"", exc.status
        response = struct.pack("<Ii", raw, status) + payload
        if len(response) > room:
            log.warning("scmi: response of %d bytes does not fit the %d-byte buffer", len(response), room)
            return struct.pack("<Ii", raw, Status.COMMS_ERROR)[:max(room, 0)]
        return response

    def _dispatch(self, header: Header, payload: bytes, room: int) -> bytes:
        if header.message_type != MSG_TYPE_COMMAND:
            raise ScmiError(Status.NOT_SUPPORTED, f"message type {header.message_type} is not a command")
        entry = self._handlers.get((header.protocol_id, header.message_id))
        if entry is None:
            raise ScmiError(Status.NOT_SUPPORTED, "no such protocol or message")
        nparams, handler = entry
        if len(payload) < 4 * nparams:
            raise ScmiError(Status.PROTOCOL_ERROR, f"{len(payload)} bytes of parameters, need {4 * nparams}")
        params = list(struct.unpack_from(f"<{nparams}I", payload))
        return handler(params, room)

    # ------------------------------------------------------------ base
    def _message_attributes(self, protocol_id: int) -> Callable[[list[int], int], bytes]:
        def handler(params: list[int], room: int) -> bytes:
            if (protocol_id, params[0]) not in self._handlers:
                raise ScmiError(Status.NOT_FOUND, f"message {params[0]:#x} not implemented")
            return u32s(0)
        return handler

    def _list_protocols(self, params: list[int], room: int) -> bytes:
        skip = params[0]
        if skip > len(self.protocols):
            raise ScmiError(Status.INVALID_PARAMETERS, f"skip {skip} beyond {len(self.protocols)} protocols")
        rest = bytes(self.protocols[skip:])
        return u32s(len(rest)) + rest.ljust(-(-len(rest) // 4) * 4, b"\0")

    def _discover_agent(self, params: list[int], room: int) -> bytes:
        agent = CALLER_AGENT_ID if params[0] == 0xFFFFFFFF else params[0]
        if agent not in AGENTS:
            raise ScmiError(Status.NOT_FOUND, f"no agent {params[0]}")
        return u32s(agent) + short_name(AGENTS[agent])

    # ------------------------------------------------------------ sensor
    def _sensor(self, sensor_id: int) -> Sensor:
        if sensor_id >= len(self.sensors):
            raise ScmiError(Status.NOT_FOUND, f"no sensor {sensor_id} (there are {len(self.sensors)})")
        return self.sensors[sensor_id]

    def _description_get(self, params: list[int], room: int) -> bytes:
        first = params[0]
        if first >= len(self.sensors):
            raise ScmiError(Status.INVALID_PARAMETERS, f"desc_index {first} beyond {len(self.sensors)} sensors")
        fit = max(1, (room - 4) // SENSOR_DESCRIPTOR.size)  # as many as the agent's buffer holds
        chosen = range(first, min(len(self.sensors), first + fit))
        remaining = len(self.sensors) - chosen.stop
        out = bytearray(u32s(len(chosen) | remaining << 16))
        for i in chosen:
            s = self.sensors[i]
            out += SENSOR_DESCRIPTOR.pack(i, SENSOR_ATTR_UPDATE_NOTIFY, (s.exponent & 0x1F) << 11 | s.unit,
                                          short_name(s.name))
        return bytes(out)

    def reading(self, sensor: Sensor) -> bytes:
        """One ``scmi_sensor_reading_resp``: value (64-bit, signed), timestamp 0."""
        try:
            value = sensor.read()
        except SensorError as exc:
            raise ScmiError(Status.HARDWARE_ERROR, str(exc)) from exc
        return struct.pack("<qQ", value, 0)

    def _reading_get(self, params: list[int], room: int) -> bytes:
        sensor = self._sensor(params[0])
        if params[1] & 1:
            raise ScmiError(Status.NOT_SUPPORTED, "asynchronous reads are not supported")
        if not sensor.enabled:
            raise ScmiError(Status.DENIED, f"sensor {params[0]} is disabled")
        return self.reading(sensor)

    def _list_update_intervals(self, params: list[int], room: int) -> bytes:
        self._sensor(params[0])
        if params[1] != 0:
            raise ScmiError(Status.OUT_OF_RANGE, f"interval index {params[1]} beyond the one interval")
        # one interval: bits 31:5 seconds multiplier, 4:0 signed decimal exponent (here -3: ms)
        return u32s(1, self.update_interval_ms << 5 | (-3 & 0x1F))

    def _config_get(self, params: list[int], room: int) -> bytes:
        return u32s(int(self._sensor(params[0]).enabled))

    def _config_set(self, params: list[int], room: int) -> bytes:
        sensor = self._sensor(params[0])
        if params[1] & ~1:
            raise ScmiError(Status.INVALID_PARAMETERS, f"sensor_config {params[1]:#x} sets unsupported bits")
        sensor.enabled = bool(params[1] & 1)
        return b""

    def _update_notify(self, params: list[int], room: int) -> bytes:
        sensor = self._sensor(params[0])
        if params[1] > 1:
            raise ScmiError(Status.INVALID_PARAMETERS, f"notify_enable {params[1]:#x}")
        if params[1] and not self.notifications():
            raise ScmiError(Status.NOT_SUPPORTED, "no notification channel (VIRTIO_SCMI_F_P2A_CHANNELS)")
        sensor.notify = bool(params[1])
        return b""

    def sensor_update(self, sensor_id: int) -> bytes | None:
        """A SENSOR_UPDATE notification (header + agent_id, sensor_id, reading)
        for ``sensor_id``, or None if it cannot be read now."""
        try:
            reading = self.reading(self.sensors[sensor_id])
        except ScmiError as exc:
            log.warning("scmi: no update for sensor %d: %s", sensor_id, exc)
            return None
        header = Header(SENSOR_PROTOCOL_ID, SENSOR_UPDATE, MSG_TYPE_NOTIFICATION)
        return u32s(header.pack(), CALLER_AGENT_ID, sensor_id) + reading
