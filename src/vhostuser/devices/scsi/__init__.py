"""virtio-scsi (device id 8) over vhost-user: LUNs of one target backed by image files.

* :mod:`.protocol` - the virtio-scsi structures, response codes, SCSI sense data;
* :mod:`.disk` - :class:`ScsiDisk`: the SCSI commands of a direct-access LUN over
  blk's :class:`~vhostuser.devices.blk.image.BlockImage` (zero-copy I/O);
* :mod:`.device` - :class:`ScsiBackend`: control, event and request queues;
* :mod:`.cli` - the ``vhostuser scsi`` command.

See ``docs/devices/scsi.md``.
"""
from __future__ import annotations

from .cli import CAPABILITIES, DESCRIPTION, add_arguments, run
from .disk import CommandResult, ScsiDisk
from .protocol import VIRTIO_ID_SCSI, Response, Sense, SenseKey, Status

__all__ = [
    "CAPABILITIES",
    "DESCRIPTION",
    "VIRTIO_ID_SCSI",
    "CommandResult",
    "Response",
    "ScsiBackend",
    "ScsiDisk",
    "Sense",
    "SenseKey",
    "Status",
    "add_arguments",
    "run",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the device pulls in the daemon stack
    if name == "ScsiBackend":
        from .device import ScsiBackend

        return ScsiBackend
    raise AttributeError(name)
