"""Host SocketCAN interfaces (Linux ``AF_CAN`` raw sockets).

The OS part of the can device: open a raw CAN socket bound to an interface
(``can0``, ``vcan0``) with CAN FD frames and bus-off error frames enabled, and
convert between the kernel's ``struct can_frame`` / ``struct canfd_frame``
(``include/uapi/linux/can.h``) and plain values.  Where the OS has no
``AF_CAN`` (other systems, or a Linux kernel without the ``can`` module),
:func:`open_can_socket` raises :class:`OSError` with a clear message.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

#: ``can_id`` flag bits of the kernel's frames
CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_EFF_MASK = 0x1FFFFFFF
CAN_SFF_MASK = 0x000007FF
#: error class in ``can_id`` of an error frame: the controller went bus-off
CAN_ERR_BUSOFF = 0x00000040
CAN_MTU = 16
CANFD_MTU = 72

_CAN_FRAME = struct.Struct("<IBBBB8s")
_CANFD_FRAME = struct.Struct("<IBBBB64s")

# option numbers from include/uapi/linux/can/raw.h (Python lacks some of them)
_SOL_CAN_RAW = 101
_CAN_RAW_ERR_FILTER = 2
_CAN_RAW_FD_FRAMES = 5


@dataclass(frozen=True)
class HostCanFrame:
    """A frame as SocketCAN sees it: ``can_id`` with its EFF/RTR/ERR flag bits."""

    can_id: int
    data: bytes
    fd: bool = False

    def pack(self) -> bytes:
        """The kernel's ``can_frame`` (16 bytes) or ``canfd_frame`` (72 bytes)."""
        if self.fd:
            return _CANFD_FRAME.pack(self.can_id, len(self.data), 0, 0, 0, self.data)
        return _CAN_FRAME.pack(self.can_id, len(self.data), 0, 0, 0, self.data)

    @classmethod
    def unpack(cls, raw: bytes) -> HostCanFrame:
        """Parse what ``recv`` returned on a raw CAN socket."""
        if len(raw) == CANFD_MTU:
            can_id, length, _flags, _r0, _r1, data = _CANFD_FRAME.unpack(raw)
            return cls(can_id, data[:min(length, 64)], fd=True)
        if len(raw) == CAN_MTU:
            can_id, length, _pad, _r0, _dlc, data = _CAN_FRAME.unpack(raw)
            return cls(can_id, data[:min(length, 8)], fd=False)
        raise ValueError(f"a CAN frame is {CAN_MTU} or {CANFD_MTU} bytes, not {len(raw)}")

    @property
    def is_bus_off(self) -> bool:
        """An error frame reporting that the controller went bus-off."""
        return bool(self.can_id & CAN_ERR_FLAG and self.can_id & CAN_ERR_BUSOFF)


def open_can_socket(interface: str) -> socket.socket:
    """A non-blocking raw CAN socket on ``interface``, with CAN FD frames and
    bus-off error frames enabled.  Raises OSError when the OS has no SocketCAN
    or no such interface."""
    family = getattr(socket, "AF_CAN", None)
    if family is None:
        raise OSError(f"SocketCAN is not available on this OS (no AF_CAN) for {interface!r}")
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.CAN_RAW)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open a SocketCAN socket for {interface!r} "
                                 f"(is the kernel's can module loaded?): {exc.strerror}") from None
    try:
        sock.setsockopt(_SOL_CAN_RAW, _CAN_RAW_FD_FRAMES, 1)
        sock.setsockopt(_SOL_CAN_RAW, _CAN_RAW_ERR_FILTER, CAN_ERR_BUSOFF)
        sock.bind((interface,))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
