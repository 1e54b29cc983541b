"""virtio-net definitions (VIRTIO 1.3 §5.1): feature bits, the per-buffer
``virtio_net_hdr`` and the device configuration layout."""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

VIRTIO_ID_NET = 1

#: Ethernet header (dst, src, ethertype)
ETH_HLEN = 14
#: the largest frame a TX chain may carry: 64 KiB of GSO payload plus headers,
#: as Linux's virtio_net limits a GSO packet; anything larger is dropped
MAX_FRAME_LEN = 65535 + ETH_HLEN
#: virtio_net_hdr with ``num_buffers`` (VERSION_1 or MRG_RXBUF); legacy devices without both use 10
HDR_LEN = 12
HDR_LEN_LEGACY = 10


class NetFeature(enum.IntEnum):
    """virtio-net device feature bit numbers (VIRTIO 1.3 §5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


#: virtio_net_hdr.flags
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
#: virtio_net_hdr.gso_type
VIRTIO_NET_HDR_GSO_NONE = 0
#: virtio_net_config.status
VIRTIO_NET_S_LINK_UP = 1


@dataclass(frozen=True)
class VirtioNetHdr:
    """``struct virtio_net_hdr`` (with ``num_buffers``; it is 0 in the legacy 10-byte form)."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    _FMT = struct.Struct("<BBHHHHH")

    def pack(self, length: int = HDR_LEN) -> bytes:
        """The header's ``length`` (12 or 10) bytes."""
        return self._FMT.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                              self.csum_offset, self.num_buffers)[:length]

    @classmethod
    def unpack(cls, data: bytes) -> VirtioNetHdr:
        """Parse 10 or 12 bytes."""
        if len(data) == HDR_LEN_LEGACY:
            data = bytes(data) + b"\0\0"
        return cls(*cls._FMT.unpack(data))


def hdr_len_for(features: int) -> int:
    """The header length the negotiated ``features`` imply (§5.1.6.1)."""
    version_1 = features >> 32 & 1
    mrg = features >> NetFeature.MRG_RXBUF & 1
    return HDR_LEN if version_1 or mrg else HDR_LEN_LEGACY


def net_config(mac: bytes, *, status: int = VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs: int = 1,
               mtu: int = 1500) -> bytes:
    """``struct virtio_net_config`` up to ``mtu``: mac[6], status, max_virtqueue_pairs, mtu."""
    if len(mac) != 6:
        raise ValueError("a MAC address has 6 bytes")
    return bytes(mac) + struct.pack("<HHH", status, max_virtqueue_pairs, mtu)


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes (``-`` separators too)."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None
    return mac


def format_mac(mac: bytes) -> str:
    """A MAC address as ``52:54:00:00:00:01``."""
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random locally administered unicast MAC (``x2:..``)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


def is_multicast(mac: bytes) -> bool:
    """True for multicast and broadcast addresses (I/G bit)."""
    return bool(mac[0] & 1)


class DropReason(str, enum.Enum):
    """Why a frame was dropped (keys of the drop counters)."""

    TX_SHORT = "tx-short"                # chain shorter than the virtio_net_hdr
    TX_RUNT = "tx-runt"                  # frame shorter than an Ethernet header
    TX_OVERSIZE = "tx-oversize"          # frame longer than MAX_FRAME_LEN
    TX_OFFLOAD = "tx-offload"            # GSO / NEEDS_CSUM without the feature negotiated
    RX_BACKLOG_FULL = "rx-backlog-full"  # the guest posted no RX buffers and the backlog is full
    RX_TOO_BIG = "rx-too-big"            # the frame does not fit the guest's RX buffers
    RX_NOT_READY = "rx-not-ready"        # the port has no front-end (dropped at reset)
