"""virtio-blk (device id 2) over vhost-user: a raw image file or block device as a guest disk.

* :mod:`.image` - :class:`BlockImage`: zero-copy vectored I/O, O_DIRECT with a
  bounce-buffer fallback, discard / write-zeroes via fallocate, locking;
* :mod:`.engine` - :class:`BlkRequestEngine`: parses and executes requests
  (sans rings: unit-testable), and :class:`VirtioBlkConfig`;
* :mod:`.device` - :class:`BlkBackend`, the ring glue;
* :mod:`.cli` - the ``vhostuser blk`` command.

See ``docs/devices/blk.md``.
"""
from __future__ import annotations

from .cli import CAPABILITIES, DESCRIPTION, add_arguments, run
from .engine import (
    CONFIG_SIZE,
    OUTHDR,
    VIRTIO_ID_BLOCK,
    BlkFeature,
    BlkRequestEngine,
    BlkStats,
    RequestType,
    Status,
    VirtioBlkConfig,
)
from .image import SECTOR_SIZE, BlockImage

__all__ = [
    "CAPABILITIES",
    "CONFIG_SIZE",
    "DESCRIPTION",
    "OUTHDR",
    "SECTOR_SIZE",
    "VIRTIO_ID_BLOCK",
    "BlkBackend",
    "BlkFeature",
    "BlkRequestEngine",
    "BlkStats",
    "BlockImage",
    "RequestType",
    "Status",
    "VirtioBlkConfig",
    "add_arguments",
    "run",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the device pulls in the daemon stack
    if name == "BlkBackend":
        from .device import BlkBackend

        return BlkBackend
    raise AttributeError(name)
