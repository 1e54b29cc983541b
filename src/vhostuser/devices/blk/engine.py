"""The virtio-blk request engine (VIRTIO 1.3 §5.2), independent of rings and sockets.

A request is one descriptor chain::

    device-readable:  struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
                      [data (OUT) | discard/write-zeroes segments]
    device-writable:  [data (IN) | 20-byte id (GET_ID)]  u8 status

:meth:`BlkRequestEngine.process` takes anything with ``reader()``/``writer()``
and ``readable_len``/``writable_len`` (a :class:`~vhostuser.virtqueue.DescriptorChain`),
executes the request against a :class:`~.image.BlockImage`, writes the status
byte and returns the used length: the bytes really written into the chain (the
data read, the id, and the status byte; 1 for a failed request).  It never raises for a bad request: a short
header, data that is not a whole number of sectors, a sector outside the disk,
a write to a read-only disk, an unknown type... each gets ``IOERR`` or
``UNSUPP``.  A chain without any writable byte cannot carry a status; it is
returned with length 0.

:class:`VirtioBlkConfig` is ``struct virtio_blk_config`` (packed little-endian).
"""
from __future__ import annotations

import enum
import errno
import logging
import struct
from array import array
from dataclasses import dataclass, fields
from typing import Any, Protocol

from ...errors import BlkImageError, ChainTooShort, GuestMemoryError
from .image import SECTOR_SHIFT, SECTOR_SIZE, BlockImage

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2


class RequestType(enum.IntEnum):
    """``VIRTIO_BLK_T_*``."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    """``VIRTIO_BLK_S_*``: the request's last (device-writable) byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlkFeature(enum.IntFlag):
    """``VIRTIO_BLK_F_*`` device feature bits."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14
    LIFETIME = 1 << 15
    SECURE_ERASE = 1 << 16


#: struct virtio_blk_outhdr
OUTHDR = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes
DWZ_SEGMENT = struct.Struct("<QII")
#: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
WRITE_ZEROES_FLAG_UNMAP = 1
#: VIRTIO_BLK_ID_BYTES
ID_BYTES = 20

#: ``struct virtio_blk_config`` up to ``write_zeroes_may_unmap`` (57 bytes, what
#: QEMU 7.2 reads), then ``unused1[3]``, the secure-erase fields and the zoned
#: characteristics, which this device does not use (zeros): 96 bytes in all.
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII20s4x")
CONFIG_SIZE = _CONFIG.size
#: offset of ``writeback`` (the only field a driver may write, with CONFIG_WCE)
WRITEBACK_OFFSET = 32
assert CONFIG_SIZE == 96, CONFIG_SIZE


@dataclass
class VirtioBlkConfig:
    """``struct virtio_blk_config`` (VIRTIO 1.3 §5.2.4)."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 1
    opt_io_size: int = 0
    writeback: int = 0
    unused0: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    def pack(self) -> bytes:
        """The little-endian config space (:data:`CONFIG_SIZE` bytes)."""
        return _CONFIG.pack(*(getattr(self, f.name) for f in fields(self)), b"")

    @classmethod
    def unpack(cls, data: bytes) -> VirtioBlkConfig:
        """Parse a config space (shorter reads, e.g. QEMU's 57 bytes, are zero-extended)."""
        values = _CONFIG.unpack(bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\0"))
        return cls(*values[:-1])


class ChainLike(Protocol):
    """What the engine needs of a request (a :class:`~vhostuser.virtqueue.DescriptorChain`)."""

    @property
    def readable_len(self) -> int:
        """Total bytes of the device-readable buffers."""

    @property
    def writable_len(self) -> int:
        """Total bytes of the device-writable buffers."""

    def reader(self) -> Any:
        """A reader over the device-readable buffers."""

    def writer(self) -> Any:
        """A writer over the device-writable buffers."""


@dataclass
class BlkStats:
    """Counters of one engine (approximate when several workers share it)."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    unsupported: int = 0
    no_status: int = 0


class _Reject(Exception):
    """Internal: end a request with ``status`` (and log ``reason`` at debug level)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class BlkRequestEngine:
    """Executes virtio-blk requests against a :class:`BlockImage`.

    Thread-safe in the sense the device needs: several workers may call
    :meth:`process` at once (positioned I/O on a shared fd); the counters in
    :attr:`stats` are then approximate.

    ``serial``: the GET_ID answer (at most 20 bytes, NUL-padded).
    ``discard`` / ``write_zeroes``: offer those requests (ignored for a read-only
    image).  The limits go to the config space and are enforced.
    """

    def __init__(
        self,
        image: BlockImage,
        *,
        serial: str | bytes = b"",
        num_queues: int = 1,
        seg_max: int = 126,
        discard: bool = True,
        write_zeroes: bool = True,
        max_discard_sectors: int = 1 << 22,
        max_discard_seg: int = 32,
        max_write_zeroes_sectors: int = 1 << 22,
        max_write_zeroes_seg: int = 32,
    ) -> None:
        self.image = image
        raw = serial.encode() if isinstance(serial, str) else bytes(serial)
        if len(raw) > ID_BYTES:
            raise ValueError(f"the serial is at most {ID_BYTES} bytes, not {len(raw)}")
        self.serial = raw
        self.num_queues = num_queues
        self.seg_max = seg_max
        self.read_only = image.read_only
        self.discard_enabled = discard and not image.read_only
        self.write_zeroes_enabled = write_zeroes and not image.read_only
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        self.acked = self.features()
        #: write-back cache mode (the config's ``writeback``); in write-through
        #: mode every write is followed by fdatasync.
        self.writeback = True
        self.stats = BlkStats()

    # --------------------------------------------------------------- features
    def features(self) -> int:
        """The ``VIRTIO_BLK_F_*`` bits this engine offers."""
        f = (BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.TOPOLOGY | BlkFeature.FLUSH
             | BlkFeature.CONFIG_WCE | BlkFeature.MQ)
        if self.read_only:
            f |= BlkFeature.RO
        if self.discard_enabled:
            f |= BlkFeature.DISCARD
        if self.write_zeroes_enabled:
            f |= BlkFeature.WRITE_ZEROES
        return int(f)

    def set_acked_features(self, acked: int) -> None:
        """The driver's features: gates DISCARD / WRITE_ZEROES and sets the cache mode
        (write-back after reset iff FLUSH was negotiated, VIRTIO 1.3 §5.2.6.3)."""
        self.acked = acked
        self.writeback = bool(acked & BlkFeature.FLUSH)

    def reset(self) -> None:
        """Device reset: everything offered counts as acked again, write-back mode."""
        self.acked = self.features()
        self.writeback = True

    # ----------------------------------------------------------------- config
    def config(self) -> VirtioBlkConfig:
        """The current config space."""
        blk_size = self.image.logical_block_size
        return VirtioBlkConfig(
            capacity=self.image.capacity,
            seg_max=self.seg_max,
            blk_size=blk_size,
            min_io_size=1,  # in logical blocks
            opt_io_size=0,
            writeback=int(self.writeback),
            num_queues=self.num_queues,
            max_discard_sectors=self.max_discard_sectors if self.discard_enabled else 0,
            max_discard_seg=self.max_discard_seg if self.discard_enabled else 0,
            discard_sector_alignment=max(1, blk_size >> SECTOR_SHIFT) if self.discard_enabled else 0,
            max_write_zeroes_sectors=self.max_write_zeroes_sectors if self.write_zeroes_enabled else 0,
            max_write_zeroes_seg=self.max_write_zeroes_seg if self.write_zeroes_enabled else 0,
            write_zeroes_may_unmap=int(self.write_zeroes_enabled and self.image.can_fallocate),
        )

    def set_writeback(self, value: int) -> None:
        """The driver wrote ``writeback`` (CONFIG_WCE): 0 write-through, 1 write-back."""
        self.writeback = bool(value)
        log.info("cache mode: %s", "write-back" if self.writeback else "write-through")

    # --------------------------------------------------------------- requests
    def process(self, chain: ChainLike) -> int:
        """Execute one request; returns the used length (bytes written to the chain,
        status byte included).  Never raises for anything the driver sent."""
        writable = chain.writable_len
        if writable == 0:
            self.stats.no_status += 1
            log.warning("virtio-blk request without a writable status byte: returned unprocessed")
            return 0
        data_w = chain.writer()
        status_w = data_w.split_at(writable - 1)
        try:
            status = self._execute(chain, data_w)
        except _Reject as rej:
            status = rej.status
            log.debug("request failed (%s): %s", status.name, rej)
        except (OSError, BlkImageError, ChainTooShort, GuestMemoryError) as exc:
            status = Status.IOERR
            log.warning("request failed with an I/O error: %s", exc)
        except Exception:  # noqa: BLE001 - a bug must not take the queue down with it
            status = Status.IOERR
            log.exception("unexpected error while executing a virtio-blk request")
        if status == Status.IOERR:
            self.stats.errors += 1
        elif status == Status.UNSUPP:
            self.stats.unsupported += 1
        status_w.write_u8(int(status))
        # The used length is what the device wrote into the chain (VIRTIO 1.3
        # §2.7.8.2): the data an IN / GET_ID wrote, and the status byte.  A
        # request refused before its data was touched reports 1.
        return data_w.bytes_written + 1

    # ------------------------------------------------------------ batch path
    def plan(self, iob: Any) -> tuple[bytearray, array, array, int]:
        """The batch path's policy for an :class:`~vhostuser.virtqueue.IoBatch`
        popped with 16-byte headers: ``(ops, offsets, lens, data bytes)`` for
        :meth:`VringState.complete_io <vhostuser.vring.VringState.complete_io>`
        (the last: how many bytes the ring core will transfer).

        Plain reads and writes (whole sectors inside the disk, a status byte,
        a writable disk in write-back mode for writes) become ``IoOp.READ`` /
        ``IoOp.WRITE`` at the sector's byte offset, done by the ring core; every
        other request is served here and now through :meth:`process` (its
        status written, its used length in ``lens``)."""
        n = len(iob.chains)
        ops = bytearray(n)
        offsets = array("Q", bytes(8 * n))
        lens = array("I", bytes(4 * n))
        limit = self.image.capacity << SECTOR_SHIFT
        writes_ok = not self.read_only and self.writeback
        readable, writable, chains = iob.readable, iob.writable, iob.chains
        reads = writes = nread = nwritten = 0
        k = 0
        for rtype, _ioprio, sector in OUTHDR.iter_unpack(iob.headers):
            rd = readable[k]
            wr = writable[k]
            if rd >= 16 and wr:
                off = sector << SECTOR_SHIFT
                if rtype == 0:  # IN
                    ln = wr - 1
                    if ln and not ln & 511 and off + ln <= limit:
                        ops[k] = 1
                        offsets[k] = off
                        reads += 1
                        nread += ln
                        k += 1
                        continue
                elif rtype == 1 and writes_ok:  # OUT
                    ln = rd - 16
                    if ln and not ln & 511 and off + ln <= limit:
                        ops[k] = 2
                        offsets[k] = off
                        writes += 1
                        nwritten += ln
                        k += 1
                        continue
            lens[k] = self.process(chains[k])
            k += 1
        st = self.stats
        st.reads += reads
        st.writes += writes
        st.bytes_read += nread
        st.bytes_written += nwritten
        return ops, offsets, lens, nread + nwritten

    def finish(self, ops: bytearray, errs: array) -> None:
        """Account for the batch path's failures (``errs``: per-chain errno from
        ``complete_io``; those chains got ``IOERR``)."""
        if not any(errs):
            return
        st = self.stats
        for op, e in zip(ops, errs):
            if e:
                st.errors += 1
                if op == 1:  # plan() counted it as served
                    st.reads -= 1
                else:
                    st.writes -= 1
                log.warning("request failed with an I/O error (%s): %s", "read" if op == 1 else "write",
                            errno.errorcode.get(e, e))

    def _execute(self, chain: ChainLike, data_w: Any) -> Status:
        if chain.readable_len < OUTHDR.size:
            raise _Reject(Status.IOERR, f"header is {chain.readable_len} bytes, not {OUTHDR.size}")
        reader = chain.reader()
        rtype, _ioprio, sector = reader.read_obj(OUTHDR)
        if rtype == RequestType.IN:
            return self._read(reader, data_w, sector)
        if rtype == RequestType.OUT:
            return self._write(reader, sector)
        if rtype == RequestType.FLUSH:
            self.image.flush()
            self.stats.flushes += 1
            return Status.OK
        if rtype == RequestType.GET_ID:
            return self._get_id(data_w)
        if rtype == RequestType.DISCARD:
            return self._discard_write_zeroes(reader, discard=True)
        if rtype == RequestType.WRITE_ZEROES:
            return self._discard_write_zeroes(reader, discard=False)
        raise _Reject(Status.UNSUPP, f"request type {rtype} is not supported")

    def _range(self, sector: int, length: int) -> int:
        """Byte offset of ``sector``, after checking ``length`` bytes fit the disk."""
        if length % SECTOR_SIZE:
            raise _Reject(Status.IOERR, f"data length {length} is not a multiple of {SECTOR_SIZE}")
        offset = sector << SECTOR_SHIFT
        if not self.image.check_range(offset, length):
            raise _Reject(Status.IOERR, f"sectors [{sector}, +{length >> SECTOR_SHIFT}) beyond the "
                                        f"{self.image.capacity}-sector disk")
        return offset

    def _read(self, reader: Any, data_w: Any, sector: int) -> Status:
        if reader.available_bytes:
            raise _Reject(Status.IOERR, f"read request with {reader.available_bytes} device-readable data bytes")
        n = data_w.available_bytes
        offset = self._range(sector, n)
        if n:
            got = self.image.readv(data_w.views(n), offset)
            data_w.advance(got)
            if got != n:
                raise _Reject(Status.IOERR, f"short read: {got} of {n} bytes (image truncated?)")
        self.stats.reads += 1
        self.stats.bytes_read += n
        return Status.OK

    def _write(self, reader: Any, sector: int) -> Status:
        if self.read_only:
            raise _Reject(Status.IOERR, "write to a read-only disk")
        n = reader.available_bytes
        offset = self._range(sector, n)
        if n:
            self.image.writev(reader.views(n), offset)
            reader.skip(n)
        if not self.writeback:
            self.image.flush()
        self.stats.writes += 1
        self.stats.bytes_written += n
        return Status.OK

    def _get_id(self, data_w: Any) -> Status:
        ident = self.serial.ljust(ID_BYTES, b"\0")
        data_w.write(ident[: min(ID_BYTES, data_w.available_bytes)])
        self.stats.get_ids += 1
        return Status.OK

    def _discard_write_zeroes(self, reader: Any, *, discard: bool) -> Status:
        name = "discard" if discard else "write-zeroes"
        if discard:
            enabled = self.discard_enabled and self.acked & BlkFeature.DISCARD
            max_seg, max_sectors = self.max_discard_seg, self.max_discard_sectors
        else:
            enabled = self.write_zeroes_enabled and self.acked & BlkFeature.WRITE_ZEROES
            max_seg, max_sectors = self.max_write_zeroes_seg, self.max_write_zeroes_sectors
        if not enabled:
            raise _Reject(Status.UNSUPP, f"{name} is not offered/negotiated")
        n = reader.available_bytes
        if n == 0 or n % DWZ_SEGMENT.size:
            raise _Reject(Status.IOERR, f"{name}: {n} bytes of segments, not a multiple of {DWZ_SEGMENT.size}")
        count = n // DWZ_SEGMENT.size
        if count > max_seg:
            raise _Reject(Status.UNSUPP, f"{name}: {count} segments, at most {max_seg}")
        segments = [reader.read_obj(DWZ_SEGMENT) for _ in range(count)]
        ranges = []
        for sector, num_sectors, flags in segments:
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                raise _Reject(Status.UNSUPP, f"{name}: flags {flags:#x} not supported")
            if num_sectors > max_sectors:
                raise _Reject(Status.IOERR, f"{name}: {num_sectors} sectors, at most {max_sectors}")
            ranges.append((self._range(sector, num_sectors << SECTOR_SHIFT), num_sectors << SECTOR_SHIFT,
                           bool(flags & WRITE_ZEROES_FLAG_UNMAP)))
        for offset, length, unmap in ranges:
            if discard:
                self.image.discard(offset, length)
            else:
                self.image.write_zeroes(offset, length, unmap=unmap)
        if not self.writeback:
            self.image.flush()
        if discard:
            self.stats.discards += 1
        else:
            self.stats.write_zeroes += 1
        return Status.OK
