"""File operations some systems lack: punching holes and block-device geometry.

* :func:`fallocate` - Linux ``fallocate(2)`` (through libc with ctypes, since
  :mod:`os` only has ``posix_fallocate``); :data:`HAVE_FALLOCATE` says whether it
  exists here.  Callers fall back to writing zeros where it does not.
* :func:`block_sector_size` - the logical sector size of a block device
  (Linux ``BLKSSZGET``), 512 wherever it cannot be asked.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Callable

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "HAVE_FALLOCATE",
    "block_sector_size",
    "fallocate",
]

#: fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: ioctl(BLKSSZGET): logical sector size of a block device (linux/fs.h _IO(0x12, 104))
_BLKSSZGET = 0x1268


def _load_fallocate() -> Callable[..., int] | None:
    """libc's ``fallocate(int fd, int mode, off_t offset, off_t len)``, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()
#: whether :func:`fallocate` exists on this system
HAVE_FALLOCATE = _fallocate is not None


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises :class:`OSError` (``EOPNOTSUPP`` where there is none)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate() is not available on this system")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def block_sector_size(fd: int, default: int = 512) -> int:
    """The logical sector size of the block device ``fd`` (at least ``default``);
    ``default`` where the system cannot tell (not Linux, not a block device)."""
    try:
        buf = fcntl.ioctl(fd, _BLKSSZGET, b"\0\0\0\0")
    except OSError:
        return default
    return max(default, struct.unpack("i", buf)[0])
