"""Linux i2c-dev (``/dev/i2c-N``): combined transfers with the ``I2C_RDWR`` ioctl.

:func:`i2c_rdwr` sends a list of messages as one transfer (repeated starts
between them), as ``struct i2c_rdwr_ioctl_data`` of ``struct i2c_msg``
(linux/i2c-dev.h, linux/i2c.h).  Only Linux has it; elsewhere
:data:`HAVE_I2C_DEV` is False and :func:`i2c_rdwr` raises OSError(ENOSYS).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass

#: linux/i2c-dev.h
I2C_RDWR = 0x0707
#: linux/i2c.h: struct i2c_msg flags
I2C_M_RD = 0x0001
#: the kernel's limit of messages per I2C_RDWR
I2C_RDWR_IOCTL_MAX_MSGS = 42

HAVE_I2C_DEV = os.path.isdir("/sys/class/i2c-dev") or os.path.exists("/dev/i2c-0")


class _I2cMsg(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("len", ctypes.c_uint16),
                ("buf", ctypes.c_void_p)]


class _I2cRdwrData(ctypes.Structure):
    _fields_ = [("msgs", ctypes.POINTER(_I2cMsg)), ("nmsgs", ctypes.c_uint32)]


@dataclass
class I2cMsg:
    """One message: ``addr`` (7-bit), a read of ``length`` bytes or a write of ``data``."""

    addr: int
    read: bool
    data: bytes = b""
    length: int = 0


def i2c_rdwr(fd: int, msgs: Sequence[I2cMsg],
             ioctl: Callable[..., Any] = fcntl.ioctl) -> list[bytes]:
    """Run ``msgs`` as one transfer on the i2c-dev ``fd``; returns the bytes each
    read message got (``b""`` for writes).  Raises OSError (a NACK is EREMOTEIO
    or ENXIO, as the adapter driver reports it)."""
    if not msgs or len(msgs) > I2C_RDWR_IOCTL_MAX_MSGS:
        raise OSError(errno.EINVAL, f"{len(msgs)} messages per transfer (1..{I2C_RDWR_IOCTL_MAX_MSGS})")
    arr = (_I2cMsg * len(msgs))()
    bufs = []
    for i, m in enumerate(msgs):
        n = m.length if m.read else len(m.data)
        if n > 0xFFFF:
            raise OSError(errno.EINVAL, f"message of {n} bytes")
        buf = ctypes.create_string_buffer(m.data if not m.read else n, n) if n else None
        bufs.append(buf)
        arr[i] = _I2cMsg(m.addr, I2C_M_RD if m.read else 0, n,
                         ctypes.cast(buf, ctypes.c_void_p) if buf is not None else None)
    data = _I2cRdwrData(ctypes.cast(arr, ctypes.POINTER(_I2cMsg)), len(msgs))
    ioctl(fd, I2C_RDWR, data)  # ctypes structures are writable buffers: the kernel fills the reads
    return [bytes(b.raw) if (b is not None and m.read) else b"" for m, b in zip(msgs, bufs)]
