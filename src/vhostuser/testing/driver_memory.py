"""Guest RAM for the mock front-end: shared memory by fd, like QEMU's
``memory-backend-memfd,share=on``.

:class:`GuestRam` creates the regions of a memory layout (guest physical
ranges, holes allowed), gives each a front-end "user address" (uva) that is
*not* its gpa, so a back-end that confuses the two fails at once, and maps them
into this process as a :class:`~vhostuser.memory.GuestMemory` that the ring
driver (:mod:`vhostuser.virtqueue.driver`) writes into.

By default all regions are windows of ONE shm fd at ``mmap_offset = gpa`` (as
QEMU sends its two regions below and above the VGA hole), so back-ends must
honour ``mmap_offset``; ``single_fd=False`` gives each region its own fd.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MockFrontendError
from ..memory import GuestMemory, MemoryRegion
from ..protocol.payloads import MemoryRegion as MemoryRegionPayload
from ..sys_util.shm import ShmKind, create_shm_fd

__all__ = ["RamRegion", "GuestRam", "DEFAULT_LAYOUT", "DEFAULT_UVA_BASE"]

log = logging.getLogger(__name__)

#: Two 4 MiB regions with a 4 MiB hole between them.
DEFAULT_LAYOUT: tuple[tuple[int, int], ...] = ((0, 4 << 20), (8 << 20, 4 << 20))
#: Where the front-end "maps" guest RAM (only the numbers matter: uvas are
#: translated by the back-end, never dereferenced by us).
DEFAULT_UVA_BASE = 0x7F00_0000_0000
_UVA_STRIDE = 1 << 32
_PAGE = 4096


@dataclass
class RamRegion:
    """One region of guest RAM: what goes into SET_MEM_TABLE / ADD_MEM_REG."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    #: the shm fd backing the region (owned by :class:`GuestRam`; maybe shared)
    fd: int

    @property
    def end(self) -> int:
        """First gpa after the region."""
        return self.guest_phys_addr + self.memory_size

    def payload(self) -> MemoryRegionPayload:
        """The protocol payload describing this region."""
        return MemoryRegionPayload(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)


class GuestRam:
    """Guest RAM regions backed by shm fds, plus this process's view of them.

    Owns every fd and mapping it creates; :meth:`close` releases all of them.
    """

    def __init__(self, layout: Sequence[tuple[int, int]] = DEFAULT_LAYOUT, *, single_fd: bool = True,
                 uva_base: int = DEFAULT_UVA_BASE, shm_kind: ShmKind | str | None = None,
                 name: str = "guest-ram") -> None:
        if not layout:
            raise MockFrontendError("guest RAM needs at least one region")
        spans = sorted(layout)
        for gpa, size in spans:
            if gpa % _PAGE or size <= 0 or size % _PAGE:
                raise MockFrontendError(f"region gpa={gpa:#x} size={size:#x} is not page aligned")
        for (a, sa), (b, _) in zip(spans, spans[1:]):
            if a + sa > b:
                raise MockFrontendError(f"regions at {a:#x} and {b:#x} overlap")
        self.uva_base = uva_base
        self._shm_kind = shm_kind
        self._name = name
        self._fds: list[int] = []
        self.regions: list[RamRegion] = []
        #: regions added later with :meth:`add_region` (not used by the rings)
        self.extra: list[RamRegion] = []
        self._next_uva_slot = len(spans)
        mapped: list[MemoryRegion] = []
        try:
            shared = None
            if single_fd:
                shared = self._new_fd(max(g + s for g, s in spans))
            for i, (gpa, size) in enumerate(spans):
                fd = shared if shared is not None else self._new_fd(size)
                offset = gpa if shared is not None else 0
                region = RamRegion(gpa, size, uva_base + i * _UVA_STRIDE, offset, fd)
                self.regions.append(region)
                mapped.append(MemoryRegion.from_fd(os.dup(fd), gpa, size, region.userspace_addr, offset))
            #: this process's view of the guest RAM (what the ring driver uses)
            self.memory = GuestMemory(mapped)
        except BaseException:
            for r in mapped:
                r.close()
            self._close_fds()
            raise
        self._alloc_pos = [r.guest_phys_addr for r in self.regions]

    def _new_fd(self, size: int) -> int:
        fd = create_shm_fd(size, self._name, self._shm_kind)
        self._fds.append(fd)
        return fd

    # ------------------------------------------------------------ queries
    def payloads(self) -> list[MemoryRegionPayload]:
        """Every region (boot regions then hot-added ones) as protocol payloads."""
        return [r.payload() for r in (*self.regions, *self.extra)]

    def fds(self) -> list[int]:
        """The fd of each region of :meth:`payloads` (still owned by us)."""
        return [r.fd for r in (*self.regions, *self.extra)]

    def all_regions(self) -> list[RamRegion]:
        """Boot regions then hot-added ones."""
        return [*self.regions, *self.extra]

    def gpa_to_uva(self, gpa: int) -> int:
        """The front-end user address of ``gpa`` (what SET_VRING_ADDR carries)."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa < r.end:
                return r.userspace_addr + gpa - r.guest_phys_addr
        raise MockFrontendError(f"gpa {gpa:#x} is not in guest RAM")

    @property
    def top(self) -> int:
        """First gpa above every region (hot-added ones included)."""
        return max(r.end for r in self.all_regions())

    # --------------------------------------------------------- allocation
    def allocate(self, size: int, *, prefer: int = 0, align: int = _PAGE) -> int:
        """Reserve ``size`` bytes inside one region (tried from region ``prefer``
        on, round-robin) and return their gpa.  Never freed: the mock front-end
        lays each queue out once."""
        n = len(self.regions)
        for k in range(n):
            i = (prefer + k) % n
            r = self.regions[i]
            pos = (self._alloc_pos[i] + align - 1) // align * align
            if pos + size <= r.end:
                self._alloc_pos[i] = pos + size
                return pos
        raise MockFrontendError(f"guest RAM has no room for {size:#x} more bytes in one region "
                                "(give FrontendOptions.memory bigger regions)")

    # ---------------------------------------------------------- hot plug
    def add_region(self, gpa: int, size: int) -> RamRegion:
        """Create a new region (its own fd) at ``gpa``; the caller sends ADD_MEM_REG."""
        if gpa % _PAGE or size <= 0 or size % _PAGE:
            raise MockFrontendError(f"region gpa={gpa:#x} size={size:#x} is not page aligned")
        for r in self.all_regions():
            if gpa < r.end and r.guest_phys_addr < gpa + size:
                raise MockFrontendError(f"region gpa={gpa:#x} overlaps {r.guest_phys_addr:#x}")
        fd = self._new_fd(size)
        region = RamRegion(gpa, size, self.uva_base + self._next_uva_slot * _UVA_STRIDE, 0, fd)
        self._next_uva_slot += 1
        self.extra.append(region)
        return region

    def remove_region(self, gpa: int) -> RamRegion:
        """Forget the hot-added region at ``gpa`` and close its fd (after the caller
        sent REM_MEM_REG)."""
        for r in self.extra:
            if r.guest_phys_addr == gpa:
                self.extra.remove(r)
                self._fds.remove(r.fd)
                os.close(r.fd)
                return r
        raise MockFrontendError(f"no hot-added region at {gpa:#x}")

    # ----------------------------------------------------------- lifetime
    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """Unmap the local view and close every fd.  Idempotent."""
        mem = getattr(self, "memory", None)
        if mem is not None:
            mem.close()
        self._close_fds()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestRam({[(hex(r.guest_phys_addr), hex(r.memory_size)) for r in self.all_regions()]})"
