"""TAP network interfaces (Linux ``/dev/net/tun``), with a virtio_net_hdr on
every frame (``IFF_VNET_HDR``).

:func:`open_tap` creates the interface (or attaches to an existing one of that
name) and returns a :class:`Tap`; :data:`HAVE_TAP` says whether this system has
``/dev/net/tun``.  Offloads stay off (``TUNSETOFFLOAD 0``) unless asked for, so
the kernel hands over complete frames and accepts only complete ones.
"""
from __future__ import annotations

import fcntl
import os
import struct

__all__ = ["HAVE_TAP", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_UFO", "Tap", "open_tap"]

_TUN_PATH = "/dev/net/tun"
HAVE_TAP = os.path.exists(_TUN_PATH)

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_UFO = 0x10
_IFNAMSIZ = 16


class Tap:
    """An open TAP interface: ``fd`` (non-blocking), ``name``, ``vnet_hdr_len``."""

    def __init__(self, fd: int, name: str, vnet_hdr_len: int) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr_len = vnet_hdr_len

    def fileno(self) -> int:
        return self.fd

    def read(self, size: int = 65536 + 64) -> bytes | None:
        """One frame (with its virtio_net_hdr), or None if none is waiting."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None

    def write(self, data: bytes) -> int:
        """Send one frame (with its virtio_net_hdr)."""
        return os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tap(name: str, *, vnet_hdr_len: int = 12, offloads: int = 0) -> Tap:
    """Create or attach TAP interface ``name`` with IFF_VNET_HDR.

    Raises :class:`OSError` (``ENOENT`` without ``/dev/net/tun``, ``EPERM``
    without CAP_NET_ADMIN for a new interface, ``EBUSY`` if someone holds it)."""
    if not name or len(name.encode()) >= _IFNAMSIZ:
        raise ValueError(f"TAP name {name!r}: 1..{_IFNAMSIZ - 1} bytes")
    fd = os.open(_TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        res = fcntl.ioctl(fd, _TUNSETIFF, ifr)
        actual = res[:_IFNAMSIZ].split(b"\0", 1)[0].decode()
        fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", vnet_hdr_len))
        fcntl.ioctl(fd, _TUNSETOFFLOAD, offloads)
    except BaseException:
        os.close(fd)
        raise
    return Tap(fd, actual, vnet_hdr_len)
