"""virtio-vsock over vhost-user with Firecracker's hybrid vsock on the host side.

* :mod:`.packet` - the 44-byte packet header codec;
* :mod:`.conn` - one connection: host socket, credit accounting, shutdown/RST;
* :mod:`.engine` - routing between the guest, host AF_UNIX sockets and sibling VMs
  (sans rings: unit-testable);
* :mod:`.device` - :class:`VsockBackend`, the ring glue;
* :mod:`.cli` - the ``vhostuser vsock`` command.

See ``docs/devices/vsock.md``.
"""
from __future__ import annotations

from .engine import PollerWatcher, SiblingRegistry, VsockEngine, VsockEngineConfig
from .packet import HDR_SIZE, HOST_CID, Op, SockType, VsockHeader

__all__ = [
    "HDR_SIZE",
    "HOST_CID",
    "Op",
    "PollerWatcher",
    "SiblingRegistry",
    "SockType",
    "VsockBackend",
    "VsockEngine",
    "VsockEngineConfig",
    "VsockHeader",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the device pulls in the daemon stack
    if name == "VsockBackend":
        from .device import VsockBackend

        return VsockBackend
    raise AttributeError(name)
