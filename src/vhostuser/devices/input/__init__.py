"""virtio-input vhost-user back-end (VIRTIO 1.3 §5.8, device id 18).

* :mod:`.codes` - Linux input event codes and the US layout for typing;
* :mod:`.config` - config space queries and ``virtio_input_event`` (sans-IO);
* :mod:`.device` - :class:`InputBackend`, the device;
* :mod:`.sources` - host sides: :class:`VirtualInput`, :class:`EvdevInput`;
* :mod:`.cli` - the ``vhostuser input`` command.

Use it from Python::

    from vhostuser.daemon import VhostUserDaemon
    from vhostuser.devices.input import InputBackend, VirtualInput

    keyboard = VirtualInput("keyboard")
    with VhostUserDaemon("input", InputBackend(keyboard)) as daemon:
        daemon.start_server("/tmp/in.sock")
        keyboard.type_text("hello\\n")
"""
from __future__ import annotations

from .cli import DESCRIPTION, add_arguments, run
from .config import VIRTIO_ID_INPUT, AbsInfo, ConfigSelect, DevIds, InputConfig, InputEvent
from .device import EventSource, InputBackend
from .sources import EvdevInput, VirtualInput

__all__ = ["DESCRIPTION", "add_arguments", "run", "VIRTIO_ID_INPUT", "AbsInfo", "ConfigSelect", "DevIds",
           "InputConfig", "InputEvent", "EventSource", "InputBackend", "EvdevInput", "VirtualInput"]
