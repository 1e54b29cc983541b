"""Sensors an SCMI agent can read: fake values, host hwmon and IIO files.

Each :class:`Sensor` has a name (at most 15 bytes reach the guest), an SCMI
unit type and a decimal exponent, and :meth:`Sensor.read` returns an integer
reading (value = reading x 10^exponent units).  :func:`parse_device` builds
one from vhost-device-scmi's ``--device`` syntax: ``KIND,PROPERTY=VALUE,...``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

# SCMI sensor unit types (SCMI spec, "Sensor unit types")
UNIT_NONE = 0
UNIT_UNSPECIFIED = 1
UNIT_DEGREES_C = 2
UNIT_VOLTS = 5
UNIT_AMPS = 6
UNIT_WATTS = 7
UNIT_JOULES = 8
UNIT_LUX = 13
UNIT_RADIANS_PER_SECOND = 87
UNIT_METERS_PER_SECOND_SQUARED = 89
UNIT_PERCENTAGE = 65
UNIT_PASCALS = 66


class SensorError(Exception):
    """A sensor could not be set up or read."""


@dataclass
class Sensor:
    """One SCMI sensor (scalar: no axes)."""

    name: str
    unit: int = UNIT_UNSPECIFIED
    exponent: int = 0
    #: SENSOR_CONFIG bit 0: the sensor is enabled (Linux's scmi-hwmon / iio read enabled sensors)
    enabled: bool = True
    #: SENSOR_CONTINUOUS_UPDATE_NOTIFY is on
    notify: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self) -> int:
        """The current reading (raises SensorError)."""
        raise NotImplementedError


@dataclass
class FakeSensor(Sensor):
    """A reading that counts up by one on every read (vhost-device-scmi's ``fake``),
    or stays at ``value`` when :attr:`step` is 0."""

    value: int = 0
    step: int = 1

    def read(self) -> int:
        with self._lock:
            value = self.value
            self.value += self.step
        return value


def _read_number(path: str) -> float:
    try:
        with open(path, encoding="ascii") as f:
            return float(f.read().strip())
    except (OSError, ValueError) as exc:
        raise SensorError(f"cannot read {path}: {exc}") from exc


#: hwmon channel type -> (SCMI unit, exponent of its sysfs unit) (Documentation/hwmon/sysfs-interface.rst)
HWMON_UNITS = {
    "temp": (UNIT_DEGREES_C, -3), "in": (UNIT_VOLTS, -3), "curr": (UNIT_AMPS, -3),
    "power": (UNIT_WATTS, -6), "energy": (UNIT_JOULES, -6), "humidity": (UNIT_PERCENTAGE, -3),
}
#: IIO channel type -> (SCMI unit, exponent of raw*scale) (Documentation/ABI/testing/sysfs-bus-iio)
IIO_UNITS = {
    "temp": (UNIT_DEGREES_C, -3), "voltage": (UNIT_VOLTS, -3), "current": (UNIT_AMPS, -3),
    "power": (UNIT_WATTS, -3), "accel": (UNIT_METERS_PER_SECOND_SQUARED, 0),
    "anglvel": (UNIT_RADIANS_PER_SECOND, 0), "illuminance": (UNIT_LUX, 0), "pressure": (UNIT_PASCALS, 3),
    "humidityrelative": (UNIT_PERCENTAGE, -3),
}


def _channel_type(channel: str, table: dict[str, tuple[int, int]]) -> tuple[int, int]:
    for kind in sorted(table, key=len, reverse=True):
        if channel.startswith(kind):
            return table[kind]
    return UNIT_UNSPECIFIED, 0


@dataclass
class HwmonSensor(Sensor):
    """``<path>/<channel>_input`` of a hwmon device (e.g. ``/sys/class/hwmon/hwmon0``, ``temp1``)."""

    path: str = ""
    channel: str = ""

    def read(self) -> int:
        return int(_read_number(os.path.join(self.path, f"{self.channel}_input")))


@dataclass
class IioSensor(Sensor):
    """An IIO channel: ``(raw + offset) * scale`` from ``<path>/<channel>_raw``,
    ``_offset`` and ``_scale`` (the latter two optional), reported in
    thousandths so fractional scales keep three decimals."""

    path: str = ""
    channel: str = ""

    def _optional(self, suffix: str, default: float) -> float:
        path = os.path.join(self.path, f"{self.channel}_{suffix}")
        return _read_number(path) if os.path.exists(path) else default

    def read(self) -> int:
        raw = _read_number(os.path.join(self.path, f"{self.channel}_raw"))
        return round((raw + self._optional("offset", 0.0)) * self._optional("scale", 1.0) * 1000)


def parse_device(spec: str, index: int) -> Sensor:
    """A sensor from ``--device KIND,PROP=VALUE,...`` (vhost-device-scmi's syntax):
    ``fake[,name=N]``, ``hwmon,path=DIR,channel=temp1[,name=N]``,
    ``iio,path=DIR,channel=in_temp[,name=N]``."""
    kind, *pairs = spec.split(",")
    props: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SensorError(f"--device {spec!r}: {pair!r} is not PROPERTY=VALUE")
        props[key] = value
    allowed = {"fake": {"name"}, "hwmon": {"name", "path", "channel"}, "iio": {"name", "path", "channel"}}
    if kind not in allowed:
        raise SensorError(f"--device {spec!r}: unknown kind {kind!r} (fake, hwmon, iio)")
    extra = set(props) - allowed[kind]
    if extra:
        raise SensorError(f"--device {spec!r}: unknown properties {sorted(extra)}")
    if kind == "fake":
        return FakeSensor(props.get("name", f"fake{index}"))
    missing = {"path", "channel"} - set(props)
    if missing:
        raise SensorError(f"--device {spec!r}: missing {sorted(missing)}")
    path, channel = props["path"], props["channel"]
    name = props.get("name", f"{os.path.basename(path.rstrip('/'))}:{channel}")
    sensor: Sensor
    if kind == "hwmon":
        unit, exp = _channel_type(channel, HWMON_UNITS)
        sensor = HwmonSensor(name, unit, exp, path=path, channel=channel)
    else:
        unit, exp = _channel_type(channel.removeprefix("in_"), IIO_UNITS)
        sensor = IioSensor(name, unit, exp - 3, path=path, channel=channel)
    sensor.read()  # fail now, not in the guest, if the files are not there
    return sensor
