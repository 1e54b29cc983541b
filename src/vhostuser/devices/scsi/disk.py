"""A SCSI direct-access logical unit (SBC-3 disk) over a :class:`BlockImage`.

:meth:`ScsiDisk.execute` runs one CDB: it reads data-out from a chain reader,
writes data-in to a chain writer (zero-copy for READ/WRITE, through blk's
vectored image I/O) and returns a :class:`CommandResult`: status GOOD, or
CHECK CONDITION with fixed-format sense data.  It never raises for anything
the initiator sent.

Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard; VPD 0x00, 0x80,
0x83, 0xb0, 0xb1, 0xb2), READ CAPACITY(10/16), READ/WRITE(6/10/12/16),
VERIFY(10/16), SYNCHRONIZE CACHE(10/16), UNMAP, WRITE SAME(10/16), MODE
SENSE(6/10), REPORT LUNS (answered by the target, :func:`report_luns`),
START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL.  Anything else: ILLEGAL
REQUEST, INVALID COMMAND OPERATION CODE.
"""
from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import BlkImageError, ChainTooShort, GuestMemoryError
from ..blk.image import BlockImage
from . import protocol as p
from .protocol import Sense, Status

log = logging.getLogger(__name__)

VENDOR = b"vhostusr"
PRODUCT = b"Python vhost-scs"
REVISION = b"0001"
#: VPD pages we answer (0x00 lists them)
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
#: UNMAP / WRITE SAME limits (in logical blocks / descriptors), in the block-limits page
MAX_UNMAP_BLOCKS = 1 << 22
MAX_UNMAP_DESCRIPTORS = 255
MAX_WRITE_SAME_BLOCKS = 1 << 22
#: READ/WRITE transfer limit (blocks), in the block-limits page
MAX_TRANSFER_BLOCKS = 1 << 16


class Opcode:
    """SCSI operation codes handled here."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA


#: SERVICE ACTION IN(16) READ CAPACITY(16)
SAI_READ_CAPACITY_16 = 0x10


@dataclass
class CommandResult:
    """The outcome of a command: status, sense (CHECK CONDITION only) and the
    data-in / data-out byte counts actually moved."""

    status: Status = Status.GOOD
    sense: Sense | None = None
    data_in: int = 0
    data_out: int = 0
    #: a transport-level response other than OK (e.g. OVERRUN)
    response: p.Response = p.Response.OK


class CheckCondition(Exception):
    """Internal: end the command with CHECK CONDITION and ``sense``."""

    def __init__(self, sense: Sense, reason: str) -> None:
        super().__init__(reason)
        self.sense = sense


class _Overrun(Exception):
    """Internal: the data-in buffer cannot hold the data (VIRTIO_SCSI_S_OVERRUN)."""


@dataclass
class DiskStats:
    """Counters of one logical unit (approximate with several workers)."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    unmaps: int = 0
    write_sames: int = 0
    syncs: int = 0
    check_conditions: int = 0
    by_opcode: dict[int, int] = field(default_factory=dict)


def _be(data: bytes | bytearray, start: int, size: int) -> int:
    return int.from_bytes(data[start:start + size], "big")


def send_data(data_in: Any, payload: bytes, allocation_length: int) -> int:
    """Write ``payload`` truncated to the allocation length and the buffer; returns the count."""
    n = min(len(payload), allocation_length, data_in.available_bytes)
    if n:
        data_in.write(payload[:n])
    return n


def report_luns(luns: Sequence[int], cdb: bytes, data_in: Any) -> int:
    """REPORT LUNS data (single-level LUNs: peripheral addressing below 256, flat above)."""
    if cdb[2] not in (0x00, 0x01, 0x02):
        raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"REPORT LUNS select report {cdb[2]:#x}")
    alloc = _be(cdb, 6, 4)
    if alloc < 16:
        raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"REPORT LUNS allocation length {alloc} < 16")
    entries = b"".join((bytes([0, lun]) if lun < 256 else bytes([0x40 | lun >> 8, lun & 0xFF])) + bytes(6)
                       for lun in sorted(luns))
    return send_data(data_in, struct.pack(">I4x", len(entries)) + entries, alloc)


def absent_lun_inquiry(cdb: bytes, data_in: Any) -> int:
    """INQUIRY for a LUN that does not exist: peripheral qualifier 3, type 0x1f (SPC-4)."""
    data = bytearray(36)
    data[0] = 0x7F
    data[2], data[3], data[4] = 0x05, 0x02, 31
    return send_data(data_in, bytes(data), _be(cdb, 3, 2))


class ScsiDisk:
    """One logical unit backed by ``image``.  ``serial``: the unit serial number
    (VPD 0x80) and part of the device identification (0x83)."""

    def __init__(self, image: BlockImage, *, serial: str = "", lun: int = 0) -> None:
        self.image = image
        self.lun = lun
        self.read_only = image.read_only
        self.block_size = image.logical_block_size
        self.serial = (serial or f"vhostuser-lun{lun}").encode()[:64]
        #: write-back cache enabled (MODE SENSE caching page WCE): we do buffered
        #: I/O, so SYNCHRONIZE CACHE is what makes data durable
        self.wce = not image.direct
        self.stats = DiskStats()

    @property
    def num_blocks(self) -> int:
        """The LUN's size in logical blocks."""
        return self.image.size // self.block_size

    # --------------------------------------------------------------- dispatch
    def execute(self, cdb: bytes, data_out: Any, data_in: Any) -> CommandResult:
        """Run ``cdb`` (``data_out``: a chain reader, ``data_in``: a chain writer)."""
        op = cdb[0]
        self.stats.by_opcode[op] = self.stats.by_opcode.get(op, 0) + 1
        result = CommandResult()
        out_before = data_out.available_bytes
        try:
            result.data_in = self._dispatch(op, cdb, data_out, data_in)
        except CheckCondition as cc:
            self.stats.check_conditions += 1
            result.status, result.sense = Status.CHECK_CONDITION, cc.sense
            log.info("lun %d: CDB %s: CHECK CONDITION %s (%s)", self.lun, cdb[:16].hex(), cc.sense, cc)
        except _Overrun as exc:
            result.response = p.Response.OVERRUN
            log.warning("lun %d: CDB %s: %s", self.lun, cdb[:16].hex(), exc)
        except Exception:  # noqa: BLE001 - a bug must not take the queue down with it
            self.stats.check_conditions += 1
            result.status, result.sense = Status.CHECK_CONDITION, p.INTERNAL_TARGET_FAILURE
            log.exception("lun %d: CDB %s: unexpected error", self.lun, cdb[:16].hex())
        result.data_out = out_before - data_out.available_bytes
        return result

    def _dispatch(self, op: int, cdb: bytes, data_out: Any, data_in: Any) -> int:
        O = Opcode  # noqa: N806
        if op in (O.READ_6, O.READ_10, O.READ_12, O.READ_16):
            lba, n = self._rw_range(op, cdb)
            return self._read(lba, n, data_in)
        if op in (O.WRITE_6, O.WRITE_10, O.WRITE_12, O.WRITE_16):
            lba, n = self._rw_range(op, cdb)
            self._write(lba, n, data_out)
            return 0
        if op in (O.TEST_UNIT_READY, O.START_STOP_UNIT, O.PREVENT_ALLOW):
            return 0
        if op == O.INQUIRY:
            return self._inquiry(cdb, data_in)
        if op == O.REQUEST_SENSE:
            return send_data(data_in, p.NO_SENSE.fixed(), cdb[4])
        if op == O.READ_CAPACITY_10:
            last = min(self.num_blocks - 1, 0xFFFFFFFF)
            return send_data(data_in, struct.pack(">II", last, self.block_size), 8)
        if op == O.SERVICE_ACTION_IN_16:
            if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
                raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"SERVICE ACTION IN(16) action {cdb[1] & 0x1f:#x}")
            return self._read_capacity_16(cdb, data_in)
        if op in (O.SYNCHRONIZE_CACHE_10, O.SYNCHRONIZE_CACHE_16):
            self._io(self.image.flush, p.WRITE_ERROR)
            self.stats.syncs += 1
            return 0
        if op in (O.VERIFY_10, O.VERIFY_16):
            if cdb[1] & 0x02:  # BYTCHK: compare data-out with the medium: not supported
                raise CheckCondition(p.INVALID_FIELD_IN_CDB, "VERIFY with BYTCHK")
            lba, n = (_be(cdb, 2, 4), _be(cdb, 7, 2)) if op == O.VERIFY_10 else (_be(cdb, 2, 8), _be(cdb, 10, 4))
            self._check_range(lba, n)
            return 0
        if op == O.MODE_SENSE_6:
            return self._mode_sense(cdb, data_in, ten=False)
        if op == O.MODE_SENSE_10:
            return self._mode_sense(cdb, data_in, ten=True)
        if op == O.UNMAP:
            self._unmap(cdb, data_out)
            return 0
        if op in (O.WRITE_SAME_10, O.WRITE_SAME_16):
            self._write_same(op, cdb, data_out)
            return 0
        if op == O.REPORT_LUNS:  # the target normally answers; a lone disk reports itself
            return report_luns([self.lun], cdb, data_in)
        raise CheckCondition(p.INVALID_OPCODE, f"operation code {op:#04x} not supported")

    # ------------------------------------------------------------------ I/O
    def _rw_range(self, op: int, cdb: bytes) -> tuple[int, int]:
        if op in (Opcode.READ_6, Opcode.WRITE_6):
            lba = _be(cdb, 1, 3) & 0x1FFFFF
            n = cdb[4] or 256
        elif op in (Opcode.READ_10, Opcode.WRITE_10):
            lba, n = _be(cdb, 2, 4), _be(cdb, 7, 2)
        elif op in (Opcode.READ_12, Opcode.WRITE_12):
            lba, n = _be(cdb, 2, 4), _be(cdb, 6, 4)
        else:
            lba, n = _be(cdb, 2, 8), _be(cdb, 10, 4)
        if op not in (Opcode.READ_6, Opcode.WRITE_6) and cdb[1] & 0xE0:
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, "RDPROTECT/WRPROTECT without protection information")
        self._check_range(lba, n)
        return lba, n

    def _check_range(self, lba: int, n: int) -> None:
        if lba + n > self.num_blocks:
            raise CheckCondition(p.LBA_OUT_OF_RANGE, f"blocks [{lba}, +{n}) beyond the {self.num_blocks}-block disk")

    def _io(self, fn: Any, sense: Sense, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckCondition(p.SPACE_ALLOCATION_FAILED, f"host: {exc.strerror}") from exc
            raise CheckCondition(sense, f"host I/O error: {exc}") from exc
        except (BlkImageError, ChainTooShort, GuestMemoryError) as exc:
            raise CheckCondition(sense, str(exc)) from exc

    def _read(self, lba: int, n: int, data_in: Any) -> int:
        nbytes = n * self.block_size
        if data_in.available_bytes < nbytes:
            raise _Overrun(f"READ of {nbytes} bytes into a {data_in.available_bytes}-byte data-in buffer")
        if nbytes:
            got = self._io(self.image.readv, p.UNRECOVERED_READ_ERROR, data_in.views(nbytes), lba * self.block_size)
            data_in.advance(got)
            if got != nbytes:
                raise CheckCondition(p.UNRECOVERED_READ_ERROR, f"short read: {got} of {nbytes} bytes")
        self.stats.reads += 1
        self.stats.bytes_read += nbytes
        return nbytes

    def _require_writable(self) -> None:
        if self.read_only:
            raise CheckCondition(p.WRITE_PROTECTED, "the logical unit is read-only")

    def _write(self, lba: int, n: int, data_out: Any) -> None:
        self._require_writable()
        nbytes = n * self.block_size
        if data_out.available_bytes < nbytes:
            raise CheckCondition(p.INVALID_FIELD_IN_CDB,
                                 f"WRITE of {nbytes} bytes with {data_out.available_bytes} bytes of data-out")
        if nbytes:
            self._io(self.image.writev, p.WRITE_ERROR, data_out.views(nbytes), lba * self.block_size)
            data_out.skip(nbytes)
        if not self.wce:
            self._io(self.image.flush, p.WRITE_ERROR)
        self.stats.writes += 1
        self.stats.bytes_written += nbytes

    def _unmap(self, cdb: bytes, data_out: Any) -> None:
        self._require_writable()
        if cdb[1] & 0x01:
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, "UNMAP with ANCHOR")
        plen = _be(cdb, 7, 2)
        if plen == 0:
            return
        if plen < 8 or data_out.available_bytes < plen:
            raise CheckCondition(p.PARAMETER_LIST_LENGTH_ERROR,
                                 f"UNMAP parameter list length {plen} ({data_out.available_bytes} bytes sent)")
        params = data_out.read_exact(plen)
        bd_len = _be(params, 2, 2)
        if bd_len % 16 or 8 + bd_len > plen:
            raise CheckCondition(p.INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP block descriptor length {bd_len}")
        count = bd_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise CheckCondition(p.INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP with {count} descriptors")
        ranges = []
        for i in range(count):
            lba, n = struct.unpack_from(">QI", params, 8 + 16 * i)
            if n > MAX_UNMAP_BLOCKS:
                raise CheckCondition(p.INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP of {n} blocks")
            self._check_range(lba, n)
            ranges.append((lba * self.block_size, n * self.block_size))
        for offset, length in ranges:
            self._io(self.image.discard, p.WRITE_ERROR, offset, length)
        self.stats.unmaps += 1

    def _write_same(self, op: int, cdb: bytes, data_out: Any) -> None:
        self._require_writable()
        unmap, ndob = bool(cdb[1] & 0x08), op == Opcode.WRITE_SAME_16 and bool(cdb[1] & 0x01)
        if cdb[1] & 0xE6 or (cdb[1] & 0x10):  # WRPROTECT, ANCHOR, LBDATA/PBDATA (obsolete)
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"WRITE SAME flags {cdb[1]:#x}")
        lba, n = (_be(cdb, 2, 4), _be(cdb, 7, 2)) if op == Opcode.WRITE_SAME_10 else (_be(cdb, 2, 8), _be(cdb, 10, 4))
        if n == 0 or n > MAX_WRITE_SAME_BLOCKS:
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"WRITE SAME of {n} blocks (1..{MAX_WRITE_SAME_BLOCKS})")
        self._check_range(lba, n)
        if ndob:
            block = bytes(self.block_size)
        else:
            if data_out.available_bytes < self.block_size:
                raise CheckCondition(p.INVALID_FIELD_IN_CDB, "WRITE SAME without a block of data-out")
            block = data_out.read_exact(self.block_size)
        offset, length = lba * self.block_size, n * self.block_size
        if not any(block):
            # thin provisioning: a punched hole (UNMAP bit) or zeroed range, via fallocate
            self._io(self.image.write_zeroes, p.WRITE_ERROR, offset, length, unmap=unmap)
        else:
            chunk = block * max(1, (1 << 20) // self.block_size)
            done = 0
            while done < length:
                piece = chunk[:min(len(chunk), length - done)]
                self._io(self.image.write, p.WRITE_ERROR, offset + done, piece)
                done += len(piece)
        self.stats.write_sames += 1

    # ------------------------------------------------------------- inquiry
    def _inquiry(self, cdb: bytes, data_in: Any) -> int:
        alloc = _be(cdb, 3, 2)
        if cdb[1] & 0x02:
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, "INQUIRY CMDDT")
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"INQUIRY page {cdb[2]:#x} without EVPD")
            return send_data(data_in, self.standard_inquiry(), alloc)
        page = cdb[2]
        body = self.vpd_page(page)
        if body is None:
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"VPD page {page:#04x} not supported")
        return send_data(data_in, bytes([0x00, page]) + len(body).to_bytes(2, "big") + body, alloc)

    def standard_inquiry(self) -> bytes:
        """Standard INQUIRY data: a direct-access device (type 0), SPC-3, CmdQue."""
        data = bytearray(36)
        data[0] = 0x00
        data[2] = 0x05  # SPC-3
        data[3] = 0x02  # response data format 2
        data[4] = len(data) - 5
        data[7] = 0x02  # CMDQUE
        data[8:16] = VENDOR.ljust(8)
        data[16:32] = PRODUCT.ljust(16)
        data[32:36] = REVISION.ljust(4)
        return bytes(data)

    def vpd_page(self, page: int) -> bytes | None:
        """The body of VPD ``page`` (after the 4-byte header), or None."""
        if page == 0x00:
            return bytes(VPD_PAGES)
        if page == 0x80:
            return self.serial
        if page == 0x83:
            t10 = VENDOR.ljust(8) + self.serial  # T10 vendor ID based designator, ASCII
            return bytes([0x02, 0x01, 0x00, len(t10)]) + t10
        if page == 0xB0:
            body = bytearray(0x3C)
            body[0] = 0x01  # WSNZ: WRITE SAME of 0 blocks is not "to the end"
            struct.pack_into(">I", body, 4, MAX_TRANSFER_BLOCKS)
            if not self.read_only:
                struct.pack_into(">II", body, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
                struct.pack_into(">I", body, 24, 1)  # optimal unmap granularity
                struct.pack_into(">Q", body, 32, MAX_WRITE_SAME_BLOCKS)
            return bytes(body)
        if page == 0xB1:
            body = bytearray(0x3C)
            body[1] = 0x01  # medium rotation rate 1: non-rotating medium
            return bytes(body)
        if page == 0xB2:
            # LBPU, LBPWS, LBPWS10 (thin provisioning commands), LBPRZ (unmapped blocks read zero)
            flags = 0 if self.read_only else 0x80 | 0x40 | 0x20 | 0x04
            return bytes([0x00, flags, 0x02 if not self.read_only else 0x00, 0x00])
        return None

    def _read_capacity_16(self, cdb: bytes, data_in: Any) -> int:
        data = bytearray(32)
        struct.pack_into(">QI", data, 0, self.num_blocks - 1, self.block_size)
        if not self.read_only:
            data[14] = 0x80 | 0x40  # LBPME (thin provisioning), LBPRZ
        return send_data(data_in, bytes(data), _be(cdb, 10, 4))

    # ---------------------------------------------------------- mode sense
    def _mode_pages(self, page: int, changeable: bool) -> bytes:
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 0x12
        if self.wce and not changeable:
            caching[2] = 0x04  # WCE
        control = bytearray(12)
        control[0], control[1] = 0x0A, 0x0A
        pages = {0x08: bytes(caching), 0x0A: bytes(control)}
        if page == 0x3F:
            return b"".join(pages[k] for k in sorted(pages))
        if page in pages:
            return pages[page]
        raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"MODE SENSE page {page:#04x} not supported")

    def _mode_sense(self, cdb: bytes, data_in: Any, *, ten: bool) -> int:
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == 3:
            raise CheckCondition(p.SAVING_PARAMETERS_NOT_SUPPORTED, "MODE SENSE of saved values")
        if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise CheckCondition(p.INVALID_FIELD_IN_CDB, f"MODE SENSE subpage {subpage:#x}")
        pages = self._mode_pages(page, changeable=pc == 1)
        dbd = bool(cdb[1] & 0x08)
        bd = b""
        if not dbd:
            bd = bytes([0]) + min(self.num_blocks, 0xFFFFFF).to_bytes(3, "big") + bytes([0]) \
                + self.block_size.to_bytes(3, "big")
        dsp = 0x80 if self.read_only else 0x00  # WP
        if ten:
            body = bytes([0, dsp, 0, 0]) + len(bd).to_bytes(2, "big") + bd + pages
            return send_data(data_in, (len(body)).to_bytes(2, "big") + body, _be(cdb, 7, 2))
        body = bytes([0, dsp, len(bd)]) + bd + pages
        return send_data(data_in, bytes([len(body)]) + body, cdb[4])
