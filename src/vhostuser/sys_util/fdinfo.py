"""What an fd is, for diagnostics (``vhostuser trace``): its kind and size.

:func:`describe_fd` answers ``FdInfo(kind, size)`` where ``kind`` is one of
``memfd``, ``shm``, ``file``, ``eventfd``, ``socket``, ``pipe``, ``anon``
(another anonymous inode), ``device`` or ``unknown``, and ``size`` the size of a
regular file / memfd (else None).

Variant by capability probe: where ``/proc/self/fd`` exists (Linux) the link
target tells memfd from a file and an eventfd from another anonymous inode;
elsewhere only ``fstat`` is used (a memfd or shm_open object then shows as
``file`` or ``shm``, an eventfd as ``unknown``).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Final

__all__ = ["FdInfo", "describe_fd", "HAVE_PROC_FD"]

_PROC_FD: Final = "/proc/self/fd"
#: Whether fd link targets can be read (``/proc/self/fd``).
HAVE_PROC_FD: Final = os.path.isdir(_PROC_FD)


@dataclass(frozen=True)
class FdInfo:
    """The kind of an fd and, for memory-like fds, its size in bytes."""

    kind: str
    size: int | None = None

    def __str__(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size:#x}"


def _kind_from_link(target: str) -> str | None:
    if target.startswith("/memfd:"):
        return "memfd"
    if target.startswith("anon_inode:"):
        return "eventfd" if "eventfd" in target else "anon"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("/dev/shm/"):
        return "shm"
    return None


def describe_fd(fd: int) -> FdInfo:
    """``FdInfo`` of an open fd (``unknown`` if it cannot be inspected); never raises."""
    try:
        st = os.fstat(fd)
    except OSError:
        return FdInfo("unknown")
    size = st.st_size if stat.S_ISREG(st.st_mode) else None
    kind = None
    if HAVE_PROC_FD:
        try:
            kind = _kind_from_link(os.readlink(f"{_PROC_FD}/{fd}"))
        except OSError:
            kind = None
    if kind is None:
        if stat.S_ISSOCK(st.st_mode):
            kind = "socket"
        elif stat.S_ISFIFO(st.st_mode):
            kind = "pipe"
        elif stat.S_ISREG(st.st_mode):
            kind = "file"
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "device"
        else:
            kind = "unknown"
    return FdInfo(kind, size)
