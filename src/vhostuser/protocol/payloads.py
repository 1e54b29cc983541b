"""Typed vhost-user payloads: frozen dataclasses that pack and unpack themselves.

All numbers are in the machine's native byte order (the spec says so), with the
C layouts QEMU uses (``struct`` format ``=`` plus explicit padding).

Two kinds of errors:

* constructing a payload with out-of-range fields, or packing it, raises
  :class:`~vhostuser.errors.LocalProtocolError` (our misuse);
* :meth:`Payload.unpack` of bytes that do not form a valid payload raises
  :class:`~vhostuser.errors.InvalidMessage` (the peer's bytes).

These classes never touch memory, fds or sockets.
"""
from __future__ import annotations

import enum
import struct
import uuid as _uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar, TypeVar

from ..errors import InvalidMessage, LocalProtocolError
from .message import MAX_CONFIG_SIZE, MAX_MEM_TABLE_REGIONS, MAX_MSG_SIZE, MAX_SHMEM_REGIONS, VRING_INDEX_MASK, VRING_NOFD_MASK

__all__ = [
    "Payload",
    "Empty",
    "U64",
    "VringState",
    "VringAddr",
    "VringAddrFlags",
    "MemoryRegion",
    "MemoryTable",
    "SingleMemoryRegion",
    "Log",
    "IotlbMsg",
    "IotlbType",
    "IotlbPerm",
    "Config",
    "ConfigFlags",
    "VringArea",
    "Inflight",
    "SharedObject",
    "DeviceStateTransfer",
    "TransferDirection",
    "TransferPhase",
    "ShmemConfig",
    "ShmemMap",
    "ShmemMapFlags",
    "Opaque",
    "vring_fd_u64",
]

_P = TypeVar("_P", bound="Payload")

_U8 = (1 << 8) - 1
_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _check_uint(obj: object, name: str, limit: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or not 0 <= value <= limit:
        raise LocalProtocolError(f"{type(obj).__name__}.{name}={value!r} is not an unsigned integer <= {limit:#x}")


class Payload:
    """Base class of every payload.

    ``SIZE`` is the fixed wire size, or ``None`` for variable-size payloads
    (which then override :meth:`fits`).
    """

    SIZE: ClassVar[int | None] = 0
    #: ``struct`` format of fixed-size payloads whose fields map 1:1 to it
    _FORMAT: ClassVar[str | None] = None
    #: upper bounds of the integer fields, by name (for validation)
    _LIMITS: ClassVar[dict[str, int]] = {}

    def __post_init__(self) -> None:
        for name, limit in self._LIMITS.items():
            _check_uint(self, name, limit)

    @classmethod
    def fits(cls, size: int) -> bool:
        """Whether a payload of ``size`` bytes can be of this type."""
        return size == cls.SIZE

    def pack(self) -> bytes:
        """The payload's wire bytes."""
        assert self._FORMAT is not None, type(self).__name__
        return struct.pack(self._FORMAT, *(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def unpack(cls: type[_P], data: bytes) -> _P:
        """Parse wire bytes; raises :class:`InvalidMessage` if they are not a valid payload."""
        if not cls.fits(len(data)):
            raise InvalidMessage(f"{cls.__name__}: a {len(data)}-byte payload has the wrong size (want {cls._size_text()})")
        try:
            return cls._unpack(bytes(data))
        except LocalProtocolError as exc:  # field validation of remote values
            raise InvalidMessage(f"{cls.__name__}: {exc}") from None

    @classmethod
    def _unpack(cls: type[_P], data: bytes) -> _P:
        assert cls._FORMAT is not None, cls.__name__
        return cls(*struct.unpack(cls._FORMAT, data))

    @classmethod
    def _size_text(cls) -> str:
        return f"{cls.SIZE} bytes" if cls.SIZE is not None else "a variable size"


# ---------------------------------------------------------------- basic types
@dataclass(frozen=True)
class Empty(Payload):
    """No payload (size 0)."""

    SIZE: ClassVar[int | None] = 0

    def pack(self) -> bytes:
        return b""

    @classmethod
    def _unpack(cls, data: bytes) -> Empty:
        return cls()


@dataclass(frozen=True)
class U64(Payload):
    """A single 64-bit value (features, counts, acks, vring index + flags)."""

    value: int = 0
    SIZE: ClassVar[int | None] = 8
    _FORMAT: ClassVar[str | None] = "=Q"
    _LIMITS: ClassVar[dict[str, int]] = {"value": _U64}


def vring_fd_u64(index: int, has_fd: bool) -> U64:
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index in bits 0-7, bit 8 set when no fd is sent."""
    if not 0 <= index <= VRING_INDEX_MASK:
        raise LocalProtocolError(f"vring index {index} does not fit in 8 bits")
    return U64(index | (0 if has_fd else VRING_NOFD_MASK))


@dataclass(frozen=True)
class VringState(Payload):
    """A vring state: ``index`` and a 32-bit ``num`` (size, base, enable, ...)."""

    index: int = 0
    num: int = 0
    SIZE: ClassVar[int | None] = 8
    _FORMAT: ClassVar[str | None] = "=II"
    _LIMITS: ClassVar[dict[str, int]] = {"index": _U32, "num": _U32}


class VringAddrFlags(enum.IntFlag):
    """Flags of :class:`VringAddr`."""

    LOG = 0x1  # VHOST_VRING_F_LOG


@dataclass(frozen=True)
class VringAddr(Payload):
    """A vring address description (front-end user addresses, or IOVAs with an IOMMU).
    For a packed ring ``descriptor``/``available``/``used`` are the descriptor ring,
    driver area and device area."""

    index: int = 0
    flags: int = 0
    descriptor: int = 0
    used: int = 0
    available: int = 0
    log: int = 0
    SIZE: ClassVar[int | None] = 40
    _FORMAT: ClassVar[str | None] = "=IIQQQQ"
    _LIMITS: ClassVar[dict[str, int]] = {
        "index": _U32, "flags": _U32, "descriptor": _U64, "used": _U64, "available": _U64, "log": _U64,
    }


# ---------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryRegion(Payload):
    """One guest memory region: guest physical address, size, front-end user
    address and the offset of the region in its fd."""

    guest_phys_addr: int = 0
    memory_size: int = 0
    userspace_addr: int = 0
    mmap_offset: int = 0
    SIZE: ClassVar[int | None] = 32
    _FORMAT: ClassVar[str | None] = "=QQQQ"
    _LIMITS: ClassVar[dict[str, int]] = {
        "guest_phys_addr": _U64, "memory_size": _U64, "userspace_addr": _U64, "mmap_offset": _U64,
    }


@dataclass(frozen=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: up to :data:`MAX_MEM_TABLE_REGIONS` regions (one fd each).

    On the wire: ``nregions`` (u32), padding (u32), then ``nregions`` regions.
    """

    regions: tuple[MemoryRegion, ...] = ()
    SIZE: ClassVar[int | None] = None
    _HEAD: ClassVar[str] = "=II"

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions))
        if len(self.regions) > MAX_MEM_TABLE_REGIONS:
            raise LocalProtocolError(
                f"a memory table holds at most {MAX_MEM_TABLE_REGIONS} regions, not {len(self.regions)} "
                "(use ADD_MEM_REG for more)")
        for r in self.regions:
            if not isinstance(r, MemoryRegion):
                raise LocalProtocolError(f"MemoryTable.regions must hold MemoryRegion, not {type(r).__name__}")

    @classmethod
    def fits(cls, size: int) -> bool:
        return size >= 8 and (size - 8) % MemoryRegion.SIZE == 0  # type: ignore[operator]

    def pack(self) -> bytes:
        return struct.pack(self._HEAD, len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def _unpack(cls, data: bytes) -> MemoryTable:
        nregions, _padding = struct.unpack_from(cls._HEAD, data)
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise InvalidMessage(f"memory table with {nregions} regions (at most {MAX_MEM_TABLE_REGIONS})")
        if len(data) != 8 + nregions * 32:
            raise InvalidMessage(f"memory table says {nregions} regions but carries {(len(data) - 8) // 32}")
        return cls(tuple(MemoryRegion._unpack(data[8 + 32 * i: 40 + 32 * i]) for i in range(nregions)))


@dataclass(frozen=True)
class SingleMemoryRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG: 64 bits of padding, then one region."""

    region: MemoryRegion = field(default_factory=MemoryRegion)
    SIZE: ClassVar[int | None] = 40

    def __post_init__(self) -> None:
        if not isinstance(self.region, MemoryRegion):
            raise LocalProtocolError("SingleMemoryRegion.region must be a MemoryRegion")

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def _unpack(cls, data: bytes) -> SingleMemoryRegion:
        return cls(MemoryRegion._unpack(data[8:]))


@dataclass(frozen=True)
class Log(Payload):
    """SET_LOG_BASE: the dirty log's size and offset in the supplied fd."""

    mmap_size: int = 0
    mmap_offset: int = 0
    SIZE: ClassVar[int | None] = 16
    _FORMAT: ClassVar[str | None] = "=QQ"
    _LIMITS: ClassVar[dict[str, int]] = {"mmap_size": _U64, "mmap_offset": _U64}


class IotlbType(enum.IntEnum):
    """``type`` of an IOTLB message."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(enum.IntFlag):
    """``perm`` of an IOTLB message (0 = no access)."""

    RO = 1
    WO = 2
    RW = 3


@dataclass(frozen=True)
class IotlbMsg(Payload):
    """``struct vhost_iotlb_msg`` (IOTLB_MSG in both directions); 32 bytes with C padding."""

    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: int = 0
    type: int = 0
    SIZE: ClassVar[int | None] = 32
    _FORMAT: ClassVar[str | None] = "=QQQBB6x"
    _LIMITS: ClassVar[dict[str, int]] = {"iova": _U64, "size": _U64, "uaddr": _U64, "perm": _U8, "type": _U8}


# ---------------------------------------------------------------------- config
class ConfigFlags(enum.IntFlag):
    """Flags of :class:`Config` (0 = a normal front-end access)."""

    WRITABLE = 0x1
    LIVE_MIGRATION = 0x2


@dataclass(frozen=True)
class Config(Payload):
    """GET_CONFIG / SET_CONFIG: ``offset`` (u32), ``size`` (u32), ``flags`` (u32)
    then ``size`` bytes of config space.  ``size`` is always ``len(data)``."""

    offset: int = 0
    data: bytes = b""
    flags: int = 0
    SIZE: ClassVar[int | None] = None
    _HEAD: ClassVar[str] = "=III"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", bytes(self.data))
        _check_uint(self, "offset", _U32)
        _check_uint(self, "flags", _U32)
        if self.offset + len(self.data) > MAX_CONFIG_SIZE:
            raise LocalProtocolError(
                f"config access [{self.offset}, +{len(self.data)}) beyond the {MAX_CONFIG_SIZE}-byte limit")

    @property
    def size(self) -> int:
        """Number of config bytes (the ``size`` field)."""
        return len(self.data)

    @classmethod
    def fits(cls, size: int) -> bool:
        return 12 <= size <= MAX_MSG_SIZE

    def pack(self) -> bytes:
        return struct.pack(self._HEAD, self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def _unpack(cls, data: bytes) -> Config:
        offset, size, flags = struct.unpack_from(cls._HEAD, data)
        if size != len(data) - 12:
            raise InvalidMessage(f"config space size field {size} does not match the {len(data) - 12} bytes carried")
        return cls(offset, data[12:], flags)


@dataclass(frozen=True)
class VringArea(Payload):
    """VRING_HOST_NOTIFIER_MSG: ``u64`` (vring index + NOFD bit 8), size and offset in the fd."""

    u64: int = 0
    size: int = 0
    offset: int = 0
    SIZE: ClassVar[int | None] = 24
    _FORMAT: ClassVar[str | None] = "=QQQ"
    _LIMITS: ClassVar[dict[str, int]] = {"u64": _U64, "size": _U64, "offset": _U64}

    @property
    def index(self) -> int:
        """The vring index (bits 0-7)."""
        return self.u64 & VRING_INDEX_MASK

    @property
    def has_fd(self) -> bool:
        """False when the NOFD bit is set (de-register the notifier)."""
        return not self.u64 & VRING_NOFD_MASK


@dataclass(frozen=True)
class Inflight(Payload):
    """GET/SET_INFLIGHT_FD: size and offset of the inflight area, queue count and size."""

    mmap_size: int = 0
    mmap_offset: int = 0
    num_queues: int = 0
    queue_size: int = 0
    SIZE: ClassVar[int | None] = 24
    _FORMAT: ClassVar[str | None] = "=QQHH4x"
    _LIMITS: ClassVar[dict[str, int]] = {"mmap_size": _U64, "mmap_offset": _U64, "num_queues": _U16, "queue_size": _U16}


@dataclass(frozen=True)
class SharedObject(Payload):
    """A virtio shared object's UUID (16 bytes, RFC 4122 byte order)."""

    uuid: _uuid.UUID = field(default_factory=lambda: _uuid.UUID(int=0))
    SIZE: ClassVar[int | None] = 16

    def __post_init__(self) -> None:
        if not isinstance(self.uuid, _uuid.UUID):
            raise LocalProtocolError("SharedObject.uuid must be a uuid.UUID")

    def pack(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def _unpack(cls, data: bytes) -> SharedObject:
        return cls(_uuid.UUID(bytes=data))


class TransferDirection(enum.IntEnum):
    """Direction of a device state transfer."""

    SAVE = 0
    LOAD = 1


class TransferPhase(enum.IntEnum):
    """Migration phase of a device state transfer."""

    STOPPED = 0


@dataclass(frozen=True)
class DeviceStateTransfer(Payload):
    """SET_DEVICE_STATE_FD: transfer direction and migration phase."""

    direction: int = TransferDirection.SAVE
    phase: int = TransferPhase.STOPPED
    SIZE: ClassVar[int | None] = 8
    _FORMAT: ClassVar[str | None] = "=II"
    _LIMITS: ClassVar[dict[str, int]] = {"direction": _U32, "phase": _U32}


@dataclass(frozen=True)
class ShmemConfig(Payload):
    """GET_SHMEM_CONFIG reply: VIRTIO Shared Memory Region sizes, indexed by shmid.

    On the wire: ``nregions`` (u32), padding (u32), 256 u64 sizes.  ``sizes`` holds
    the whole array without trailing zeros; ``nregions`` counts the non-zero ones.
    """

    sizes: tuple[int, ...] = ()
    SIZE: ClassVar[int | None] = 8 + 8 * MAX_SHMEM_REGIONS
    _FORMAT: ClassVar[str | None] = f"=II{MAX_SHMEM_REGIONS}Q"

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        while sizes and sizes[-1] == 0:
            sizes = sizes[:-1]
        object.__setattr__(self, "sizes", sizes)
        if len(sizes) > MAX_SHMEM_REGIONS:
            raise LocalProtocolError(f"at most {MAX_SHMEM_REGIONS} shared memory regions")
        for s in sizes:
            if not isinstance(s, int) or not 0 <= s <= _U64:
                raise LocalProtocolError(f"shared memory region size {s!r} is not a u64")

    @property
    def nregions(self) -> int:
        """Number of regions with a non-zero size."""
        return sum(1 for s in self.sizes if s)

    def pack(self) -> bytes:
        padded = list(self.sizes) + [0] * (MAX_SHMEM_REGIONS - len(self.sizes))
        return struct.pack(self._FORMAT, self.nregions, 0, *padded)  # type: ignore[arg-type]

    @classmethod
    def _unpack(cls, data: bytes) -> ShmemConfig:
        nregions, _pad, *sizes = struct.unpack(cls._FORMAT, data)  # type: ignore[arg-type]
        result = cls(tuple(sizes))
        if result.nregions != nregions:
            raise InvalidMessage(f"shmem config says {nregions} regions but has {result.nregions} non-zero sizes")
        return result


class ShmemMapFlags(enum.IntFlag):
    """Flags of :class:`ShmemMap` (0 = read-only)."""

    WRITABLE = 0x1


@dataclass(frozen=True)
class ShmemMap(Payload):
    """SHMEM_MAP / SHMEM_UNMAP (``VhostUserMMap``): map ``len`` bytes of the fd at
    ``fd_offset`` into shared memory region ``shmid`` at ``shm_offset``."""

    shmid: int = 0
    fd_offset: int = 0
    shm_offset: int = 0
    len: int = 0
    flags: int = 0
    SIZE: ClassVar[int | None] = 40
    _FORMAT: ClassVar[str | None] = "=B7xQQQQ"
    _LIMITS: ClassVar[dict[str, int]] = {"shmid": _U8, "fd_offset": _U64, "shm_offset": _U64, "len": _U64, "flags": _U64}


@dataclass(frozen=True)
class Opaque(Payload):
    """Bytes we carry but do not interpret (crypto session descriptions)."""

    data: bytes = b""
    SIZE: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) > MAX_MSG_SIZE:
            raise LocalProtocolError(f"payload of {len(self.data)} bytes exceeds {MAX_MSG_SIZE}")

    @classmethod
    def fits(cls, size: int) -> bool:
        return 0 <= size <= MAX_MSG_SIZE

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def _unpack(cls, data: bytes) -> Opaque:
        return cls(data)


def payload_types() -> Sequence[type[Payload]]:
    """Every concrete payload type (for tests and documentation)."""
    return (Empty, U64, VringState, VringAddr, MemoryRegion, MemoryTable, SingleMemoryRegion, Log, IotlbMsg,
            Config, VringArea, Inflight, SharedObject, DeviceStateTransfer, ShmemConfig, ShmemMap, Opaque)
