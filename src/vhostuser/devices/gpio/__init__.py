"""virtio-gpio (device id 41) over vhost-user: a simulated GPIO chip.

* :mod:`.protocol` - the virtio-gpio structures and constants;
* :mod:`.chip` - :class:`SimulatedChip`: lines, directions, values, interrupt types;
* :mod:`.device` - :class:`GpioBackend`: requestq and eventq;
* :mod:`.control` - the host's control socket;
* :mod:`.cli` - the ``vhostuser gpio`` command.

See ``docs/devices/gpio.md``.
"""
from __future__ import annotations

from .chip import GpioError, Line, SimulatedChip
from .cli import CAPABILITIES, DESCRIPTION, add_arguments, run
from .protocol import VIRTIO_ID_GPIO, Direction, IrqStatus, IrqType, MsgType, Status

__all__ = [
    "CAPABILITIES",
    "DESCRIPTION",
    "VIRTIO_ID_GPIO",
    "Direction",
    "GpioBackend",
    "GpioError",
    "IrqStatus",
    "IrqType",
    "Line",
    "MsgType",
    "SimulatedChip",
    "Status",
    "add_arguments",
    "run",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the device pulls in the daemon stack
    if name == "GpioBackend":
        from .device import GpioBackend

        return GpioBackend
    raise AttributeError(name)
