"""virtio-console vhost-user back-end (VIRTIO 1.3 §5.3, device id 3).

* :mod:`.control` - feature bits, config space, MULTIPORT control messages (sans-IO);
* :mod:`.host` - the ports' host sides: this terminal, a TCP or UNIX listener;
* :mod:`.device` - :class:`ConsoleBackend`, the device;
* :mod:`.cli` - the ``vhostuser console`` command.

Use it from Python::

    from vhostuser.daemon import VhostUserDaemon
    from vhostuser.devices.console import ConsoleBackend, unix_listener

    backend = ConsoleBackend([unix_listener("/tmp/con.uds")])
    VhostUserDaemon("console", backend).serve("/tmp/con.sock")
"""
from __future__ import annotations

from .cli import DESCRIPTION, add_arguments, build_backends, run
from .control import (
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    VIRTIO_ID_CONSOLE,
    ControlEvent,
    ControlMessage,
)
from .device import ConsoleBackend, Port
from .host import HostEndpoint, ListenerHost, StdioHost, tcp_listener, unix_listener

__all__ = [
    "DESCRIPTION",
    "add_arguments",
    "run",
    "build_backends",
    "ConsoleBackend",
    "Port",
    "ControlEvent",
    "ControlMessage",
    "HostEndpoint",
    "ListenerHost",
    "StdioHost",
    "tcp_listener",
    "unix_listener",
    "VIRTIO_ID_CONSOLE",
    "VIRTIO_CONSOLE_F_SIZE",
    "VIRTIO_CONSOLE_F_MULTIPORT",
    "VIRTIO_CONSOLE_F_EMERG_WRITE",
]
