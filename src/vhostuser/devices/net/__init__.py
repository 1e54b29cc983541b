"""virtio-net over vhost-user: one device per VM, joined by a learning switch.

* :mod:`.defs` - feature bits, ``virtio_net_hdr``, the config layout;
* :mod:`.device` - :class:`NetBackend`, one port (RX/TX queue pairs);
* :mod:`.switch` - :class:`L2Switch`, MAC learning, flooding, source-MAC filter;
* :mod:`.hooks` - the packet-hook API and seeded impairments;
* :mod:`.pcap` - capture;
* :mod:`.cli` - the ``vhostuser net`` command.

See ``docs/devices/net.md``.
"""
from __future__ import annotations

from .defs import VIRTIO_ID_NET, NetFeature, VirtioNetHdr, format_mac, parse_mac
from .hooks import (
    DROP,
    PASS,
    Corrupt,
    Delay,
    Direction,
    Duplicate,
    Latency,
    Loss,
    Packet,
    RateLimit,
    Reorder,
    parse_impairment,
)
from .pcap import PcapWriter, read_pcap
from .switch import L2Switch, SwitchPort

__all__ = [
    "DROP",
    "PASS",
    "VIRTIO_ID_NET",
    "Corrupt",
    "Delay",
    "Direction",
    "Duplicate",
    "L2Switch",
    "Latency",
    "Loss",
    "NetBackend",
    "NetFeature",
    "Packet",
    "PcapWriter",
    "RateLimit",
    "Reorder",
    "SwitchPort",
    "VirtioNetHdr",
    "format_mac",
    "parse_impairment",
    "parse_mac",
    "read_pcap",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the device pulls in the daemon stack
    if name == "NetBackend":
        from .device import NetBackend

        return NetBackend
    raise AttributeError(name)
