"""File operations some systems lack or spell differently: punching holes,
block-device geometry, ``O_DIRECT``, advisory locks, non-blocking mode.

* :func:`fallocate` - Linux ``fallocate(2)`` (through libc with ctypes, since
  :mod:`os` only has ``posix_fallocate``); :data:`HAVE_FALLOCATE` says whether it
  exists here.  Callers fall back to writing zeros where it does not.
* :func:`block_sector_size` - the logical sector size of a block device
  (Linux ``BLKSSZGET``), 512 wherever it cannot be asked.
* :data:`O_DIRECT` - the open flag (0 where the system has none);
  :func:`lock_file` - a non-blocking advisory ``flock``;
  :func:`set_nonblocking` / :func:`restore_flags` - ``O_NONBLOCK`` on an fd.
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
    "O_DIRECT",
    "block_sector_size",
    "fallocate",
    "lock_file",
    "restore_flags",
    "set_nonblocking",
]

#: ``O_DIRECT`` (bypass the page cache), or 0 where the system has none (macOS
#: uses ``fcntl(F_NOCACHE)`` instead, which this library does not use)
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def lock_file(fd: int, *, shared: bool) -> bool:
    """Take an advisory ``flock`` on ``fd`` (shared or exclusive) without waiting;
    False if another process holds a conflicting one."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def set_nonblocking(fd: int) -> int:
    """Set ``O_NONBLOCK`` on ``fd``; return the previous flags (for :func:`restore_flags`)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return flags


def restore_flags(fd: int, flags: int) -> None:
    """Put back the file status flags :func:`set_nonblocking` returned."""
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)

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
