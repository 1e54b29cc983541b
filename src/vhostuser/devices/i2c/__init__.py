"""virtio-i2c (device id 34) over vhost-user: a virtual I2C bus.

* :mod:`.protocol` - the virtio-i2c structures and constants;
* :mod:`.bus` - simulated devices (:class:`Eeprom`, :class:`TemperatureSensor`)
  and :class:`HostAdapter` (a host ``/dev/i2c-N``);
* :mod:`.device` - :class:`I2cBackend`: requests, transfers, FAIL_NEXT;
* :mod:`.cli` - the ``vhostuser i2c`` command.

See ``docs/devices/i2c.md``.
"""
from __future__ import annotations

from .bus import Eeprom, HostAdapter, I2cNack, SimulatedTarget, TemperatureSensor, parse_device_list
from .cli import CAPABILITIES, DESCRIPTION, add_arguments, run
from .protocol import VIRTIO_ID_I2C, Status

__all__ = [
    "CAPABILITIES",
    "DESCRIPTION",
    "VIRTIO_ID_I2C",
    "Eeprom",
    "HostAdapter",
    "I2cBackend",
    "I2cNack",
    "SimulatedTarget",
    "Status",
    "TemperatureSensor",
    "add_arguments",
    "parse_device_list",
    "run",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the device pulls in the daemon stack
    if name == "I2cBackend":
        from .device import I2cBackend

        return I2cBackend
    raise AttributeError(name)
