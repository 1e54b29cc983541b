"""Guest memory: the regions the front-end shares, address translation, bounds
checks, zero-copy views and the dirty-page log.

A :class:`GuestMemory` is an immutable *snapshot* of the vhost-user memory table.
``ADD_MEM_REG`` / ``REM_MEM_REG`` do not modify it: :meth:`GuestMemory.with_region`
and :meth:`GuestMemory.without_region` return a new snapshot sharing the unchanged
regions, so a worker thread still using the old snapshot is undisturbed.

Ownership rule (who unmaps what):

* A :class:`MemoryRegion` is reference-counted by the snapshots that contain it.
  Constructing a :class:`GuestMemory` takes a reference on each region;
  :meth:`GuestMemory.close` drops them.  A region is unmapped (and its fd, if kept,
  closed) when the last snapshot holding it is closed.
* The control thread owns every snapshot it creates.  On a table change it builds
  the new snapshot, hands it to the workers, and closes the old snapshot once the
  workers have moved on.  Regions shared by old and new stay mapped; a removed
  region is unmapped at that moment.
* A region that was never put into a snapshot is closed by whoever created it
  (``GuestMemory(regions)`` adopts regions it is given, also on error).

Addresses: ``gpa`` is a guest physical address; ``uva`` is the front-end's
user-space virtual address of the same byte (vring addresses arrive as uvas).
All accesses are checked: an address range is valid only if every byte of it is
inside some region; ranges may straddle *adjacent* regions (one region ends where
the next begins); anything touching a hole raises
:class:`~vhostuser.errors.GuestAddressError` before a single byte is copied.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from . import _impl, memory_guard
from .errors import GuestAddressError, GuestMemoryError
from .sys_util.shm import buffer_address, map_fd

__all__ = [
    "MAX_MEM_SLOTS",
    "DIRTY_LOG_PAGE_SIZE",
    "MemoryRegionDescription",
    "MemoryRegion",
    "GuestMemory",
    "DirtyLog",
]

log = logging.getLogger(__name__)

#: The number of memory slots we advertise for ``VHOST_USER_GET_MAX_MEM_SLOTS``
#: (the same value as libvhost-user; KVM allows 509 user memory slots on x86).
MAX_MEM_SLOTS = 509
#: The dirty log has one bit per page of this size (vhost-user spec, "Migration").
DIRTY_LOG_PAGE_SIZE = 4096
_ADDR_LIMIT = 1 << 64
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MemoryRegionDescription(Protocol):
    """What the protocol layer's memory-region payload provides (duck-typed, read-only)."""

    @property
    def guest_phys_addr(self) -> int: ...
    @property
    def memory_size(self) -> int: ...
    @property
    def userspace_addr(self) -> int: ...
    @property
    def mmap_offset(self) -> int: ...


def _check_range(addr: int, length: int, what: str = "guest address") -> None:
    if not isinstance(addr, int) or not isinstance(length, int):
        raise GuestAddressError(f"{what} and length must be integers", addr=None, length=None)
    if addr < 0 or addr >= _ADDR_LIMIT or length < 0 or addr + length > _ADDR_LIMIT:
        raise GuestAddressError(
            f"{what} range {addr:#x}+{length:#x} is outside the 64-bit address space", addr=addr, length=length
        )


def _unmap(view: memoryview, mapping: mmap.mmap | None, what: str) -> None:
    """Release our view and unmap; a mapping a device still has views into is
    unmapped by the interpreter when the last of them goes (logged)."""
    view.release()
    if mapping is not None:
        try:
            mapping.close()
        except BufferError:
            log.warning("%s: views of it are still alive; unmapping when they are released", what)


class MemoryRegion:
    """One contiguous range of guest physical memory mapped into this process.

    Build one with :meth:`from_fd` (a region of the vhost-user memory table),
    :meth:`anonymous` or :meth:`from_buffer` (tests).  ``host_addr`` is the address
    of the region's first byte in this process, for native code.
    """

    __slots__ = (
        "guest_phys_addr",
        "memory_size",
        "userspace_addr",
        "mmap_offset",
        "host_addr",
        "fd",
        "_mmap",
        "_view",
        "_refs",
        "_lock",
        "_closed",
        "_guarded",
    )

    def __init__(
        self,
        view: memoryview,
        guest_phys_addr: int,
        userspace_addr: int | None = None,
        *,
        mmap_offset: int = 0,
        backing: mmap.mmap | None = None,
        host_addr: int | None = None,
        fd: int | None = None,
    ) -> None:
        """Wrap ``view`` (a writable, C-contiguous, byte-format memoryview).

        Prefer the classmethod constructors.  ``backing`` is the mmap the view was
        taken from (closed with the region); ``fd`` is closed with the region.
        """
        if view.readonly or view.ndim != 1 or view.itemsize != 1:
            raise GuestMemoryError("a memory region needs a writable 1-D byte buffer")
        size = view.nbytes
        if size <= 0:
            raise GuestMemoryError("a memory region must not be empty")
        if userspace_addr is None:
            userspace_addr = guest_phys_addr
        for name, value in (("guest_phys_addr", guest_phys_addr), ("userspace_addr", userspace_addr)):
            if value < 0 or value + size > _ADDR_LIMIT:
                raise GuestMemoryError(f"region {name} {value:#x}+{size:#x} overflows the address space")
        self.guest_phys_addr = guest_phys_addr
        self.memory_size = size
        self.userspace_addr = userspace_addr
        self.mmap_offset = mmap_offset
        self._mmap = backing
        self._view = view
        self.host_addr = buffer_address(view) if host_addr is None else host_addr
        self.fd = fd
        self._refs = 0
        self._lock = threading.Lock()
        self._closed = False
        self._guarded = False  # registered with the C core's SIGBUS guard

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_fd(
        cls,
        fd: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        mmap_offset: int = 0,
        *,
        keep_fd: bool = False,
    ) -> MemoryRegion:
        """Map ``memory_size`` bytes of ``fd`` starting at ``mmap_offset``.

        Takes ownership of ``fd``: it is closed right after mapping (the mapping
        keeps the memory alive), also when mapping fails; with ``keep_fd=True``
        it is kept as :attr:`fd` and closed with the region instead.
        ``mmap_offset`` need not be page aligned (the mapping starts at the page
        below it).
        """
        try:
            if memory_size <= 0 or mmap_offset < 0 or guest_phys_addr < 0:
                raise GuestMemoryError(
                    f"invalid memory region gpa={guest_phys_addr:#x} size={memory_size:#x} offset={mmap_offset:#x}"
                )
            try:
                mapped = map_fd(fd, memory_size, mmap_offset)
            except (OSError, ValueError, OverflowError) as exc:
                raise GuestMemoryError(
                    f"cannot map memory region gpa={guest_phys_addr:#x} size={memory_size:#x} "
                    f"offset={mmap_offset:#x}: {exc}"
                ) from exc
            region = cls(
                mapped.buf,
                guest_phys_addr,
                userspace_addr,
                mmap_offset=mmap_offset,
                backing=mapped.mmap,
                host_addr=mapped.address,
                fd=fd if keep_fd else None,
            )
            try:
                region._guarded = memory_guard.protect(fd, mmap_offset, memory_size, region.host_addr,
                                                       f"memory region gpa={guest_phys_addr:#x}")
            except BaseException:
                region.fd = None
                region.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        if not keep_fd:
            os.close(fd)
        log.debug(
            "mapped region gpa=%#x size=%#x uva=%#x offset=%#x host=%#x",
            guest_phys_addr, memory_size, userspace_addr, mmap_offset, region.host_addr,
        )
        return region

    @classmethod
    def from_description(cls, desc: MemoryRegionDescription, fd: int, *, keep_fd: bool = False) -> MemoryRegion:
        """:meth:`from_fd` with the fields of a memory-region payload."""
        return cls.from_fd(
            fd, desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset, keep_fd=keep_fd
        )

    @classmethod
    def anonymous(cls, guest_phys_addr: int, size: int, userspace_addr: int | None = None) -> MemoryRegion:
        """A region backed by fresh anonymous memory (zero-filled), for tests."""
        mm = mmap.mmap(-1, size)
        return cls(memoryview(mm), guest_phys_addr, userspace_addr, backing=mm)

    @classmethod
    def from_buffer(cls, buf: Any, guest_phys_addr: int, userspace_addr: int | None = None) -> MemoryRegion:
        """A region over an existing writable buffer (bytearray, mmap, ...), which the
        caller keeps owning (it is not closed with the region)."""
        return cls(memoryview(buf).cast("B"), guest_phys_addr, userspace_addr)

    # ---------------------------------------------------------------- queries
    @property
    def end(self) -> int:
        """First guest physical address after the region."""
        return self.guest_phys_addr + self.memory_size

    @property
    def closed(self) -> bool:
        """True once the region has been unmapped."""
        return self._closed

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the whole region."""
        if self._closed:
            raise GuestMemoryError("memory region is closed")
        return self._view

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if ``[gpa, gpa+length)`` lies inside this region."""
        return self.guest_phys_addr <= gpa and gpa + length <= self.end

    def __repr__(self) -> str:
        return (
            f"MemoryRegion(gpa={self.guest_phys_addr:#x}, size={self.memory_size:#x}, "
            f"uva={self.userspace_addr:#x}, offset={self.mmap_offset:#x}{', closed' if self._closed else ''})"
        )

    # -------------------------------------------------------------- lifetime
    def _acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise GuestMemoryError(f"{self!r} is closed")
            self._refs += 1

    def _release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs <= 0
        if last:
            self.close()

    def close(self) -> None:
        """Unmap the region (and close its kept fd).  Idempotent.

        If some caller still holds a memoryview from :meth:`GuestMemory.get_slices`
        the unmap is deferred to garbage collection (logged), never refused.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._guarded:
            memory_guard.unprotect(self.host_addr)
        _unmap(self._view, self._mmap, repr(self))
        self._mmap = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class GuestMemory:
    """An immutable snapshot of the guest memory table.

    >>> mem = GuestMemory([MemoryRegion.anonymous(0, 0x10000)])
    >>> mem.write(0x100, b"hello"); mem.read(0x100, 5)
    b'hello'
    """

    def __init__(self, regions: Iterable[MemoryRegion] = (), *, max_slots: int = MAX_MEM_SLOTS) -> None:
        """Build a snapshot of ``regions`` (in any order).

        Takes a reference on each region.  Regions that are in no other snapshot
        are adopted: if validation fails they are closed.
        Raises :class:`GuestMemoryError` on overlapping GPA ranges or too many regions.
        """
        regs = sorted(regions, key=lambda r: r.guest_phys_addr)
        try:
            if len(regs) > max_slots:
                raise GuestMemoryError(f"{len(regs)} memory regions exceed the limit of {max_slots}")
            for a, b in zip(regs, regs[1:]):
                if a.end > b.guest_phys_addr:
                    raise GuestMemoryError(f"memory regions overlap: {a!r} and {b!r}")
            acquired: list[MemoryRegion] = []
            try:
                for r in regs:
                    r._acquire()
                    acquired.append(r)
            except BaseException:
                for r in acquired:
                    r._release()
                raise
        except BaseException:
            for r in regs:
                if r._refs == 0:
                    r.close()
            raise
        self.max_slots = max_slots
        self._regions: tuple[MemoryRegion, ...] = tuple(regs)
        self._starts = [r.guest_phys_addr for r in regs]
        self._ends = [r.end for r in regs]
        self._views = [r._view for r in regs]
        self._closed = False
        # Lazily-built native memory table (the C core's view of this snapshot).
        self.native_table: Any = None
        #: The dirty log queues using this snapshot mark pages in (or None); not owned.
        self.dirty_log: DirtyLog | None = None

    def set_dirty_log(self, dirty_log: DirtyLog | None) -> None:
        """Attach (or detach) the dirty log that queues using this snapshot mark
        written pages in.  Carried over by :meth:`with_region`/:meth:`without_region`.
        The snapshot holds a reference on the log (dropped on :meth:`close` or the
        next change): the log stays mapped while a snapshot that may still be in
        use points at it, also after its owner closed it."""
        if dirty_log is not None:
            dirty_log.retain()
        old, self.dirty_log = self.dirty_log, dirty_log
        if old is not None:
            old.release()

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_table(
        cls,
        descriptions: Sequence[MemoryRegionDescription],
        fds: Sequence[int],
        *,
        keep_fds: bool = False,
        max_slots: int = MAX_MEM_SLOTS,
    ) -> GuestMemory:
        """Map a whole ``SET_MEM_TABLE``: one fd per region description.

        Takes ownership of every fd (each closed exactly once, also on errors).
        """
        if len(descriptions) != len(fds):
            for fd in fds:
                os.close(fd)
            raise GuestMemoryError(f"{len(descriptions)} memory regions but {len(fds)} fds")
        regions: list[MemoryRegion] = []
        try:
            for i, (d, fd) in enumerate(zip(descriptions, fds)):
                try:
                    regions.append(MemoryRegion.from_description(d, fd, keep_fd=keep_fds))
                except BaseException:
                    for rest in fds[i + 1 :]:
                        os.close(rest)
                    raise
        except BaseException:
            for r in regions:
                r.close()
            raise
        return cls(regions, max_slots=max_slots)

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]], *, uva_offset: int = 0) -> GuestMemory:
        """Anonymous zero-filled regions for tests: ``layout`` is ``[(gpa, size), ...]``;
        each region's uva is ``gpa + uva_offset``."""
        regions: list[MemoryRegion] = []
        try:
            for gpa, size in layout:
                regions.append(MemoryRegion.anonymous(gpa, size, gpa + uva_offset))
        except BaseException:
            for r in regions:
                r.close()
            raise
        return cls(regions)

    def with_region(self, region: MemoryRegion) -> GuestMemory:
        """A new snapshot with ``region`` added (``ADD_MEM_REG``).

        ``self`` is unchanged and must still be closed by its owner.  ``region`` is
        adopted (closed if it cannot be added).
        """
        self._check_open()
        if len(self._regions) >= self.max_slots:
            if region._refs == 0:
                region.close()
            raise GuestMemoryError(f"no free memory slot (limit {self.max_slots})")
        new = GuestMemory((*self._regions, region), max_slots=self.max_slots)
        new.set_dirty_log(self.dirty_log)
        return new

    def without_region(self, guest_phys_addr: int, memory_size: int) -> GuestMemory:
        """A new snapshot without the region at ``guest_phys_addr`` of ``memory_size``
        bytes (``REM_MEM_REG``; any fd that came with the message is the caller's).

        The removed region is unmapped when the last snapshot holding it (usually
        ``self``) is closed.
        """
        self._check_open()
        keep = [r for r in self._regions if not (r.guest_phys_addr == guest_phys_addr and r.memory_size == memory_size)]
        if len(keep) == len(self._regions):
            raise GuestMemoryError(f"no memory region at gpa={guest_phys_addr:#x} size={memory_size:#x}")
        new = GuestMemory(keep, max_slots=self.max_slots)
        new.set_dirty_log(self.dirty_log)
        return new

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Drop this snapshot's references; regions no other snapshot holds are unmapped."""
        if self._closed:
            return
        self._closed = True
        self.set_dirty_log(None)
        for r in self._regions:
            r._release()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory snapshot is closed")

    # --------------------------------------------------------------- queries
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, sorted by guest physical address."""
        return self._regions

    def __len__(self) -> int:
        return len(self._regions)

    def __repr__(self) -> str:
        return f"GuestMemory({list(self._regions)!r})"

    def table(self) -> list[tuple[int, int, int, int]]:
        """``[(gpa, size, uva, host_addr), ...]`` sorted by gpa: the memory table the
        C core consumes (see docs/ring-core.md)."""
        return [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.host_addr) for r in self._regions]

    def _index(self, gpa: int) -> int:
        """Index of the region containing ``gpa``, or -1."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._ends[i]:
            return i
        return -1

    def find_region(self, gpa: int) -> MemoryRegion | None:
        """The region containing ``gpa``, or None."""
        i = self._index(gpa)
        return self._regions[i] if i >= 0 else None

    def check_range(self, gpa: int, length: int) -> bool:
        """True if every byte of ``[gpa, gpa+length)`` is guest memory (adjacent
        regions allowed).  A zero length is valid at any address."""
        if gpa < 0 or gpa >= _ADDR_LIMIT or length < 0 or gpa + length > _ADDR_LIMIT:
            return False
        if length == 0:
            return True
        i = self._index(gpa)
        if i < 0:
            return False
        end = gpa + length
        while self._ends[i] < end:
            if i + 1 >= len(self._starts) or self._starts[i + 1] != self._ends[i]:
                return False
            i += 1
        return True

    def translate(self, gpa: int, length: int = 1) -> tuple[MemoryRegion, int]:
        """``(region, offset)`` for a range that lies inside ONE region."""
        self._check_open()
        _check_range(gpa, length)
        i = self._index(gpa)
        if i < 0 or gpa + length > self._ends[i]:
            raise GuestAddressError(
                f"guest range {gpa:#x}+{length:#x} is not inside one memory region", addr=gpa, length=length
            )
        return self._regions[i], gpa - self._starts[i]

    def gpa_to_host(self, gpa: int, length: int = 1) -> int:
        """Host address of ``gpa`` for a range inside one region (for native code)."""
        region, off = self.translate(gpa, length)
        return region.host_addr + off

    def translate_uva(self, uva: int, length: int = 1) -> tuple[MemoryRegion, int]:
        """``(region, offset)`` for a front-end virtual address range inside one region.

        If uva ranges of regions overlap (aliases), the region with the lowest gpa wins.
        """
        self._check_open()
        _check_range(uva, length, "front-end address")
        for r in self._regions:
            if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                return r, uva - r.userspace_addr
        raise GuestAddressError(
            f"front-end address range {uva:#x}+{length:#x} is not inside one memory region", addr=uva, length=length
        )

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Translate a front-end virtual address (e.g. a vring address) to a gpa."""
        region, off = self.translate_uva(uva, length)
        return region.guest_phys_addr + off

    # ----------------------------------------------------------------- access
    def get_slices(self, gpa: int, length: int) -> list[memoryview]:
        """Writable memoryviews covering ``[gpa, gpa+length)``, one per region crossed.

        Zero-copy: pass them to ``os.preadv``/``os.pwritev``/``socket.recvmsg_into``.
        Raises :class:`GuestAddressError` if any byte is outside guest memory.
        Views become invalid (and unusable) once the memory is unmapped.
        """
        self._check_open()
        _check_range(gpa, length)
        if length == 0:
            return []
        i = self._index(gpa)
        if i < 0:
            raise GuestAddressError(f"guest address {gpa:#x} is not in guest memory", addr=gpa, length=length)
        out: list[memoryview] = []
        pos, remaining = gpa, length
        while True:
            start, end = self._starts[i], self._ends[i]
            n = min(remaining, end - pos)
            out.append(self._views[i][pos - start : pos - start + n])
            remaining -= n
            if remaining == 0:
                return out
            pos = end
            i += 1
            if i >= len(self._starts) or self._starts[i] != pos:
                raise GuestAddressError(
                    f"guest range {gpa:#x}+{length:#x} crosses unmapped memory at {pos:#x}", addr=gpa, length=length
                )

    def get_slice(self, gpa: int, length: int) -> memoryview:
        """One writable memoryview for a range inside ONE region."""
        region, off = self.translate(gpa, length)
        return region._view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory."""
        slices = self.get_slices(gpa, length)
        if len(slices) == 1:
            return bytes(slices[0])
        return b"".join(slices)

    def read_into(self, gpa: int, buf: Any) -> int:
        """Fill the writable buffer ``buf`` from guest memory; returns its length."""
        dst = memoryview(buf).cast("B")
        pos = 0
        for s in self.get_slices(gpa, dst.nbytes):
            dst[pos : pos + len(s)] = s
            pos += len(s)
        return pos

    def write(self, gpa: int, data: Any) -> int:
        """Copy ``data`` (any bytes-like) into guest memory; all or nothing.

        Does not touch the dirty log: the virtqueue marks what devices write
        through chains; use :meth:`DirtyLog.mark` for other writes.
        """
        src = memoryview(data).cast("B")
        pos = 0
        for s in self.get_slices(gpa, src.nbytes):
            s[:] = src[pos : pos + len(s)]
            pos += len(s)
        return pos

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes of guest memory to ``byte``."""
        for s in self.get_slices(gpa, length):
            s[:] = bytes([byte]) * len(s)

    def read_obj(self, gpa: int, fmt: str | struct.Struct) -> tuple[Any, ...]:
        """``struct.unpack`` of guest memory at ``gpa`` (use a ``<`` format)."""
        st = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return st.unpack(self.read(gpa, st.size))

    def write_obj(self, gpa: int, fmt: str | struct.Struct, *values: Any) -> None:
        """``struct.pack`` values into guest memory at ``gpa`` (use a ``<`` format)."""
        st = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        self.write(gpa, st.pack(*values))

    def read_u8(self, gpa: int) -> int:
        """Read one byte."""
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        """Read a little-endian u16."""
        return _U16.unpack(self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        """Read a little-endian u32."""
        return _U32.unpack(self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        """Read a little-endian u64."""
        return _U64.unpack(self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        """Write one byte."""
        self.write(gpa, bytes((value,)))

    def write_u16(self, gpa: int, value: int) -> None:
        """Write a little-endian u16."""
        self.write(gpa, _U16.pack(value))

    def write_u32(self, gpa: int, value: int) -> None:
        """Write a little-endian u32."""
        self.write(gpa, _U32.pack(value))

    def write_u64(self, gpa: int, value: int) -> None:
        """Write a little-endian u64."""
        self.write(gpa, _U64.pack(value))


class DirtyLog:
    """The dirty-page bitmap shared by ``VHOST_USER_SET_LOG_BASE`` (LOG_SHMFD).

    Bit ``n`` (byte ``n // 8``, bit ``n % 8``) stands for the guest-physical page
    ``[n * 4096, (n + 1) * 4096)``.  :meth:`mark` sets bits with a read-modify-write
    under a lock (pages beyond the bitmap are ignored, logged once); the C core does
    an atomic OR instead.  The front-end clears bits concurrently; a lost *clear*
    only re-sends a page, and the lock prevents our threads losing each other's sets.
    """

    def __init__(self, buf: Any, *, backing: mmap.mmap | None = None, fd: int | None = None) -> None:
        """Wrap a writable buffer; prefer :meth:`from_fd` / :meth:`anonymous`."""
        self._view = memoryview(buf).cast("B")
        self._mmap = backing
        self.fd = fd
        self.size = self._view.nbytes
        self.host_addr = buffer_address(self._view) if self.size else 0
        self._lock = threading.Lock()
        self._warned = False
        self._closed = False
        self._refs = 1  # the owner's; close() drops it
        self._owner_closed = False
        self._guarded = False  # registered with the C core's SIGBUS guard
        #: pages marked by :meth:`mark` so far (a page marked twice counts twice;
        #: the C core's ring-index writes are not counted): for benchmarks
        self.pages_marked = 0
        #: with the C core, :meth:`mark` is its vu_log_mark (one call, atomic ORs)
        self._cptr: Any = None
        if _impl.NATIVE is not None and self.size:
            self._cptr = _impl.NATIVE.ffi.cast("uint8_t *", self.host_addr)

    @classmethod
    def from_fd(cls, fd: int, size: int, offset: int = 0, *, keep_fd: bool = False) -> DirtyLog:
        """Map the log: ``size`` and ``offset`` from the SET_LOG_BASE payload.
        Takes ownership of ``fd`` like :meth:`MemoryRegion.from_fd`."""
        try:
            if size <= 0 or offset < 0:
                raise GuestMemoryError(f"invalid dirty log size={size:#x} offset={offset:#x}")
            try:
                mapped = map_fd(fd, size, offset)
            except (OSError, ValueError, OverflowError) as exc:
                raise GuestMemoryError(f"cannot map the dirty log: {exc}") from exc
            dl = cls(mapped.buf, backing=mapped.mmap, fd=fd if keep_fd else None)
            try:
                dl._guarded = memory_guard.protect(fd, offset, size, dl.host_addr, "dirty log")
            except BaseException:
                dl.fd = None
                dl.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        if not keep_fd:
            os.close(fd)
        return dl

    @classmethod
    def anonymous(cls, size: int) -> DirtyLog:
        """A zeroed private log of ``size`` bytes, for tests."""
        mm = mmap.mmap(-1, size)
        return cls(memoryview(mm), backing=mm)

    @classmethod
    def for_memory(cls, mem: GuestMemory) -> DirtyLog:
        """An anonymous log big enough for every page of ``mem`` (tests, mock front-end)."""
        top = max((r.end for r in mem.regions), default=0)
        pages = (top + DIRTY_LOG_PAGE_SIZE - 1) // DIRTY_LOG_PAGE_SIZE
        return cls.anonymous(max(1, (pages + 7) // 8))

    @property
    def view(self) -> memoryview:
        """The bitmap as a writable memoryview."""
        return self._view

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page touched by ``[gpa, gpa+length)`` dirty (no-op for length 0)."""
        if length <= 0 or self._closed:
            return
        first = gpa // DIRTY_LOG_PAGE_SIZE
        last = (gpa + length - 1) // DIRTY_LOG_PAGE_SIZE
        v = self._view
        limit = self.size * 8
        if last >= limit:
            if not self._warned:
                self._warned = True
                log.warning("dirty log of %d bytes is too small for page %#x; ignoring such pages", self.size, last)
            if first >= limit:
                return
            last = limit - 1
        with self._lock:
            if self._closed:
                return
            self.pages_marked += last - first + 1
            if self._cptr is not None:  # the C core's atomic OR, as for its ring writes (SIGBUS-guarded)
                memory_guard.mark_log(self._cptr, self.size, first * DIRTY_LOG_PAGE_SIZE,
                                      (last - first + 1) * DIRTY_LOG_PAGE_SIZE)
                return
            page = first
            while page <= last:
                byte = page >> 3
                if page & 7 == 0 and last - page >= 7:
                    # whole bytes at a time
                    nbytes = (last - page + 1) >> 3
                    v[byte : byte + nbytes] = b"\xff" * nbytes
                    page += nbytes << 3
                    continue
                v[byte] |= 1 << (page & 7)
                page += 1

    def is_dirty(self, gpa: int) -> bool:
        """True if the page containing ``gpa`` is marked."""
        page = gpa // DIRTY_LOG_PAGE_SIZE
        if page >= self.size * 8:
            return False
        return bool(self._view[page >> 3] & (1 << (page & 7)))

    def dirty_pages(self) -> list[int]:
        """Page numbers of every set bit (for tests and the mock front-end)."""
        out: list[int] = []
        data = bytes(self._view)
        for i, b in enumerate(data):
            if b:
                out.extend(i * 8 + bit for bit in range(8) if b & (1 << bit))
        return out

    def clear(self) -> None:
        """Clear every bit (what the front-end does after a sync)."""
        with self._lock:
            self._view[:] = bytes(self.size)

    def retain(self) -> None:
        """Take a reference (a memory snapshot that points at the log)."""
        with self._lock:
            if self._closed:
                raise GuestMemoryError("the dirty log is closed")
            self._refs += 1

    def release(self) -> None:
        """Drop a reference; the last one unmaps the log."""
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._unmap()

    def close(self) -> None:
        """The owner lets go (idempotent): the log is unmapped (and its kept fd
        closed) once no memory snapshot refers to it any more."""
        with self._lock:
            if self._owner_closed:
                return
            self._owner_closed = True
        self.release()

    def _unmap(self) -> None:
        with self._lock:  # no mark() is half-way through the mapping
            if self._closed:
                return
            self._closed = True
            self._cptr = None
        log.info("dirty log of %d bytes closed: %d pages marked", self.size, self.pages_marked)
        if self._guarded:
            memory_guard.unprotect(self.host_addr)
        _unmap(self._view, self._mmap, "dirty log")
        self._mmap = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
