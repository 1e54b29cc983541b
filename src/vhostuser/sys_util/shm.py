"""Shared memory by fd, and mapping windows of an fd.

:func:`create_shm_fd` makes anonymous shareable memory (what QEMU's
``memory-backend-memfd,share=on`` gives a back-end as guest RAM):

* ``memfd`` (Linux, FreeBSD): ``memfd_create(MFD_CLOEXEC)``;
* ``shm_open`` (POSIX): ``shm_open`` of a unique name, unlinked at once.

Forced with ``kind=`` or ``VHOSTUSER_SHM=memfd|shm_open``.

:func:`map_fd` maps any window of an fd (e.g. a guest memory region at its
``mmap_offset``), aligning the offset to ``mmap.ALLOCATIONGRANULARITY``, and
returns a :class:`MappedRegion` that exposes exactly that window.
:class:`SharedMemory` owns a fresh shm fd plus one mapping of all of it.

Note: on Python < 3.13, :class:`mmap.mmap` keeps a dup of the fd until it is closed,
so each open mapping costs one fd.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import enum
import errno
import logging
import mmap
import os
import secrets
from typing import Callable, Final

from ._variant import _choose_variant

__all__ = [
    "AVAILABLE_SHM_KINDS",
    "DEFAULT_SHM_KIND",
    "ENV_VAR",
    "MappedRegion",
    "SharedMemory",
    "ShmKind",
    "buffer_address",
    "create_shm_fd",
    "fd_size",
    "map_fd",
    "shrink_sealed",
]

log = logging.getLogger(__name__)

ENV_VAR: Final = "VHOSTUSER_SHM"


def _find_shm_open() -> tuple[Callable[[str, int, int], int], Callable[[str], None]] | None:
    """``(shm_open, shm_unlink)``: CPython's ``_posixshmem``, else libc through ctypes."""
    try:
        import _posixshmem  # noqa: PLC0415

        return _posixshmem.shm_open, _posixshmem.shm_unlink
    except ImportError:
        pass
    for libname in (None, ctypes.util.find_library("rt"), ctypes.util.find_library("c")):
        try:
            lib = ctypes.CDLL(libname, use_errno=True)
            c_open, c_unlink = lib.shm_open, lib.shm_unlink
        except (OSError, AttributeError):
            continue
        c_open.argtypes, c_open.restype = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint], ctypes.c_int
        c_unlink.argtypes, c_unlink.restype = [ctypes.c_char_p], ctypes.c_int

        def shm_open(path: str, flags: int, mode: int) -> int:
            fd = c_open(os.fsencode(path), flags, mode)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
            return fd

        def shm_unlink(path: str) -> None:
            if c_unlink(os.fsencode(path)) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)

        return shm_open, shm_unlink
    return None


_SHM_OPEN: Final = _find_shm_open()


class ShmKind(enum.Enum):
    """How :func:`create_shm_fd` makes shared memory."""

    MEMFD = "memfd"
    SHM_OPEN = "shm_open"


#: The kinds this system supports.
AVAILABLE_SHM_KINDS: Final = frozenset(
    ({ShmKind.MEMFD} if hasattr(os, "memfd_create") else set())
    | ({ShmKind.SHM_OPEN} if _SHM_OPEN is not None else set())
)
#: The kind used when neither ``kind=`` nor ``VHOSTUSER_SHM`` says otherwise.
DEFAULT_SHM_KIND: Final = ShmKind.MEMFD if ShmKind.MEMFD in AVAILABLE_SHM_KINDS else ShmKind.SHM_OPEN


def _shm_open_anonymous(name: str) -> int:
    assert _SHM_OPEN is not None
    shm_open, shm_unlink = _SHM_OPEN
    for _ in range(100):
        # macOS allows 31 characters: "/" + 8 + "-" + pid + "-" + 12 fits.
        path = f"/{name[:8]}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            fd = shm_open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            shm_unlink(path)
            os.set_inheritable(fd, False)  # POSIX says shm_open sets FD_CLOEXEC; make sure
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise FileExistsError(errno.EEXIST, "no unique shm_open name found", name)


def create_shm_fd(size: int, name: str = "vhostuser", kind: ShmKind | str | None = None) -> int:
    """Create anonymous shared memory of ``size`` bytes; return an owned CLOEXEC fd.

    ``name`` is only a debugging label (``/proc/PID/fd`` shows ``memfd:NAME``).
    ``kind`` (or ``$VHOSTUSER_SHM`` when it is None) forces a variant; default
    :data:`DEFAULT_SHM_KIND`.  Raises :class:`~vhostuser.errors.UnsupportedVariant`.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    kind = _choose_variant(ShmKind, kind, ENV_VAR, AVAILABLE_SHM_KINDS, DEFAULT_SHM_KIND)
    fd = os.memfd_create(name, os.MFD_CLOEXEC) if kind is ShmKind.MEMFD else _shm_open_anonymous(name)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    log.debug("created %s shm fd %d of %d bytes", kind.value, fd, size)
    return fd


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def buffer_address(obj: object) -> int:
    """The host address of the first byte of a buffer object (also a read-only one).

    Writable buffers use ``ctypes.c_char.from_buffer``; read-only ones (which it
    refuses) go through ``PyObject_GetBuffer``.  No export is held afterwards.
    """
    try:
        anchor = ctypes.c_char.from_buffer(obj)  # type: ignore[arg-type]
    except TypeError:
        view = _PyBuffer()
        ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(obj), ctypes.byref(view), 0)
        try:
            return view.buf or 0
        finally:
            ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))
    address = ctypes.addressof(anchor)
    del anchor  # releases the export, so the mmap can be closed
    return address


class MappedRegion:
    """A shared mapping of ``size`` bytes of an fd starting at ``offset``.

    ``.buf`` is a memoryview of exactly that window and ``.address`` the host
    address of its first byte; ``.mmap`` is the underlying (page-aligned, possibly
    larger) mapping.  Does not own the fd.  :meth:`close` unmaps; it raises
    ``BufferError`` while views derived from ``.buf`` are still alive.
    """

    def __init__(self, fd: int, size: int, offset: int = 0, writable: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, not {size}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        self.size = size
        self.offset = offset
        self.writable = writable
        delta = offset % mmap.ALLOCATIONGRANULARITY
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mmap: mmap.mmap = mmap.mmap(fd, delta + size, flags=mmap.MAP_SHARED, prot=prot, offset=offset - delta)
        try:
            self.address: int = buffer_address(self.mmap) + delta
            self.buf: memoryview = memoryview(self.mmap)[delta : delta + size]
        except BaseException:
            self.mmap.close()
            raise

    @property
    def closed(self) -> bool:
        """True once the mapping is unmapped."""
        return self.mmap.closed

    def close(self) -> None:
        """Unmap.  Idempotent."""
        if not self.mmap.closed:
            self.buf.release()
            self.mmap.close()

    def __enter__(self) -> MappedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"address={self.address:#x}"
        return f"<MappedRegion offset={self.offset:#x} size={self.size:#x} {state}>"


def map_fd(fd: int, size: int, offset: int = 0, writable: bool = True) -> MappedRegion:
    """Map ``size`` bytes of ``fd`` from ``offset`` (any value; alignment is handled)
    shared, read-write or read-only.  See :class:`MappedRegion`."""
    return MappedRegion(fd, size, offset, writable)


class SharedMemory:
    """A fresh shm fd of ``size`` bytes, mapped read-write; owns both.

    ``.fd`` can be sent to a peer (e.g. as guest RAM in SET_MEM_TABLE); ``.buf`` is a
    memoryview of all of it, ``.mmap`` the mapping, ``.address`` its host address.
    """

    def __init__(self, size: int, name: str = "vhostuser", kind: ShmKind | str | None = None) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, not {size}")
        self.fd: int = create_shm_fd(size, name, kind)
        try:
            self.region = MappedRegion(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size

    @property
    def mmap(self) -> mmap.mmap:
        """The mapping of the whole object."""
        return self.region.mmap

    @property
    def buf(self) -> memoryview:
        """A memoryview of the whole object."""
        return self.region.buf

    @property
    def address(self) -> int:
        """The host address of the first byte."""
        return self.region.address

    @property
    def closed(self) -> bool:
        """True once :meth:`close` completed."""
        return self.fd < 0

    def close(self) -> None:
        """Unmap and close the fd.  Idempotent.  The fd is closed even if unmapping
        raises ``BufferError`` (views of ``.buf`` still alive); call again later."""
        try:
            self.region.close()
        finally:
            fd, self.fd = self.fd, -1
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SharedMemory fd={self.fd} size={self.size:#x}>"


def fd_size(fd: int) -> int:
    """The size of the file behind ``fd`` (``st_size``; 0 for what has none)."""
    return os.fstat(fd).st_size


#: ``fcntl.F_GET_SEALS`` / ``F_SEAL_SHRINK`` where the OS has file seals (Linux
#: memfds, FreeBSD shm), else None.
_F_GET_SEALS: int | None = getattr(fcntl, "F_GET_SEALS", None)
_F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


def shrink_sealed(fd: int) -> bool:
    """True if ``fd`` cannot shrink any more (``F_SEAL_SHRINK``): a mapping of it
    can never fault with SIGBUS because the file got shorter.  False where the OS
    has no seals or the fd is not sealable."""
    if _F_GET_SEALS is None:
        return False
    try:
        return bool(fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_SHRINK)
    except OSError:
        return False
