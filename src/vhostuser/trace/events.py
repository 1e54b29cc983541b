"""What ``vhostuser trace`` reports: one :class:`TraceEvent` per relayed message,
connection change, spec finding or summary, and the JSON Lines schema of them.

Every event is a flat JSON object (``--json``); the field names below are stable
(documented in ``docs/tools/trace.md``).  Fields that do not apply are left out.

=============  ===============================================================
``kind``       ``request`` | ``reply`` | ``connect`` | ``eof`` | ``close`` |
               ``error`` | ``finding`` | ``ring`` | ``summary``
``seq``        number of the event in this trace (1, 2, ...)
``t``          seconds since the proxy started (float)
``ts``         wall-clock time, seconds since the epoch (float)
``session``    connection number (1 for the first front-end connection, ...)
``channel``    ``main`` (front-end socket) or ``backend`` (SET_BACKEND_REQ_FD channel)
``dir``        ``F->B`` (front-end to back-end) or ``B->F``
``request``    request name (``GET_FEATURES``); ``code`` its number
``flags``      header flags (int); ``flag_names`` e.g. ``["REPLY"]``
``size``       payload size in bytes
``payload``    decoded payload fields (dict; ints, lists, hex strings for bytes)
``decoded``    names for bit fields (features, protocol features), by field
``fds``        list of ``{"kind": "memfd"|"eventfd"|"socket"|..., "size": int}``
``reply_to``   for a reply: ``seq`` of the request it answers; ``latency_ms``
``nack``       for a REPLY_ACK reply: true when the u64 is non-zero
``error``      a message the codec could not decode: why
``text``       free text (connect/eof/close/error events)
``rule`` ...   findings: ``who`` (frontend|backend), ``rule``, ``section``,
               ``severity`` (error|warning), ``about`` (seq of the message)
=============  ===============================================================
"""
from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..protocol.message import VhostUserHeaderFlag, VhostUserProtocolFeatures, VirtioFeatures
from ..protocol.payloads import Payload

__all__ = ["TraceEvent", "payload_fields", "flag_names", "feature_names", "protocol_feature_names",
           "DEVICE_FEATURES"]

#: device-specific feature bit names (bits 0..23), by device type
DEVICE_FEATURES: dict[str, dict[int, str]] = {
    "blk": {1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 9: "FLUSH", 10: "TOPOLOGY",
            11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES", 15: "LIFETIME", 16: "SECURE_ERASE"},
    "net": {0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 7: "GUEST_TSO4",
            8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4", 12: "HOST_TSO6", 13: "HOST_ECN",
            14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN",
            21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR"},
    "vsock": {0: "STREAM", 1: "SEQPACKET"},
    "console": {0: "SIZE", 1: "MULTIPORT", 2: "EMERG_WRITE"},
    "rng": {},
    "scsi": {0: "INOUT", 1: "HOTPLUG", 2: "CHANGE", 3: "T10_PI"},
}


def _bit_names(value: int, flag_type: type[enum.IntFlag], device: dict[int, str] | None = None) -> list[str]:
    names: list[str] = []
    for bit in range(64):
        if not value >> bit & 1:
            continue
        if device is not None and bit < 24:
            names.append(device.get(bit, f"bit{bit}"))
            continue
        try:
            member = flag_type(1 << bit)
            names.append(member.name or f"bit{bit}")
        except ValueError:
            names.append(f"bit{bit}")
    return names


def feature_names(value: int, device: str | None = None) -> list[str]:
    """Names of the virtio feature bits set in ``value`` (device bits by ``device`` type)."""
    return _bit_names(value, VirtioFeatures, DEVICE_FEATURES.get(device or "", {}))


def protocol_feature_names(value: int) -> list[str]:
    """Names of the vhost-user protocol feature bits set in ``value``."""
    return _bit_names(value, VhostUserProtocolFeatures)


def flag_names(flags: int) -> list[str]:
    """Names of the header flags set (``REPLY``, ``NEED_REPLY``)."""
    return [f.name for f in (VhostUserHeaderFlag.REPLY, VhostUserHeaderFlag.NEED_REPLY) if flags & f and f.name]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Payload) and dataclasses.is_dataclass(value):
        return payload_fields(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return int(value.value)
    return value


def payload_fields(payload: Payload) -> dict[str, Any]:
    """The fields of a decoded payload as JSON-ready values."""
    if not dataclasses.is_dataclass(payload):
        return {}
    return {f.name: _jsonable(getattr(payload, f.name)) for f in dataclasses.fields(payload)}


@dataclass
class TraceEvent:
    """One line of the trace (see the module docstring for the fields)."""

    kind: str
    seq: int = 0
    t: float = 0.0
    ts: float = 0.0
    session: int | None = None
    channel: str | None = None
    dir: str | None = None
    request: str | None = None
    code: int | None = None
    flags: int | None = None
    flag_names: list[str] | None = None
    size: int | None = None
    payload: dict[str, Any] | None = None
    decoded: dict[str, list[str]] | None = None
    fds: list[dict[str, Any]] | None = None
    reply_to: int | None = None
    latency_ms: float | None = None
    nack: bool | None = None
    error: str | None = None
    text: str | None = None
    who: str | None = None
    rule: str | None = None
    section: str | None = None
    severity: str | None = None
    about: int | None = None
    data: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """The event as a dict without the fields that do not apply."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_json(self) -> str:
        """One JSON Lines line (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceEvent:
        """Inverse of :meth:`to_dict` (round-trips)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown trace event fields: {sorted(unknown)}")
        return cls(**d)
